"""The prepared-case record (one LMDB value per case, UTF-8 JSON) and the fine stage's box record.

data_prepare writes a `PreparedCase` per case into the dataset's databases; the fine stage's boxes step writes a
`CaseBox` per unlabeled case into its own output_dir, and its uif step stores the kept cases as `PreparedCase`s with
their box and score. `to_json` is the only writer of each and `from_json` the only reader; the stored keys are those
of the original release (the seven `*_path` keys) plus ours, unchanged since the first version, so records on disk
load whatever wrote them (`to_json(from_json(r)) == r`).

In memory every box is a `common.volume.boxes.Box` (inclusive (min, max) voxel indices per axis, canonical raw
voxels); on disk `organ_bbox` and `coarse_box` are inclusive [[z0, z1], [y0, y1], [x0, x1]], `fine_crop_zyx` is
[[start, stop), ...] and a region is its offset and shape, as they have always been stored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from common.core.errors import InputError
from common.volume.boxes import Box, as_box, box_to_json

RECORD_VERSION = 1


@dataclass(frozen=True)
class Region:
    """A canonical copy of box + margin that the fine stage crops from: int16 image (+ uint8 mask when labeled)."""

    image_path: str
    mask_path: str | None
    box: Box                   # the voxels it holds (inclusive, canonical raw)
    margin_mm: float | None    # the margin it was cut around its box with (None: not recorded)

    @property
    def offset_zyx(self) -> tuple[int, int, int]:
        return tuple(lo for lo, _ in self.box)  # type: ignore[return-value]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(hi - lo + 1 for lo, hi in self.box)  # type: ignore[return-value]

    @classmethod
    def from_slices(cls, image_path: str, mask_path: str | None, slices: tuple[slice, slice, slice],
                    margin_mm: float) -> Region:
        box = tuple((int(s.start), int(s.stop) - 1) for s in slices)
        return cls(str(image_path), None if mask_path is None else str(mask_path), box, float(margin_mm))  # type: ignore

    def to_json(self) -> dict[str, Any]:
        return {"region_path": self.image_path, "region_mask_path": self.mask_path,
                "region_offset_zyx": list(self.offset_zyx), "region_shape_zyx": list(self.shape_zyx),
                "region_margin_mm": self.margin_mm}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Region | None:
        """The region of a record, or None when it has none (the region keys are null)."""
        if record.get("region_path") is None or record.get("region_offset_zyx") is None \
                or record.get("region_shape_zyx") is None:
            return None
        box = tuple((int(o), int(o) + int(n) - 1) for o, n in zip(record["region_offset_zyx"],
                                                                  record["region_shape_zyx"]))
        margin = record.get("region_margin_mm")
        return cls(str(record["region_path"]), record.get("region_mask_path"), box,  # type: ignore[arg-type]
                   None if margin is None else float(margin))


_NO_REGION = {"region_path": None, "region_mask_path": None, "region_offset_zyx": None, "region_shape_zyx": None,
              "region_margin_mm": None}


@dataclass(frozen=True)
class CaseBox:
    """The fine boxes step's record of an unlabeled case: its organ box, where the box came from, its region."""

    coarse_box: Box
    source: str | None         # "coarse_model", "whole_volume" ("body_fallback" before), "body"
    region: Region | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"coarse_box": box_to_json(self.coarse_box), "coarse_box_source": self.source}
        if self.region is not None:
            region = self.region.to_json()
            del region["region_mask_path"]  # unlabeled: no mask
            out.update(region)
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> CaseBox | None:
        """The box of a record (a boxes-step record or a UIF pool record), or None when it has none."""
        box = as_box(record.get("coarse_box"))
        if box is None:
            return None
        return cls(box, record.get("coarse_box_source"), Region.from_json(record))


@dataclass(frozen=True)
class PreparedCase:
    """One prepared case (DESIGN 3). Paths are absolute, or relative to the dataset folder in older datasets
    (`common.storage.data_paths.resolve_data_path`); geometry is canonical (after the `flips`)."""

    case_id: str
    labeled: bool
    image_path: str | None
    mask_path: str | None
    coarse_image_path: str | None
    coarse_mask_path: str | None = None
    fine_image_path: str | None = None
    fine_mask_path: str | None = None
    spacing_zyx: tuple[float, float, float] | None = None
    shape_zyx: tuple[int, int, int] | None = None
    direction: tuple[float, ...] | None = None          # 9 values, SimpleITK row-major
    origin: tuple[float, float, float] | None = None    # (x, y, z) mm
    flips: tuple[bool, bool, bool] | None = None        # (z, y, x)
    organ_box: Box | None = None                        # union of the organs (labeled)
    fine_crop: Box | None = None                        # what fine_image holds: organ box + extend_size_mm
    region: Region | None = None                        # labeled: data_prepare's; unlabeled: the boxes step's
    labels_present: tuple[int, ...] = ()
    hu_range: tuple[int, int] | None = None
    source: Mapping[str, Any] | None = None             # file stamps of the inputs (rerun bookkeeping)
    settings: Mapping[str, Any] | None = None           # the preparation settings (rerun bookkeeping)
    # Added under a fine experiment's output_dir (never in the dataset): the box, and the uif step's score and rank
    box: CaseBox | None = None
    uif_score: float | None = None
    uif_rank: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    def with_box(self, box: CaseBox | None) -> PreparedCase:
        """The case with the boxes step's box and region (unchanged when `box` is None)."""
        if box is None:
            return self
        return replace(self, box=box, region=box.region if box.region is not None else self.region)

    @property
    def crop_box(self) -> Box | None:
        """The box the fine stage crops around: the organ box of a labeled case, the coarse box of an unlabeled one."""
        if self.labeled:
            return self.organ_box
        return self.box.coarse_box if self.box is not None else None

    def to_json(self) -> dict[str, Any]:
        """The stored record (see the module docstring)."""
        out: dict[str, Any] = {
            "case_id": self.case_id, "labeled": self.labeled,
            "image_path": self.image_path, "mask_path": self.mask_path, "smooth_mask_path": None,
            "coarse_image_path": self.coarse_image_path, "coarse_mask_path": self.coarse_mask_path,
            "fine_image_path": self.fine_image_path, "fine_mask_path": self.fine_mask_path,
            "spacing_zyx": _list(self.spacing_zyx), "shape_zyx": _list(self.shape_zyx),
            "direction": _list(self.direction), "origin": _list(self.origin), "flips": _list(self.flips),
            "organ_bbox": box_to_json(self.organ_box),
            "fine_crop_zyx": None if self.fine_crop is None else [[lo, hi + 1] for lo, hi in self.fine_crop],
            **(self.region.to_json() if self.region is not None else _NO_REGION),
            "labels_present": list(self.labels_present), "hu_range": _list(self.hu_range),
            "source": _plain(self.source), "settings": _plain(self.settings),
        }
        if self.box is not None:
            out.update({"coarse_box": box_to_json(self.box.coarse_box), "coarse_box_source": self.box.source})
        if self.uif_score is not None or self.uif_rank is not None:
            out.update({"uif_score": self.uif_score, "uif_rank": self.uif_rank})
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, case_id: str, record: Mapping[str, Any], db: str | os.PathLike) -> PreparedCase:
        """Read a stored record; InputError naming the database `db` and the case when it is not one."""
        try:
            return cls._from_json(case_id, record)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(db, f"record {case_id!r} is not a prepared case ({type(exc).__name__}: {exc}); "
                                 "re-run data_prepare") from None

    @classmethod
    def _from_json(cls, case_id: str, r: Mapping[str, Any]) -> PreparedCase:
        fine_crop = r.get("fine_crop_zyx")
        labeled = bool(r["labeled"]) if "labeled" in r else r.get("mask_path") is not None
        return cls(
            case_id=str(r.get("case_id", case_id)), labeled=labeled,
            image_path=r.get("image_path"), mask_path=r.get("mask_path"),
            coarse_image_path=r.get("coarse_image_path"), coarse_mask_path=r.get("coarse_mask_path"),
            fine_image_path=r.get("fine_image_path"), fine_mask_path=r.get("fine_mask_path"),
            spacing_zyx=_tuple(r.get("spacing_zyx"), float), shape_zyx=_tuple(r.get("shape_zyx"), int),
            direction=_tuple(r.get("direction"), float), origin=_tuple(r.get("origin"), float),
            flips=_tuple(r.get("flips"), bool), organ_box=as_box(r.get("organ_bbox")),
            fine_crop=None if fine_crop is None else tuple((int(a), int(b) - 1) for a, b in fine_crop),  # type: ignore
            region=Region.from_json(r), labels_present=tuple(int(v) for v in r.get("labels_present") or ()),
            hu_range=_tuple(r.get("hu_range"), int), source=r.get("source"), settings=r.get("settings"),
            box=CaseBox.from_json(r), uif_score=r.get("uif_score"), uif_rank=r.get("uif_rank"),
            extra={k: v for k, v in r.items() if k not in _KNOWN_KEYS},
        )


_KNOWN_KEYS = frozenset({
    "case_id", "labeled", "image_path", "mask_path", "smooth_mask_path", "coarse_image_path", "coarse_mask_path",
    "fine_image_path", "fine_mask_path", "spacing_zyx", "shape_zyx", "direction", "origin", "flips", "organ_bbox",
    "fine_crop_zyx", *_NO_REGION, "labels_present", "hu_range", "source", "settings", "coarse_box",
    "coarse_box_source", "uif_score", "uif_rank"})


def _tuple(value: Any, kind: type) -> tuple | None:
    return None if value is None else tuple(kind(v) for v in value)


def _list(value: tuple | None) -> list | None:
    return None if value is None else list(value)


def _plain(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if value is None else dict(value)

