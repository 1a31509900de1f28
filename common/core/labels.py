"""The label set: which organs a dataset and a model segment, and how each is evaluated and post-processed.

A `LabelSet` holds labels 1..N (0 is background) in order; network output channel c is label c + 1. FLARE22's 13
organs (`FLARE22`) are the default and what the original release's weights use. A dataset may bring its own set
(an nnU-Net v2 `dataset.json`, `LabelSet.from_dataset_json`); data_prepare stores it with the prepared dataset and
every exported model carries it (`to_json` / `from_json`), so no stage needs a label flag.

Per label: its name (the dataset.json key), a short name (the CSV column prefix), the NSD tolerance of the FLARE22
evaluation, whether the evaluation crops it to the ground truth's axial extent (FLARE22: aorta, IVC, esophagus), and
whether post-processing keeps only its largest connected component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

DEFAULT_NSD_TOLERANCE_MM = 2.0
"""NSD tolerance of a label FLARE22 does not know, unless the dataset's settings say another (the report says which
tolerance each label used)."""


@dataclass(frozen=True)
class Label:
    """One organ of a label set."""

    id: int
    name: str                       # e.g. "liver", "right kidney" (FLARE22), "kidney_left" (a dataset.json key)
    short: str                      # CSV column prefix: <short>_DSC, <short>_NSD
    nsd_tolerance_mm: float
    z_cropped: bool = False         # evaluation: cut to the ground truth's axial extent without its last slice
    keep_largest: bool = True       # post-processing: only its largest connected component survives

    @property
    def key(self) -> str:
        """The name as a metric key: lower case, words joined by underscores ("right kidney" -> "right_kidney")."""
        return re.sub(r"[^0-9a-z]+", "_", self.name.lower()).strip("_")


@dataclass(frozen=True)
class LabelSet:
    """Labels 1..N of a dataset (0 = background), and the file ending its images use (`.nii.gz`: predictions are
    written with it)."""

    name: str
    labels: tuple[Label, ...]
    file_ending: str = ".nii.gz"
    _by_id: dict[int, Label] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = [label.id for label in self.labels]
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"label set {self.name!r}: labels must be 1..N in order, got {ids}")
        if not ids:
            raise ValueError(f"label set {self.name!r} has no labels")
        for attr in ("name", "short"):
            values = [getattr(label, attr) for label in self.labels]
            if len(set(values)) != len(values):
                raise ValueError(f"label set {self.name!r}: label {attr}s must be unique, got {values}")
        object.__setattr__(self, "_by_id", {label.id: label for label in self.labels})

    @property
    def num_organs(self) -> int:
        """Number of labels besides background = network output channels."""
        return len(self.labels)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(label.id for label in self.labels)

    def __getitem__(self, label_id: int) -> Label:
        return self._by_id[label_id]

    def __iter__(self):
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def z_cropped(self) -> frozenset[int]:
        return frozenset(label.id for label in self.labels if label.z_cropped)

    def to_json(self) -> dict[str, Any]:
        """The stored form (prepared dataset's db/labels.json, exported model.pt)."""
        return {"name": self.name, "file_ending": self.file_ending,
                "labels": [{"id": lb.id, "name": lb.name, "short": lb.short, "nsd_tolerance_mm": lb.nsd_tolerance_mm,
                            "z_cropped": lb.z_cropped, "keep_largest": lb.keep_largest} for lb in self.labels]}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> LabelSet:
        """Read `to_json`'s form; ValueError (KeyError, TypeError) on a malformed record."""
        labels = tuple(Label(int(r["id"]), str(r["name"]), str(r["short"]), float(r["nsd_tolerance_mm"]),
                             bool(r.get("z_cropped", False)), bool(r.get("keep_largest", True)))
                       for r in record["labels"])
        return cls(str(record["name"]), labels, str(record.get("file_ending", ".nii.gz")))

    @classmethod
    def from_dataset_json(cls, dataset: Mapping[str, Any], name: str = "dataset",
                          default_nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> LabelSet:
        """The label set of an nnU-Net v2 dataset.json (`labels`: {"background": 0, "liver": 1, ...}, consecutive
        from 0). A label FLARE22 knows by name keeps FLARE22's tolerance and axial crop; the others get
        `default_nsd_tolerance_mm`. ValueError naming the rule a malformed `labels` breaks."""
        raw = dataset.get("labels")
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError("has no 'labels' mapping (nnU-Net v2: {\"background\": 0, \"<organ>\": 1, ...})")
        bad = [k for k, v in raw.items() if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"'labels' values must be single integer ids (region-based labels are not supported): "
                             f"{', '.join(repr(k) for k in bad[:4])}")
        ids = sorted(raw.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"'labels' ids must be consecutive from 0 (0 = background), got {ids}")
        names = {v: k for k, v in raw.items()}
        if names[0].lower() != "background":
            raise ValueError(f"label 0 must be 'background', got {names[0]!r}")
        known = {_canonical(lb.name): lb for lb in FLARE22.labels} | {_canonical(k): lb for k, lb in _ALIASES.items()}
        labels = []
        for label_id in ids[1:]:
            flare = known.get(_canonical(names[label_id]))
            labels.append(Label(label_id, names[label_id], names[label_id],
                                flare.nsd_tolerance_mm if flare else float(default_nsd_tolerance_mm),
                                flare.z_cropped if flare else False))
        ending = dataset.get("file_ending", ".nii.gz")
        return cls(str(dataset.get("name", name)), tuple(labels), str(ending))


def _canonical(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.lower())


FLARE22 = LabelSet("FLARE22", (
    Label(1, "liver", "Liver", 5.0),
    Label(2, "right kidney", "RK", 3.0),
    Label(3, "spleen", "Spleen", 3.0),
    Label(4, "pancreas", "Pancreas", 5.0),
    Label(5, "aorta", "Aorta", 2.0, z_cropped=True),
    Label(6, "inferior vena cava", "IVC", 2.0, z_cropped=True),
    Label(7, "right adrenal gland", "RAG", 2.0),
    Label(8, "left adrenal gland", "LAG", 2.0),
    Label(9, "gallbladder", "Gallbladder", 2.0),
    Label(10, "esophagus", "Esophagus", 3.0, z_cropped=True),
    Label(11, "stomach", "Stomach", 5.0),
    Label(12, "duodenum", "Duodenum", 7.0),
    Label(13, "left kidney", "LK", 3.0),
))
"""The FLARE22 organs with the official NSD tolerances (flare22_eval.md); the default label set."""

# Other spellings of FLARE22's organs in dataset.json files (TotalSegmentator / AMOS style), for tolerances.
_ALIASES = {"kidney_right": FLARE22[2], "kidney_left": FLARE22[13], "ivc": FLARE22[6],
            "postcava": FLARE22[6], "adrenal_gland_right": FLARE22[7], "adrenal_gland_left": FLARE22[8],
            "gall_bladder": FLARE22[9]}
