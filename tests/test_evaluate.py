"""The evaluation CLI and API: the official CSV byte for byte, grid checks, missing files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny_models import export_tiny_stage

from common.core.errors import InputError
from common.core.labels import FLARE22, LabelSet
from common.evaluate import main
from common.evaluation.evaluate import CSV_COLUMNS, evaluate_folder, format_csv


def _write(path, array_zyx, spacing_xyz=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 5.0)):
    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def _mask(seed: int) -> np.ndarray:
    mask = np.zeros((9, 17, 15), dtype=np.uint8)
    mask[2:7, 3:12, 4:11] = 1
    mask[3:6, 12:15, 2:6] = 3
    mask[seed % 2 + 1:seed % 2 + 5, 5:8, 11:14] = 5
    return mask


@pytest.fixture()
def folders(tmp_path):
    """Empty prediction and truth folders (pred, gt)."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    return pred, gt


@pytest.fixture()
def official_folders(real_data_dir, folders):
    pred, gt = folders
    for case, gt_file, pred_file in (
        ("case_0001", "case_0001_mask.nii.gz", "eval_check/case_0001_pred.nii.gz"),
        ("case_0002", "case_0002_mask.nii.gz", "eval_check/case_0002_pred.nii.gz"),
        ("case_0003", "case_0003_mask.nii.gz", "case_0003_mask_fast.nii.gz"),
    ):
        shutil.copy(real_data_dir / gt_file, gt / f"{case}.nii.gz")
        shutil.copy(real_data_dir / pred_file, pred / f"{case}.nii.gz")
    return pred, gt


def test_cli_reproduces_official_csv_byte_for_byte(official_folders, real_data_dir, tmp_path, capsys):
    pred, gt = official_folders
    out = tmp_path / "results.csv"
    assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    official = (real_data_dir / "eval_check" / "official_DSC_NSD.csv").read_text()
    assert out.read_text() == official
    printed = capsys.readouterr().out
    assert "Gallbladder" in printed and "mean" in printed


def test_grid_mismatch_and_missing_gt_fail_only_their_case(folders, tmp_path, capsys):
    pred, gt = folders
    _write(gt / "good.nii.gz", _mask(0))
    _write(pred / "good.nii.gz", _mask(1))
    _write(gt / "other_suffix.mha", _mask(0))  # GT with the same id but another image format is found
    _write(pred / "other_suffix.nii.gz", _mask(0))
    _write(gt / "spacing.nii.gz", _mask(0))
    _write(pred / "spacing.nii.gz", _mask(0), spacing_xyz=(0.8, 0.9, 3.0))
    _write(gt / "size.nii.gz", _mask(0))
    _write(pred / "size.nii.gz", _mask(0)[:, :, :-1])
    _write(gt / "origin.nii.gz", _mask(0))
    _write(pred / "origin.nii.gz", _mask(0), origin=(-10.0, 20.0, 6.0))
    _write(pred / "orphan.nii.gz", _mask(0))
    (pred / "notes.txt").write_text("not an image")
    out = tmp_path / "out.csv"
    assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "orphan.nii.gz" in err and "ground truth missing" in err
    assert "spacing.nii.gz" in err and "spacing" in err
    assert "size.nii.gz" in err and "size" in err
    assert "origin.nii.gz" in err and "origin" in err
    assert "4 of 6 case(s) failed" in err
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert [line.split(",")[0] for line in lines[1:]] == ["good.nii.gz", "other_suffix.nii.gz"]
    # other_suffix is a perfect prediction: every organ 1 (present) or 1 (both empty)
    assert {float(v) for v in lines[2].split(",")[1:]} == {1.0}


def test_api_returns_rows_and_means_and_raises_on_failure_without_list(folders, tmp_path):
    pred, gt = folders
    _write(gt / "a.nii.gz", _mask(0))
    _write(pred / "a.nii.gz", _mask(1))
    _write(pred / "b.nii.gz", _mask(1))
    failures: list[tuple[str, str]] = []
    rows, means = evaluate_folder(pred, gt, tmp_path / "r.csv", failures=failures)
    assert [r["Name"] for r in rows] == ["a.nii.gz"] and failures[0][0] == "b.nii.gz"
    assert means["Liver_DSC"] == 1.0 and means["Spleen_NSD"] == 1.0
    assert 0 < means["Aorta_DSC"] < 1
    assert means["mean_DSC"] == pytest.approx(np.mean([rows[0][f"{c}"] for c in CSV_COLUMNS[1:14]]))
    with pytest.raises(InputError, match="b.nii.gz"):
        evaluate_folder(pred, gt, tmp_path / "r2.csv")
    assert (tmp_path / "r2.csv").is_file()  # the good cases are still written
    with pytest.raises(InputError, match="no prediction files"):
        evaluate_folder(tmp_path / "gt" / "..", gt)  # a folder holding only sub-folders


def test_format_csv_column_types():
    base = {c: 1 for c in CSV_COLUMNS[1:]}
    rows = [dict(base, Name="x.nii.gz", Liver_DSC=0.914), dict(base, Name="y.nii.gz", RK_NSD=float("nan"))]
    text = format_csv(rows).splitlines()
    first, second = text[1].split(","), text[2].split(",")
    assert first[1] == "0.914" and second[1] == "1.0"  # float column: ints written as floats
    assert first[2] == "1" and second[2] == "1"  # all-int column stays int
    assert second[CSV_COLUMNS.index("RK_NSD")] == ""  # NaN written empty (pandas default)


def test_mhd_predictions_are_found_like_every_readable_format(folders, tmp_path):
    """evaluate uses the image reader's suffix list, so a MetaImage (.mhd + .raw) prediction is scored."""
    pred, gt = folders
    _write(gt / "a.mhd", _mask(0))
    _write(pred / "a.mhd", _mask(0))
    rows, means = evaluate_folder(pred, gt, tmp_path / "r.csv")
    assert [r["Name"] for r in rows] == ["a.mhd"] and means["Liver_DSC"] == 1.0


# ------------------------------------------------------------------------------------------------ issue 14


def test_missing_prediction_is_named_and_exits_1(folders, tmp_path, capsys):
    pred, gt = folders
    for name in ("a", "b"):
        _write(gt / f"{name}.nii.gz", _mask(0))
    _write(pred / "a.nii.gz", _mask(1))
    assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "r.csv")]) == 1
    err = capsys.readouterr().err
    assert "FAILED b.nii.gz" in err and "prediction missing" in err and "1 of 2 case(s) failed" in err
    with pytest.raises(InputError, match="b.nii.gz"):
        evaluate_folder(pred, gt, tmp_path / "r2.csv")


def test_truncated_prediction_and_labels_above_13_fail_their_case(folders, tmp_path, capsys):
    pred, gt = folders
    big = np.zeros((40, 60, 50), np.uint8)
    big[5:35, 10:50, 10:40] = 1
    rng = np.random.default_rng(0)
    big[rng.random(big.shape) < 0.3] = 2  # noise compresses badly: cutting the file cuts voxel data
    _write(gt / "trunc.nii.gz", big)
    _write(pred / "trunc.nii.gz", big)
    data = (pred / "trunc.nii.gz").read_bytes()
    (pred / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    high = _mask(0)
    high[0, 0, 0] = 14
    _write(gt / "label14.nii.gz", high)
    _write(pred / "label14.nii.gz", _mask(0))
    _write(gt / "good.nii.gz", _mask(0))
    _write(pred / "good.nii.gz", _mask(0))
    assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "r.csv")]) == 1
    err = capsys.readouterr().err
    assert "FAILED trunc.nii.gz" in err and "truncated" in err
    assert "FAILED label14.nii.gz" in err and "outside 0..13: 14" in err
    assert [line.split(",")[0] for line in (tmp_path / "r.csv").read_text().splitlines()[1:]] == ["good.nii.gz"]


def test_out_that_is_a_folder_is_a_setup_error(folders, tmp_path, capsys):
    pred, gt = folders
    _write(gt / "a.nii.gz", _mask(0))
    _write(pred / "a.nii.gz", _mask(0))
    assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--out is a folder" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- issue 21


def test_results_csv_quotes_a_case_name_with_a_comma(folders, tmp_path):
    """A comma in a case name shifted every column of results.csv: fields are written by the csv module."""
    import csv

    pred, gt = folders
    for name in ("a,b.nii.gz", 'quote"d.nii.gz', "plain.nii.gz"):
        _write(gt / name, _mask(0))
        _write(pred / name, _mask(1))
    out = tmp_path / "results.csv"
    rows, _ = evaluate_folder(pred, gt, out)
    with open(out, newline="", encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert [r["Name"] for r in read] == ["a,b.nii.gz", "plain.nii.gz", 'quote"d.nii.gz']
    assert all(len(r) == len(CSV_COLUMNS) and None not in r for r in read)
    assert [float(r["Liver_DSC"]) for r in read] == [row["Liver_DSC"] for row in rows]
    assert out.read_text().splitlines()[2].startswith("plain.nii.gz,")  # plain names stay as the official script's


def test_pred_equal_to_gt_warns(folders, capsys):
    pred, _ = folders
    _write(pred / "a.nii.gz", _mask(0))
    assert main(["--pred", str(pred), "--gt", str(pred), "--out", str(pred.parent / "r.csv")]) == 0
    captured = capsys.readouterr()
    assert "--pred and --gt are the same folder" in captured.out + captured.err


def test_label_set_from_a_dataset_json_or_a_model_folder_names_columns_and_tolerances(folders, tmp_path, capsys):
    """--labels reads the label set from a dataset.json or an exported model folder: the CSV has one column pair per
    label under its own name, and the table says which NSD tolerance each label used (a label FLARE22 does not know
    gets --nsd-tolerance-mm)."""
    pred, gt = folders
    mask = np.zeros((9, 17, 15), dtype=np.uint8)
    mask[2:7, 3:12, 4:11] = 1
    mask[3:6, 12:15, 2:6] = 2
    mask[4:6, 5:8, 11:14] = 3
    _write(gt / "p1.nii.gz", mask)
    shifted = mask.copy()
    shifted[4:6, 5:8, 11:14] = 0
    shifted[4:6, 6:9, 11:14] = 3
    _write(pred / "p1.nii.gz", shifted)
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"name": "Lesions", "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                   "labels": {"background": 0, "liver": 1, "kidney_left": 2, "lesion": 3}}))
    labels = LabelSet.from_dataset_json(json.loads(dataset.read_text()), default_nsd_tolerance_mm=4.0)
    model = export_tiny_stage(tmp_path / "weights", "fine", "efficient_seg_net", 32, seed=0, labels=labels)
    for source in (dataset, model):
        out = tmp_path / f"{source.name}.csv"
        assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(out), "--labels", str(source),
                     "--nsd-tolerance-mm", "4"]) == 0
        table = capsys.readouterr().out
        with open(out, newline="") as handle:
            header, row = list(csv.reader(handle))
        assert header == ["Name", "liver_DSC", "kidney_left_DSC", "lesion_DSC", "liver_NSD", "kidney_left_NSD",
                          "lesion_NSD"]
        assert float(row[1]) == 1.0 and float(row[2]) == 1.0 and 0.0 < float(row[3]) < 1.0
        lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
        assert lines["liver"].endswith(f"{FLARE22[1].nsd_tolerance_mm:.1f} mm")  # FLARE22's tolerance for the liver
        assert lines["lesion"].endswith("4.0 mm")


def test_a_csv_the_disk_cuts_short_is_named_and_none_is_left(official_folders, tmp_path, capsys, monkeypatch):
    """The CSV is written with core.files.write_text_atomic, whose size check turns a short write (full disk, file
    size limit) into a WriteError: exit 1 naming the file, no partial CSV."""
    pred, gt = official_folders
    out = tmp_path / "results.csv"
    real_write_bytes = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: real_write_bytes(self, data[:100]))
    assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "results.csv" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".results.csv*"))
