"""benchmarks/min_component.py: one prediction per model, the fine minimum volume applied per value, the table."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny_models import export_tiny_stage

from benchmarks import min_component as mc
from common.core.defaults import FINE_MIN_VOLUME_MM3
from common.core.errors import InputError
from common.infer.folder import predict_folder
from common.infer.predictor import PredictOptions

# The tiny fine network (seed 3) finds organs of ~40 mm^3 up to ~70 ml on these phantoms: each value drops some.
VALUES = (0.0, 100.0, 1000.0, 30000.0)
SPACING_XYZ = (1.5, 1.4, 3.0)
NAME = "weights"  # a --case-set is named after its model folder


def _phantom(shape_zyx, seed) -> tuple[np.ndarray, np.ndarray]:
    """int16 CT (air, body ellipse, a brighter blob) and a truth mask with a large and a small organ."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    ct = np.full(shape_zyx, -1000.0)
    ct[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 40.0
    blob = ((z - 0.1) / 0.5) ** 2 + ((y - 0.1) / 0.3) ** 2 + ((x + 0.2) / 0.3) ** 2 < 1
    ct[blob] = 120.0
    truth = np.zeros(shape_zyx, dtype=np.uint8)
    truth[blob] = 2
    truth[(z / 0.3) ** 2 + ((y + 0.4) / 0.15) ** 2 + ((x - 0.4) / 0.15) ** 2 < 1] = 8
    return (ct + rng.normal(0, 30, shape_zyx)).astype(np.int16), truth


def _write(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin((-20.0, 11.0, 95.0))
    sitk.WriteImage(image, str(path), useCompression=True)


@pytest.fixture(scope="module")
def case_set(tmp_path_factory) -> mc.CaseSet:
    root = tmp_path_factory.mktemp("mc")
    weights, images, truth = root / "weights", root / "images", root / "truth"
    export_tiny_stage(weights, "coarse", "unet", 32, seed=1)
    export_tiny_stage(weights, "fine", "efficient_seg_net", 32, seed=3)
    images.mkdir()
    truth.mkdir()
    for i, shape in enumerate(((23, 41, 37), (19, 37, 43))):
        ct, mask = _phantom(shape, seed=i)
        _write(images / f"case_{i}_0000.nii.gz", ct)
        _write(truth / f"case_{i}.nii.gz", mask)
    return mc.CaseSet("tiny", weights, images, truth)


@pytest.fixture(scope="module")
def measured(case_set, tmp_path_factory) -> tuple[Path, str]:
    """The benchmark run once on the tiny case set: (its output folder, what it printed)."""
    out = tmp_path_factory.mktemp("mc_out")
    argv = ["--case-set", str(case_set.weights), str(case_set.images), str(case_set.truth), "--out", str(out),
            "--json", str(out / "result.json"), "--values", *[f"{v:g}" for v in VALUES]]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert mc.main(argv) == 0
    return out, printed.getvalue()


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_table_one_row_per_value_and_larger_minimum_keeps_less(measured):
    out, printed = measured
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    values = sorted(set(VALUES) | {FINE_MIN_VOLUME_MM3})  # the model's own value (the baseline) is always scored
    assert len(table) == 1 + len(values)  # header + one row per value
    assert [row.split("|")[1].split()[0] for row in table[1:]] == [f"{v:g}" for v in values]
    result = json.loads((out / "result.json").read_text())
    assert result["baseline_mm3"] == FINE_MIN_VOLUME_MM3
    entries = result["values"]
    assert [e["min_volume_mm3"] for e in entries] == values
    kept = [e["foreground_voxels"] for e in entries]
    assert all(a >= b for a, b in itertools.pairwise(kept)) and kept[0] > kept[-1]  # never more, and some dropped
    baseline = next(e for e in entries if e["min_volume_mm3"] == FINE_MIN_VOLUME_MM3)
    assert baseline["diff_DSC"]["mean"] == 0.0 and baseline["diff_DSC"]["n"] == 2
    # per mask: each larger value keeps a subset of the smaller value's voxels, labels unchanged
    masks = [_masks(out / NAME / mc.value_dir(v)) for v in values]
    for smaller, larger in itertools.pairwise(masks):
        for name, mask in larger.items():
            assert np.all((mask == 0) | (mask == smaller[name]))
    # the paired difference is computed from the per-case scores it reports
    first = entries[0]
    diffs = [first["per_case"][c]["DSC"] - baseline["per_case"][c]["DSC"] for c in sorted(first["per_case"])]
    assert first["diff_DSC"]["mean"] == pytest.approx(np.mean(diffs))


@pytest.mark.parametrize("value", [0.0, 1000.0])
def test_value_equals_the_predictor_run_with_that_flag(measured, case_set, tmp_path, value):
    out, _ = measured
    direct = tmp_path / "direct"
    predict_folder(case_set.images, direct, PredictOptions(
        case_set.weights, device="cpu", ensemble=True, fine_min_volume_mm3=value, progress=False, workers=1))
    ours, theirs = _masks(out / NAME / mc.value_dir(value)), _masks(direct)
    assert sorted(ours) == sorted(theirs) == ["case_0.nii.gz", "case_1.nii.gz"]
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_layouts_demo_and_seed_folders(tmp_path):
    demo = tmp_path / "demo_output"
    (demo / "model_weights").mkdir(parents=True)
    (demo / "dataset").mkdir()
    [cs] = mc.case_sets_from_path(demo, "lk")
    assert (cs.weights, cs.images, cs.truth) == (demo / "model_weights", demo / "dataset" / "val_images",
                                                 demo / "dataset" / "val_mask")
    bench = tmp_path / "semi"
    for seed in (0, 1):
        (bench / f"seed{seed}" / "dataset").mkdir(parents=True)
    (bench / "seed1" / "settings.json").write_text(json.dumps({"fine_size": 48, "ensemble": False}))
    sets = mc.case_sets_from_path(bench, "lu")
    assert [s.name for s in sets] == ["seed0_lu", "seed1_lu"]
    assert sets[1].weights == bench / "seed1" / "weights_lu"
    assert sets[1].images == bench / "seed1" / "dataset" / "val_images"
    assert (sets[0].fine_size, sets[0].ensemble, sets[1].fine_size, sets[1].ensemble) == (None, None, 48, False)
    assert [s.name for s in mc.case_sets_from_path(bench / "seed1", "lk")] == ["seed1_lk"]


def test_missing_weights_is_a_setup_error(tmp_path, capsys):
    (tmp_path / "seed0" / "dataset").mkdir(parents=True)
    assert mc.main(["--runs", str(tmp_path / "seed0"), "--row", "lk", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "weights_lk" in err and "coarse model of seed0_lk not found" in err
    assert mc.main(["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "neither a demo output" in capsys.readouterr().err


def test_a_kept_prediction_made_with_other_settings_is_refused(measured, case_set):
    out, _ = measured
    other = mc.CaseSet(NAME, case_set.weights, case_set.images, case_set.truth, ensemble=False)
    with pytest.raises(InputError, match="other settings"):
        mc.predict_once(other, out / NAME)


def test_original_threshold_scales_with_input_over_crop():
    # the original counts crop voxels against 2000 mm^3 of the network grid:
    # a crop twice the input per axis -> 1/8 of it
    assert mc.original_threshold_mm3("0:384,10:394,5:389", (192, 192, 192)) == pytest.approx(250.0)
    assert mc.original_threshold_mm3("0:16,0:32,0:64", (32, 32, 32)) == pytest.approx(2000.0 * 2 * 1 * 0.5)
