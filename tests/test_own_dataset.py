"""Your own dataset: an nnU-Net v2 raw dataset with 4 organs under their own ids goes through data_prepare, both
trainers (with UIF), export, predict.sh and evaluation through the stages' own scripts, with no code change and no
label flag. (tests/test_demo.py runs the same path on the default FLARE22 layout.) Bad dataset.json files are
refused with one message naming the file and the rule, and nothing is written."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.config import PrepareConfig
from common.core.typed_config import load_config
from common.storage.checkpoint import load_checkpoint
from data_prepare.run import main as prepare
from data_prepare.synthetic import write_nnunet_dataset

ROOT = Path(__file__).resolve().parents[1]
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right"]
SMALL = ["device=cpu", "model.channels=[2,4,4,8,8]", "model.dropout=0.0", "data.num_workers=0",
         "data.size_zyx=[32,32,32]", "schedule.iterations=4", "schedule.val_interval=2",
         "schedule.checkpoint_interval=2", "amp.precision=fp32"]


def _run(log: Path, *argv: str) -> None:
    """Run a stage's script with its output in a file, as nohup or SLURM would; the log must read as lines."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the scripts set it
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.run(argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=600).returncode
    text = log.read_text(encoding="utf-8", errors="replace")
    assert code == 0, f"{' '.join(argv)}:\n{text[-3000:]}"
    assert "\r" not in text, f"{log.name}: progress bars drawn with carriage returns in a log file"


def test_nnunet_raw_dataset_with_its_own_labels_end_to_end(tmp_path):
    data = tmp_path / "Dataset042_Phantoms"
    write_nnunet_dataset(data, ORGANS, labeled=3, unlabeled=2, val=2, seed=2, size="tiny", hard_fraction=0.0)
    weights, logs = tmp_path / "model_weights", tmp_path / "logs"
    logs.mkdir()
    _run(logs / "prepare.log", "sh", "data_prepare/run.sh", f"data_base_dir={data}", "coarse_size_zyx=[32,32,32]",
         "fine_size_zyx=[32,32,32]", "num_workers=0")
    coarse = [f"data_base_dir={data}", f"output_dir={tmp_path / 'coarse'}",
              f"export.dir={weights / 'base_coarse_model'}", *SMALL]
    _run(logs / "coarse.log", "sh", "coarse_base_seg/run.sh", *coarse)
    _run(logs / "coarse_export.log", "sh", "coarse_base_seg/run.sh", *coarse, "step=export")
    _run(logs / "fine.log", "sh", "fine_efficient_seg/run.sh", f"data_base_dir={data}",
         f"output_dir={tmp_path / 'fine'}", f"export.dir={weights / 'efficient_fine_model'}",
         f"boxes.coarse_model_dir={weights / 'base_coarse_model'}", "round2.iterations=2", "uif.keep_count=1", *SMALL)
    _run(logs / "predict.log", "sh", "predict.sh", str(data / "imagesTs"), str(tmp_path / "pred"), "--weights-dir",
         str(weights), "--device", "cpu")
    _run(logs / "evaluate.log", str(ROOT / ".venv" / "bin" / "python"), "-m", "common.evaluate", "--pred",
         str(tmp_path / "pred"), "--gt", str(data / "labelsTs"), "--out", str(tmp_path / "results.csv"))

    # the labels travelled: dataset -> both models (names, 4 output channels) -> masks -> evaluation
    assert [lb["name"] for lb in json.loads((data / "db" / "labels.json").read_text())["labels"]] == ORGANS
    for stage in ("base_coarse_model", "efficient_fine_model"):
        payload = load_checkpoint(weights / stage / "model.pt")
        assert [lb["name"] for lb in payload["labels"]["labels"]] == ORGANS
        assert payload["model"]["kwargs"]["num_classes"] == 4
    masks = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert [p.name for p in masks] == ["validation_000.nii.gz", "validation_001.nii.gz"]  # <case><file_ending>
    for path in masks:
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist()) <= {0, 1, 2, 3, 4}
    with open(tmp_path / "results.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["Name", *(f"{o}_DSC" for o in ORGANS), *(f"{o}_NSD" for o in ORGANS)]
    table = (logs / "evaluate.log").read_text()
    assert "kidney_left" in table and "NSD tol." in table and "3.0 mm" in table  # the tolerance each label used


def _bad_dataset(tmp_path: Path) -> Path:
    data = tmp_path / "Dataset007_Bad"
    write_nnunet_dataset(data, ORGANS, labeled=2, unlabeled=0, val=0, seed=4, size="tiny", hard_fraction=0.0)
    shutil.rmtree(data / ".synthetic_original")  # the phantoms' staging copy: not part of the raw dataset
    return data


def _edit_json(data: Path, change) -> None:
    dataset = json.loads((data / "dataset.json").read_text())
    change(dataset)
    (data / "dataset.json").write_text(json.dumps(dataset))


def _write_like(path: Path, array: np.ndarray, like: sitk.Image, spacing=None) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _missing_labels(data: Path) -> None:
    _edit_json(data, lambda d: d.pop("labels"))


def _gap_in_ids(data: Path) -> None:
    _edit_json(data, lambda d: d["labels"].update({"kidney_right": 6}))


def _two_channels(data: Path) -> None:
    _edit_json(data, lambda d: d["channel_names"].update({"1": "PET"}))


def _second_channel_file(data: Path) -> None:
    shutil.copy(data / "imagesTr" / "train_000_0000.nii.gz", data / "imagesTr" / "train_000_0001.nii.gz")


def _label_off_grid(data: Path) -> None:
    mask = sitk.ReadImage(str(data / "labelsTr" / "train_001.nii.gz"))
    spacing = mask.GetSpacing()
    _write_like(data / "labelsTr" / "train_001.nii.gz", sitk.GetArrayFromImage(mask), mask,
                (spacing[0], spacing[1], spacing[2] * 2))


def _label_outside_set(data: Path) -> None:
    mask = sitk.ReadImage(str(data / "labelsTr" / "train_000.nii.gz"))
    array = sitk.GetArrayFromImage(mask)
    array[0, 0, 0] = 7
    _write_like(data / "labelsTr" / "train_000.nii.gz", array, mask)


@pytest.mark.parametrize("break_it, file_name, rule", [
    (_missing_labels, "dataset.json", "has no 'labels'"),
    (_gap_in_ids, "dataset.json", "consecutive from 0"),
    (_two_channels, "dataset.json", "2 input channels"),
    (_second_channel_file, "train_000_0001.nii.gz", "second input channel"),
    (_label_off_grid, "train_001.nii.gz", "mask is not on the image's grid"),
    (_label_outside_set, "train_000.nii.gz", "mask holds labels outside 0..4: 7"),
])
def test_bad_nnunet_dataset_is_refused_naming_the_file_and_writing_nothing(tmp_path, caplog, break_it, file_name,
                                                                           rule):
    data = _bad_dataset(tmp_path)
    break_it(data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    cfg = load_config(PrepareConfig, ROOT / "data_prepare" / "config.yaml", [f"data_base_dir={data}", "num_workers=0"])
    caplog.set_level("ERROR")
    assert prepare(cfg) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(file_name in e and rule in e for e in errors), errors
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written, not even db/
