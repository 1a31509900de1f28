"""Where a dataset's cases lie and which labels it has: the original release's layout or nnU-Net v2's raw layout.

Original release (no dataset.json in data_base_dir): the folders of the config (`train_images/`, `train_mask/`,
`trainu_images/`, `val_images/`, optional `file_list/`), FLARE22's 13 organs.

nnU-Net v2 raw layout (data_base_dir holds a `dataset.json`), read as it is:
    dataset.json                 {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, ...},
                                  "numTraining": N, "file_ending": ".nii.gz"}
    imagesTr/<case>_0000<ending> labeled CTs        labelsTr/<case><ending>  their label maps
    imagesTs/<case>_0000<ending> test CTs           labelsTs/<case><ending>  (optional) their label maps
    imagesUnlabeled/<case>_0000<ending>             unlabeled CTs (the config's nnunet.unlabeled_dir; nnU-Net has
                                                    no unlabeled folder)
`verify_nnunet` checks what nnU-Net's own integrity check checks before anything is written: one CT channel (no
`<case>_0001` files), labels consecutive from 0, every label file present and on its image's grid, no label value
outside the set. Each violation is one line naming the file and the rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.config import PrepareConfig
from common.core.errors import InputError
from common.core.labels import FLARE22, LabelSet
from common.storage.image_io import read_mask, read_meta
from common.storage.labelsets import DATASET_JSON, read_dataset_json

KINDS = ("labeled", "unlabeled", "test")
CHANNEL_SUFFIX_LEN = 5  # "_0000": nnU-Net's channel suffix of an image file name


@dataclass(frozen=True)
class DatasetLayout:
    """The folders of a dataset's cases ({kind: (image folder, mask folder or None)}, relative to data_base_dir),
    its label set, and whether file_list/ may name the cases (the original layout only)."""

    name: str
    folders: dict[str, tuple[str, str | None]]
    labels: LabelSet
    file_lists: bool


def dataset_layout(cfg: PrepareConfig, base: Path) -> DatasetLayout:
    """The layout of the dataset at `base`; InputError naming dataset.json when it breaks a rule (nothing is
    written then)."""
    dataset_json = base / DATASET_JSON
    if not dataset_json.is_file():
        return DatasetLayout("original", {"labeled": (cfg.train_image_dir, cfg.train_mask_dir),
                                          "unlabeled": (cfg.trainu_image_dir, None),
                                          "test": (cfg.test_image_dir, cfg.test_mask_dir)}, FLARE22, True)
    labels = read_dataset_json(dataset_json, cfg.nnunet.default_nsd_tolerance_mm)
    channels = json.loads(dataset_json.read_text(encoding="utf-8")).get("channel_names")
    if not isinstance(channels, dict) or not channels:
        raise InputError(dataset_json, "has no 'channel_names' (nnU-Net v2: {\"0\": \"CT\"})")
    if len(channels) != 1:
        raise InputError(dataset_json, f"has {len(channels)} input channels {channels}; this project segments one "
                                       "CT channel (channel_names must be {\"0\": \"CT\"})")
    test_masks = "labelsTs" if (base / "labelsTs").is_dir() else None
    return DatasetLayout("nnunet", {"labeled": ("imagesTr", "labelsTr"),
                                    "unlabeled": (cfg.nnunet.unlabeled_dir, None),
                                    "test": ("imagesTs", test_masks)}, labels, False)


def verify_nnunet(layout: DatasetLayout, base: Path) -> list[str]:
    """Every violation of the nnU-Net raw layout's rules, one line each naming the file and the rule ([] if none).

    Reads the label maps of the labeled (and labelled test) cases and the image headers, as nnU-Net's
    verify_dataset_integrity does."""
    problems: list[str] = []
    ending = layout.labels.file_ending
    for kind, (image_dir, mask_dir) in layout.folders.items():
        folder = base / image_dir
        if not folder.is_dir():
            if kind == "labeled":
                problems.append(str(InputError(folder, "not found: the nnU-Net raw layout needs imagesTr/")))
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.name.endswith(ending):
                continue
            stem = path.name[: -len(ending)]
            channel = stem[-CHANNEL_SUFFIX_LEN:]
            if not (channel.startswith("_") and channel[1:].isdigit()):
                problems.append(str(InputError(path, f"image names must end in _0000{ending} (nnU-Net channel "
                                                     "suffix)")))
            elif channel != "_0000":
                problems.append(str(InputError(path, f"a second input channel ({channel[1:]}); this project "
                                                     "segments one CT channel (_0000 only)")))
            elif mask_dir is not None:
                problems += _check_label_file(path, base / mask_dir / f"{stem[:-CHANNEL_SUFFIX_LEN]}{ending}",
                                              layout.labels, required=kind == "labeled")
    return problems


def _check_label_file(image: Path, mask: Path, labels: LabelSet, required: bool) -> list[str]:
    """Problems of one case's label file: missing, unreadable, off its image's grid, values outside the set (the
    mask rules of `read_mask`, which data_prepare applies to every mask)."""
    if not mask.is_file():
        return [str(InputError(mask, f"label file missing for {image.name}"))] if required else []
    try:
        read_mask(mask, read_meta(image), labels.num_organs)
    except InputError as exc:
        return [f"{exc} (dataset.json's labels: 0..{labels.num_organs})"]
    return []
