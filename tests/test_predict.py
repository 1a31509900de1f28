"""predict.py / common.infer: geometry, fallback, bad inputs, skip/overwrite, ensemble, overlays, weights errors.

Tiny networks (channels 2,4,4,8,8; 32^3 inputs) exported through the real `export_model`, CPU only.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from tiny_models import export_tiny_stage
from torch import nn

import predict
from common.core.errors import InputError
from common.core.files import is_temp_name
from common.core.labelmaps import probs_to_labels
from common.core.labels import FLARE22, LabelSet
from common.evaluation.uncertainty import labels_disagreement
from common.infer import predictor as predictor_module
from common.infer import upsample
from common.infer.folder import predict_folder
from common.infer.postprocess import keep_largest_component
from common.infer.predictor import PredictOptions, Predictor
from common.infer.upsample import upsample_labels
from common.storage import model_folder
from common.storage.checkpoint import state_digest
from common.storage.image_io import ImageMeta, check_ct, read_image

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_CASES = ("case_0001", "case_0002", "case_0003")
QUIET = PredictOptions(progress=False)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    export_tiny_stage(root, "coarse", "unet", 32, seed=1)
    export_tiny_stage(root, "fine", "efficient_seg_net", 32, seed=3)
    return root


@pytest.fixture(scope="session")
def predictor(weights_dir) -> Predictor:
    return Predictor(PredictOptions(weights_dir, device="cpu"))


def _ct_volume(shape_zyx, seed=0) -> np.ndarray:
    """Body-like int16 volume: air around a soft-tissue ellipsoid with a brighter 'organ' inside."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    vol = np.full(shape_zyx, -1000.0)
    vol[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 40.0
    vol[((z - 0.1) / 0.5) ** 2 + ((y - 0.1) / 0.3) ** 2 + ((x + 0.2) / 0.3) ** 2 < 1] = 120.0
    return (vol + rng.normal(0, 10, shape_zyx)).astype(np.int16)


def _write_ct(path: Path, array_zyx: np.ndarray, spacing_xyz=(0.8, 0.9, 2.5), origin=(-12.5, 30.0, 101.0),
              direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def _rows(out_dir: Path) -> dict[str, dict[str, str]]:
    with open(out_dir / "predictions.csv", newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def _assert_same_geometry(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize()
    assert ia.GetSpacing() == pytest.approx(ib.GetSpacing(), abs=1e-6)
    assert ia.GetOrigin() == pytest.approx(ib.GetOrigin(), abs=1e-4)
    assert ia.GetDirection() == pytest.approx(ib.GetDirection(), abs=1e-6)


# ------------------------------------------------------------------------------------------------ geometry


def test_real_cts_keep_their_exact_geometry(tmp_path, real_data_dir, predictor):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for case in REAL_CASES:  # <id>_0000.nii.gz naming, as in FLARE folders
        os.symlink(real_data_dir / f"{case}.nii.gz", in_dir / f"{case}_0000.nii.gz")
    out_dir = tmp_path / "out"
    summary = predict_folder(in_dir, out_dir, QUIET, predictor=predictor)
    assert (summary["ok"], summary["failed"]) == (3, 0)
    rows = _rows(out_dir)
    for case in REAL_CASES:
        out = out_dir / f"{case}.nii.gz"
        _assert_same_geometry(out, real_data_dir / f"{case}.nii.gz")
        mask = sitk.ReadImage(str(out))
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert sitk.GetArrayViewFromImage(mask).max() <= 13
        row = rows[case]
        assert row["status"] == "ok"
        assert [row[k] for k in ("gpu_alloc_peak_mb", "gpu_reserved_peak_mb", "gpu_used_mb")] == ["0.0000"] * 3
        for key in ("read_s", "coarse_s", "fine_s", "post_s", "write_s", "total_s"):
            assert float(row[key]) >= 0
        assert row["coarse_box"].count(":") == 3  # z0:z1,y0:y1,x0:x1


def test_oblique_direction_keeps_geometry(tmp_path, predictor, caplog):
    angle = np.deg2rad(20)
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0)  # rotated in-plane, z stored feet-first
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    src = _write_ct(in_dir / "oblique_0000.nii.gz", _ct_volume((33, 47, 45)), direction=direction)
    out_dir = tmp_path / "out"
    summary = predict_folder(in_dir, out_dir, QUIET, predictor=predictor)
    assert summary["ok"] == 1
    _assert_same_geometry(out_dir / "oblique.nii.gz", src)
    assert "oblique" in caplog.text


def test_mask_is_pasted_in_file_orientation(predictor):
    """Flipping the stored array (and the direction) must give the flipped mask: the pipeline is orientation-exact."""
    vol = _ct_volume((33, 47, 45), seed=2)
    meta = ImageMeta((45, 47, 33), (0.8, 0.9, 2.5), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    flipped_meta = ImageMeta((45, 47, 33), (0.8, 0.9, 2.5), (0.0, 0.0, 0.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, -1.0))
    a = predictor.predict(vol, meta).mask
    b = predictor.predict(np.ascontiguousarray(vol[::-1, ::-1, ::-1]), flipped_meta).mask
    assert np.array_equal(a, b[::-1, ::-1, ::-1])


# ------------------------------------------------------------------------------------------------ pipeline pieces


class _Constant(nn.Module):
    """A stand-in network with constant logits (not exported: used only to drive the pipeline)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 13, *x.shape[2:]), self.value)


def test_empty_coarse_mask_falls_back_to_whole_volume(tmp_path, weights_dir, caplog):
    predictor = Predictor(PredictOptions(weights_dir, device="cpu"))
    predictor.coarse.networks = {"a": _Constant(-5.0)}
    predictor.coarse.primary = "a"
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    vol = _ct_volume((33, 47, 45))
    _write_ct(in_dir / "c1_0000.nii.gz", vol)
    out_dir = tmp_path / "out"
    assert predict_folder(in_dir, out_dir, QUIET, predictor=predictor)["ok"] == 1
    row = _rows(out_dir)["c1"]
    assert row["fallback"] == "1" and "fallback" in row["error"]
    assert row["coarse_box"] == "0:33,0:47,0:45"
    assert "coarse mask is empty" in caplog.text


def test_upsample_labels_equals_full_resize():
    torch.manual_seed(0)
    for in_shape, out_shape in [((16, 20, 24), (33, 47, 45)), ((32, 32, 32), (20, 70, 1)), ((16, 16, 16), (5, 9, 40))]:
        coarse = torch.randn(1, 13, *[max(2, n // 4) for n in in_shape])
        scores = F.interpolate(coarse, size=in_shape, mode="trilinear", align_corners=True)[0] * 3 - 1
        full = F.interpolate(scores[None], size=out_shape, mode="trilinear", align_corners=True)[0]
        for threshold, s in ((0.0, scores), (0.5, scores.sigmoid())):
            expected = probs_to_labels(full if threshold == 0.0 else full.sigmoid(), threshold)
            got = upsample_labels(s, out_shape, threshold, chunk_elements=700)
            # probabilities are resized before the sigmoid in the full path: compare logit path exactly only
            if threshold == 0.0:
                assert (got != expected).sum() <= 1
            assert got.dtype == torch.uint8 and tuple(got.shape) == out_shape


def test_upsample_labels_empty_and_single_organ():
    scores = torch.full((13, 8, 8, 8), -3.0)
    assert upsample_labels(scores, (10, 11, 12), 0.0).sum() == 0
    scores[4, 2:5, 2:5, 2:5] = 3.0
    labels = upsample_labels(scores, (15, 15, 15), 0.0)
    assert set(labels.unique().tolist()) == {0, 5}


def test_disagreement():
    """The predictor's column uses UIF's definition (common.evaluation.uncertainty): organs present in either,
    none = least certain."""
    a = torch.zeros(4, 4, 4, dtype=torch.uint8)
    assert labels_disagreement(a, a, 13) == 1.0  # nothing present: no usable label, least certain
    a[0, :2] = 1
    assert labels_disagreement(a, a, 13) == 0.0
    b = a.clone()
    b[0, :2] = 2  # organ 1 only in A, organ 2 only in B: both Dice 0
    assert labels_disagreement(a, b, 13) == pytest.approx(1.0)
    c = a.clone()
    c[0, 0] = 0  # organ 1: |A| = 8, |B| = 4, overlap 4 -> Dice 2/3
    assert labels_disagreement(a, c, 13) == pytest.approx(1 / 3)


def test_keep_largest_component_is_used_per_grid(predictor):
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:6, 2:6, 2:6] = 3
    labels[10:12, 10:12, 10:12] = 3  # smaller component dropped
    out = keep_largest_component(labels, (1.0, 1.0, 1.0), 10.0)
    assert (out == 3).sum() == 64


def test_check_ct_rejects_bad_volumes(tmp_path):
    vol = _ct_volume((8, 9, 10))
    good = ImageMeta((10, 9, 8), (0.8, 0.8, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    check_ct(vol, good, "ok.nii.gz")
    for spacing in (0.0, 80.0, 1e-6, float("nan")):
        with pytest.raises(InputError, match="implausible voxel spacing"):
            check_ct(vol, ImageMeta((10, 9, 8), (0.8, 0.8, spacing), (0, 0, 0), good.direction), "bad.nii.gz")
    with pytest.raises(InputError, match="non-CT intensities"):
        check_ct(np.clip(vol, 0, 255).astype(np.uint8), good, "photo.nii.gz")
    with pytest.raises(InputError, match="non-CT intensities"):
        check_ct(np.zeros((8, 9, 10), np.int16), good, "blank.nii.gz")


# ------------------------------------------------------------------------------------------------ folders


def test_bad_files_are_named_and_the_rest_goes_on(tmp_path, real_data_dir, predictor):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "good_0000.nii.gz", _ct_volume((33, 47, 45)))
    data = (real_data_dir / "case_0003.nii.gz").read_bytes()
    (in_dir / "truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    flat = sitk.GetImageFromArray(np.zeros((20, 30), np.int16))
    sitk.WriteImage(flat, str(in_dir / "flat_0000.nii.gz"))
    _write_ct(in_dir / "spacing_0000.nii.gz", _ct_volume((9, 10, 11)), spacing_xyz=(0.8, 0.8, 75.0))
    (in_dir / "notes.txt").write_text("not an image")
    out_dir = tmp_path / "out"
    summary = predict_folder(in_dir, out_dir, QUIET, predictor=predictor)
    assert (summary["ok"], summary["failed"]) == (1, 3)
    rows = _rows(out_dir)
    assert rows["good"]["status"] == "ok" and (out_dir / "good.nii.gz").is_file()
    assert rows["truncated"]["status"] == "failed" and "truncated" in rows["truncated"]["error"]
    assert "truncated_0000.nii.gz" in rows["truncated"]["error"]
    assert rows["flat"]["status"] == "failed" and "2D" in rows["flat"]["error"]
    assert rows["spacing"]["status"] == "failed" and "spacing" in rows["spacing"]["error"]
    assert rows["notes.txt"]["status"] == "skipped" and "not an image" in rows["notes.txt"]["error"]
    assert not (out_dir / "truncated.nii.gz").exists()


def test_cli_exit_codes(tmp_path, weights_dir, capsys):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "good_0000.nii.gz", _ct_volume((33, 47, 45)))
    (in_dir / "bad_0000.nii.gz").write_bytes(b"garbage")
    out_dir = tmp_path / "out"
    code = predict.main(["-i", str(in_dir), "-o", str(out_dir), "--weights-dir", str(weights_dir),
                         "--device", "cpu", "--quiet"])
    assert code == 1
    text = capsys.readouterr().out
    assert "FAILED bad" in text and "bad_0000.nii.gz" in text
    assert (out_dir / "good.nii.gz").is_file()
    # everything done: rerun skips and succeeds
    assert predict.main(["-i", str(in_dir), "-o", str(out_dir), "--weights-dir", str(weights_dir), "--device",
                         "cpu", "--quiet"]) == 1  # the bad file still fails


def test_skip_existing_and_overwrite(tmp_path, predictor):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c3.nii.gz", _ct_volume((33, 47, 45)))  # plain name: id = name without extension
    out_dir = tmp_path / "out"
    assert predict_folder(in_dir, out_dir, QUIET, predictor=predictor)["ok"] == 1
    out = out_dir / "c3.nii.gz"
    out.write_bytes(b"sentinel")  # a rerun must not touch it
    summary = predict_folder(in_dir, out_dir, QUIET, predictor=predictor)
    assert (summary["ok"], summary["skipped"]) == (0, 1)
    assert out.read_bytes() == b"sentinel" and _rows(out_dir)["c3"]["status"] == "skipped"
    summary = predict_folder(in_dir, out_dir, PredictOptions(overwrite=True, progress=False), predictor=predictor)
    assert summary["ok"] == 1
    read_image(out)  # a real image again
    assert not [p for p in out_dir.rglob("*") if is_temp_name(p.name)]  # no temporary files left


def test_ensemble_and_uncertainty(tmp_path, weights_dir):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c3_0000.nii.gz", _ct_volume((33, 47, 45), seed=5), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    single = Predictor(PredictOptions(weights_dir, device="cpu"))
    assert not single.uncertainty  # auto: not on the CPU without --ensemble
    ensemble = Predictor(PredictOptions(weights_dir, device="cpu", ensemble=True))
    assert ensemble.uncertainty
    summary = predict_folder(in_dir, tmp_path / "out", PredictOptions(uncertainty_threshold=0.0, progress=False),
                             predictor=ensemble)
    row = summary["rows"][0]
    assert row["status"] == "ok" and 0.0 <= row["uncertainty"] <= 1.0 and row["flagged"]
    vol, meta = read_image(in_dir / "c3_0000.nii.gz")
    # the ensemble averages probabilities: with B's networks replaced by A's it must equal network A alone
    ensemble.coarse.networks["b"] = ensemble.coarse.networks["a"]
    ensemble.fine.networks["b"] = ensemble.fine.networks["a"]
    same = ensemble.predict(vol, meta)
    assert same.uncertainty == 0.0
    differ = np.count_nonzero(same.mask != single.predict(vol, meta).mask)
    assert differ <= same.mask.size * 1e-4  # float rounding of the sigmoid -> logit round trip only


def test_overlays_are_valid_pngs(tmp_path, predictor):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c3_0000.nii.gz", _ct_volume((33, 47, 45), seed=5), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    out_dir = tmp_path / "out"
    options = PredictOptions(overlays=True, progress=False)
    assert predict_folder(in_dir, out_dir, options, predictor=predictor)["ok"] == 1
    data = (out_dir / "c3_overlay.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    raw = zlib.decompress(data[idat + 4:idat + 4 + length])
    assert len(raw) == height * (1 + 3 * width)


def test_cuda_oom_retries_on_cpu(tmp_path, predictor, monkeypatch):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c3_0000.nii.gz", _ct_volume((33, 47, 45), seed=5), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))

    class Flaky:
        uncertainty = False
        labels = FLARE22

        def predict(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

        def on_cpu(self):
            return predictor

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    summary = predict_folder(in_dir, tmp_path / "out", QUIET, predictor=Flaky())
    row = summary["rows"][0]
    assert row["status"] == "ok" and "predicted on the CPU" in row["error"]


def _oom_case(tmp_path: Path) -> Path:
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c3_0000.nii.gz", _ct_volume((33, 47, 45), seed=5), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return in_dir


class _OutOfMemoryOnce:
    """A GPU predictor stand-in whose first `failures` attempts run out of memory while holding a tensor."""

    uncertainty = False
    device = torch.device("cpu")
    labels = FLARE22

    def __init__(self, real: Predictor, failures: int, error: Exception) -> None:
        self.real, self.failures, self.error = real, failures, error
        self.held: list = []             # weak references to the tensors the failed attempts held
        self.alive_at_retry: list = []   # was the previous attempt's tensor still alive when the next began?
        self.cpu_calls = 0

    def predict(self, raw, meta, case=""):
        if self.held:
            self.alive_at_retry.append(self.held[-1]() is not None)
        if len(self.held) < self.failures:
            activations = torch.zeros(1000)  # referenced only by this frame, i.e. by the error's traceback
            self.held.append(weakref.ref(activations))
            raise type(self.error)(*self.error.args)  # a fresh error each time, as CUDA raises them
        return self.real.predict(raw, meta, case)

    def on_cpu(self):
        self.cpu_calls += 1
        return self.real


def test_cuda_oom_frees_the_failed_attempt_then_retries_on_the_gpu(tmp_path, predictor):
    # cuDNN's allocation failure arrives as a plain RuntimeError; it is an out-of-memory error all the same.
    flaky = _OutOfMemoryOnce(predictor, 1, RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    summary = predict_folder(_oom_case(tmp_path), tmp_path / "out", QUIET, predictor=flaky)
    row = summary["rows"][0]
    assert row["status"] == "ok" and row["error"] == "CUDA out of memory; the retry on the GPU succeeded"
    assert flaky.alive_at_retry == [False]  # the traceback's GPU tensors were gone before the retry
    assert flaky.cpu_calls == 0
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"gpu_alloc_peak_mb", "gpu_reserved_peak_mb", "gpu_used_mb"} <= set(header)
    assert "peak_gpu_mem_mb" not in header


def test_cuda_oom_twice_goes_to_the_cpu_and_other_errors_fail_the_case(tmp_path, predictor):
    flaky = _OutOfMemoryOnce(predictor, 2, torch.cuda.OutOfMemoryError("CUDA out of memory (test)"))
    row = predict_folder(_oom_case(tmp_path), tmp_path / "out", QUIET, predictor=flaky)["rows"][0]
    assert row["status"] == "ok" and row["error"] == "CUDA out of memory twice; predicted on the CPU"
    assert flaky.alive_at_retry == [False] and flaky.cpu_calls == 1  # the CPU attempt runs the real predictor
    broken = _OutOfMemoryOnce(predictor, 1, RuntimeError("CUDA error: an illegal memory access was encountered"))
    (tmp_path / "b").mkdir()
    row = predict_folder(_oom_case(tmp_path / "b"), tmp_path / "out_b", QUIET, predictor=broken)["rows"][0]
    assert row["status"] == "failed" and "illegal memory access" in row["error"]
    assert broken.alive_at_retry == [] and broken.cpu_calls == 0


def test_chunk_size_follows_the_device(predictor):
    assert upsample.default_chunk_elements(torch.device("cpu")) == upsample.UPSAMPLE_CPU_CHUNK
    assert predictor.chunk_elements == upsample.UPSAMPLE_CPU_CHUNK
    cuda_chunk = upsample.default_chunk_elements(torch.device("cuda"))
    assert cuda_chunk * upsample.UPSAMPLE_BYTES_PER_ELEMENT <= upsample.UPSAMPLE_CUDA_BUDGET_MB * 2**20
    assert cuda_chunk < 1 << 24 and cuda_chunk > 1 << 20


def test_upsample_labels_organ_shaped_scores_per_voxel_path():
    """Organ-like blobs (sparse boundaries: the per-voxel path, int32 indices) match the full resize."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in (14, 17, 19)], indexing="ij"))
    scores = torch.full((13, 14, 17, 19), -4.0)
    for c, centre in enumerate(((0.2, -0.3, 0.1), (-0.4, 0.3, -0.2), (0.1, 0.5, 0.5))):
        distance = ((grid - torch.tensor(centre)[:, None, None, None]) ** 2).sum(0).sqrt()
        scores[3 * c] = 6.0 * (1.0 - distance / 0.45)
    for out_shape in ((37, 51, 40), (20, 33, 61)):
        full = F.interpolate(scores[None], size=out_shape, mode="trilinear", align_corners=True)[0]
        expected = probs_to_labels(full, 0.0)
        for chunk in (900, 1 << 21):
            got = upsample_labels(scores, out_shape, 0.0, chunk_elements=chunk)
            assert (got != expected).sum() <= 2 and set(got.unique().tolist()) == {0, 1, 4, 7}


def test_first_resize_in_slabs_and_float64_input():
    from common.volume.network_input import resize_in_slabs

    gen = torch.Generator().manual_seed(3)
    raw = torch.randint(-1024, 2000, (1, 1, 37, 29, 31), generator=gen).to(torch.int16)
    expected = F.interpolate(raw.float(), size=(16, 12, 20), mode="trilinear", align_corners=True)
    for slab in (1, 5, 16, 64):
        torch.testing.assert_close(resize_in_slabs(raw, (16, 12, 20), slab), expected, rtol=1e-5, atol=1e-3)
    assert resize_in_slabs(raw.double(), (16, 12, 20)).dtype == torch.float32
    # float64 volumes are handed to the device as float32 (half the upload, no float64 resize)
    friendly = predictor_module._torch_friendly(np.zeros((3, 4, 5), dtype=np.float64))
    assert friendly.dtype == np.float32 and friendly.flags.c_contiguous


# ------------------------------------------------------------------------------------------------ weights


def test_missing_and_corrupt_weights_exit_2(tmp_path, weights_dir, capsys):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c3_0000.nii.gz", _ct_volume((33, 47, 45), seed=5), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    empty = tmp_path / "no_weights"
    empty.mkdir()
    code = predict.main(["-i", str(in_dir), "-o", str(tmp_path / "out"), "--weights-dir", str(empty), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "base_coarse_model/model.pt" in err and "not found" in err

    broken = tmp_path / "broken"
    shutil.copytree(weights_dir, broken)
    model = broken / model_folder.FINE_DIR / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    code = predict.main(["-i", str(in_dir), "-o", str(tmp_path / "out"), "--weights-dir", str(broken), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "efficient_fine_model/model.pt" in err


def test_predict_sh_runs_the_cli(tmp_path):
    """predict.sh is POSIX sh: usage error without arguments, missing input folder -> exit 2 naming it."""
    script = REPO_ROOT / "predict.sh"
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
    result = subprocess.run(["sh", str(script), str(tmp_path / "nowhere"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nowhere" in result.stderr


# ------------------------------------------------------------------------------------------------ issue 14


def _cli(in_dir: Path, out_dir: Path, weights_dir: Path, *extra: str) -> int:
    return predict.main(["-i", str(in_dir), "-o", str(out_dir), "--weights-dir", str(weights_dir), "--device", "cpu",
                         "--quiet", *extra])


def test_output_folder_equal_to_input_folder_is_refused(tmp_path, weights_dir, capsys):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    ct = _write_ct(in_dir / "c3.nii.gz", _ct_volume((17, 20, 19)))  # no _0000: its output name is its own name
    before = ct.read_bytes()
    for extra in ((), ("--overwrite",)):
        assert _cli(in_dir, in_dir, weights_dir, *extra) == 2
        assert "output folder is the input folder" in capsys.readouterr().err
        assert ct.read_bytes() == before
    assert sorted(p.name for p in in_dir.iterdir()) == ["c3.nii.gz"]
    # the same folder by another spelling
    assert _cli(in_dir, in_dir / ".." / "in", weights_dir, "--overwrite") == 2
    assert ct.read_bytes() == before


def test_output_that_would_overwrite_an_input_fails_the_case(tmp_path, predictor):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    ct = _write_ct(out_dir / "c3.nii.gz", _ct_volume((17, 20, 19)))
    os.symlink(ct, in_dir / "c3.nii.gz")  # the input's real file lies where its output would go
    before = ct.read_bytes()
    summary = predict_folder(in_dir, out_dir, PredictOptions(overwrite=True, progress=False), predictor=predictor)
    assert summary["failed"] == 1 and "would overwrite an input" in summary["rows"][0]["error"]
    assert ct.read_bytes() == before


def test_output_path_that_is_a_file_is_a_setup_error(tmp_path, weights_dir, capsys):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz", _ct_volume((17, 20, 19)))
    out = tmp_path / "out"
    out.write_text("a file")
    assert _cli(in_dir, out, weights_dir) == 2
    err = capsys.readouterr().err
    assert "existing file" in err and str(out) in err and "Traceback" not in err
    assert out.read_text() == "a file"


def test_unwritable_output_fails_before_any_case(tmp_path, weights_dir, capsys, monkeypatch):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz", _ct_volume((17, 20, 19)))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make creating a file in the folder fail as it would for a user
        import tempfile
        real = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == out:
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(predictor_module.Predictor, "predict",
                        lambda *a, **k: pytest.fail("predicted into a read-only folder"))
    try:
        assert _cli(in_dir, out, weights_dir) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert "cannot write into the output folder" in err and "Traceback" not in err


def test_duplicate_ids_fail_naming_both_files(tmp_path, predictor):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c1.nii.gz", _ct_volume((17, 20, 19)))
    _write_ct(in_dir / "c1_0000.nii.gz", _ct_volume((17, 20, 19), seed=1))
    _write_ct(in_dir / "c2_0000.nii.gz", _ct_volume((17, 20, 19)))
    summary = predict_folder(in_dir, tmp_path / "out", QUIET, predictor=predictor)
    assert (summary["ok"], summary["failed"]) == (1, 1)
    row = _rows(tmp_path / "out")["c1"]
    assert row["status"] == "failed" and "c1.nii.gz" in row["error"] and "c1_0000.nii.gz" in row["error"]
    assert not (tmp_path / "out" / "c1.nii.gz").exists()


def test_rerun_keeps_each_cases_row_and_cleans_temporaries(tmp_path, weights_dir):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for i in range(2):
        _write_ct(in_dir / f"c{i}_0000.nii.gz", _ct_volume((17, 20, 19), seed=i))
    ensemble = Predictor(PredictOptions(weights_dir, device="cpu", ensemble=True))
    options = PredictOptions(uncertainty_threshold=0.0, progress=False)
    first = predict_folder(in_dir, out_dir, options, predictor=ensemble)
    assert first["ok"] == 2 and first["flagged"] == 2
    before = _rows(out_dir)
    # a kill after c0: its mask and row stay, c1's mask is gone and a temporary file is left
    (out_dir / "c1.nii.gz").unlink()
    (out_dir / ".c1.nii.gz.abcd1234.tmp.nii.gz").write_bytes(b"partial")
    second = predict_folder(in_dir, out_dir, options, predictor=ensemble)
    assert (second["ok"], second["skipped"], second["flagged"]) == (1, 1, 2)
    after = _rows(out_dir)
    assert after["c0"]["status"] == "skipped"
    for key in ("coarse_box", "fallback", "uncertainty", "flagged", "total_s"):
        assert after["c0"][key] == before["c0"][key] != ""
    assert after["c1"]["status"] == "ok" and after["c1"]["flagged"] == "1"
    assert not (out_dir / ".c1.nii.gz.abcd1234.tmp.nii.gz").exists()
    # an empty output (a write that never finished) is not taken as done
    (out_dir / "c0.nii.gz").write_bytes(b"")
    assert predict_folder(in_dir, out_dir, options, predictor=ensemble)["ok"] == 1
    assert read_image(out_dir / "c0.nii.gz")[0].shape == (17, 20, 19)


def test_concurrent_run_into_the_same_folder_is_refused(tmp_path, predictor):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz", _ct_volume((17, 20, 19)))
    holder = subprocess.Popen(  # another process holding the folder's lock, as a running predict would
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(out_dir / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="another predict run is writing into this folder"):
            predict_folder(in_dir, out_dir, QUIET, predictor=predictor)
        assert not (out_dir / "c1.nii.gz").exists()
    finally:
        holder.kill()
        holder.wait()
    assert predict_folder(in_dir, out_dir, QUIET, predictor=predictor)["ok"] == 1  # the lock died with it


def test_unusable_weights_are_setup_errors(tmp_path, weights_dir, capsys):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c3_0000.nii.gz", _ct_volume((17, 20, 19)))
    random_bytes = tmp_path / "random"
    shutil.copytree(weights_dir, random_bytes)
    (random_bytes / model_folder.FINE_DIR / "model.pt").write_bytes(np.random.default_rng(3).bytes(2000))
    zero = tmp_path / "zero"
    export_tiny_stage(zero, "coarse", "unet", 32, seed=1)
    export_tiny_stage(zero, "fine", "efficient_seg_net", 32, seed=3)
    payload = torch.load(zero / model_folder.FINE_DIR / "model.pt", weights_only=True)
    payload["preprocess"]["size_zyx"] = [0, 0, 0]
    torch.save(payload, zero / model_folder.FINE_DIR / "model.pt")
    nan = tmp_path / "nan"
    shutil.copytree(weights_dir, nan)
    payload = torch.load(nan / model_folder.COARSE_DIR / "model.pt", weights_only=True)
    networks = payload["networks"] if "networks" in payload else payload
    first = next(iter(networks.values()))
    next(v for v in first.values() if torch.is_tensor(v) and v.is_floating_point()).fill_(float("nan"))
    payload["weights_sha256"] = {k: state_digest(v) for k, v in networks.items()}  # as exported from NaN weights
    torch.save(payload, nan / model_folder.COARSE_DIR / "model.pt")
    for weights, problem in ((random_bytes, "cannot read checkpoint"), (zero, "preprocess settings unusable"),
                             (nan, "NaN or infinite weights")):
        assert _cli(in_dir, tmp_path / f"out_{weights.name}", weights) == 2
        err = capsys.readouterr().err
        assert problem in err and "model.pt" in err and "Traceback" not in err and "weights_only" not in err
        assert not (tmp_path / f"out_{weights.name}" / "c3.nii.gz").exists()


def test_empty_input_folder_or_folder_of_folders_is_a_setup_error(tmp_path, weights_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    nested = tmp_path / "nested"
    (nested / "patient1").mkdir(parents=True)
    _write_ct(nested / "patient1" / "c1_0000.nii.gz", _ct_volume((17, 20, 19)))
    for folder in (empty, nested):
        assert _cli(folder, tmp_path / "out", weights_dir) == 2
        err = capsys.readouterr().err
        assert "no CT images in the folder" in err and str(folder) in err


# ------------------------------------------------------------------------------------------------ issue 21


def test_a_mask_cut_short_by_a_full_disk_fails_its_case_and_a_rerun_redoes_it(tmp_path, weights_dir, capsys,
                                                                              monkeypatch):
    """SimpleITK returns without an error from a write a full disk or `ulimit -f` cut short: the mask must be checked
    before it is renamed into place, the case reported failed (exit 1) and a plain rerun must predict it again."""
    from common.storage import image_io

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz", _ct_volume((17, 20, 19)))
    real_write = image_io.sitk.WriteImage

    def cut_short(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        os.truncate(path, os.path.getsize(path) // 2)

    monkeypatch.setattr(image_io.sitk, "WriteImage", cut_short)
    assert _cli(in_dir, out_dir, weights_dir, "--backend", "torch") == 1
    out = capsys.readouterr().out
    assert "FAILED c1" in out and "c1.nii.gz: could not be written completely" in out and "Traceback" not in out
    assert _rows(out_dir)["c1"]["status"] == "failed"
    assert not (out_dir / "c1.nii.gz").exists() and not [p for p in out_dir.iterdir() if is_temp_name(p.name)]
    monkeypatch.undo()
    assert _cli(in_dir, out_dir, weights_dir, "--backend", "torch") == 0
    assert _rows(out_dir)["c1"]["status"] == "ok"
    assert read_image(out_dir / "c1.nii.gz")[0].shape == (17, 20, 19)


@pytest.mark.parametrize("flag, value", [
    ("--extend-size-mm", "-50"), ("--fine-min-volume-mm3", "inf"), ("--workers", "-3"),
    ("--uncertainty-threshold", "nan"), ("--fine-size", "4096"), ("--coarse-min-volume-mm3", "1e300"),
    ("--z-window-mm", "0"), ("--fine-size", "100"),
])
def test_option_values_out_of_range_stop_at_start_up(tmp_path, weights_dir, capsys, flag, value):
    """A negative margin changed every mask, an infinite minimum volume emptied them all with status ok, and a
    4096^3 fine size reached the allocator once per case: each is refused before any work, naming the flag."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz", _ct_volume((17, 20, 19)))
    try:
        code = _cli(in_dir, tmp_path / "out", weights_dir, "--backend", "torch", flag, value)
    except SystemExit as exc:  # argparse's own exit for a bad value
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and flag in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "c1.nii.gz").exists()
    with pytest.raises(ValueError, match=flag.lstrip("-").replace("-", "_")):
        PredictOptions(**{flag.lstrip("-").replace("-", "_"): float(value)})


def test_an_empty_prediction_is_flagged(tmp_path, weights_dir, monkeypatch):
    """A scan the networks find no organ in (e.g. 0.1 x 0.1 x 10 mm voxels) gave an empty mask, status ok and no
    flag: it is flagged for review, with the reason in the row."""
    predictor = Predictor(PredictOptions(weights_dir, device="cpu", backend="torch"))
    real = predictor.predict

    def nothing_found(raw, meta, case_id):
        result = real(raw, meta, case_id)
        result.mask[:] = 0
        return result

    monkeypatch.setattr(predictor, "predict", nothing_found)
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz", _ct_volume((17, 20, 19)))
    summary = predict_folder(in_dir, tmp_path / "out", QUIET, predictor=predictor)
    row = _rows(tmp_path / "out")["c1"]
    assert summary["flagged"] == 1 and row["status"] == "ok" and row["flagged"] == "1"
    assert "empty mask" in row["error"]


def test_sigterm_stops_with_a_message_and_a_mask_without_its_row_is_redone(tmp_path, weights_dir):
    """SIGTERM exited 143 without a word, and a mask written just before it had no report row (a rerun showed it
    "skipped" with empty columns): it says what happened, and the rerun predicts such a case again."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for i in range(2):
        _write_ct(in_dir / f"c{i}_0000.nii.gz", _ct_volume((17, 20, 19), seed=i))
    script = ("import os, signal, sys\nimport predict\nfrom common.infer import predictor\nreal = predictor.Predictor"
              ".predict\ndef stop(self, *a):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(self, *a)\n"
              "predictor.Predictor.predict = stop\nsys.exit(predict.main(sys.argv[1:]))\n")
    args = ["-i", str(in_dir), "-o", str(out_dir), "--weights-dir", str(weights_dir), "--device", "cpu", "--quiet",
            "--backend", "torch"]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 143, result.stderr[-2000:]
    assert "interrupted by SIGTERM" in result.stderr and "Traceback" not in result.stderr
    assert _cli(in_dir, out_dir, weights_dir, "--backend", "torch") == 0
    rows = _rows(out_dir)
    assert rows["c0"]["status"] == rows["c1"]["status"] == "ok"
    # a mask whose row was never written (a kill between the two) is predicted again, so its row is complete
    (out_dir / ".predictions" / "c1.json").unlink()
    assert _cli(in_dir, out_dir, weights_dir, "--backend", "torch") == 0
    rows = _rows(out_dir)
    assert rows["c0"]["status"] == "skipped" and rows["c1"]["status"] == "ok" and rows["c1"]["coarse_box"] != ""


def test_a_file_given_as_the_input_folder_is_named_as_one(tmp_path, weights_dir, capsys):
    ct = _write_ct(tmp_path / "c1_0000.nii.gz", _ct_volume((17, 20, 19)))
    assert _cli(ct, tmp_path / "out", weights_dir) == 2
    assert f"{ct}: is a file, not a folder; give the image folder" in capsys.readouterr().err


def test_coarse_and_fine_models_of_different_label_sets_are_refused(tmp_path, capsys):
    """Two models whose labels would not match (FLARE22's 13 organs beside a 4-organ dataset) are a setup error
    naming both model files and both label sets; nothing is predicted."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c3_0000.nii.gz", _ct_volume((17, 20, 19)))
    four = LabelSet.from_dataset_json({"labels": {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3,
                                                  "kidney_right": 4}}, name="Dataset042_Phantoms")
    mixed = tmp_path / "mixed"
    export_tiny_stage(mixed, "coarse", "unet", 32, seed=1)
    export_tiny_stage(mixed, "fine", "efficient_seg_net", 32, seed=3, labels=four)
    assert _cli(in_dir, tmp_path / "out", mixed) == 2
    err = capsys.readouterr().err
    assert "efficient_fine_model/model.pt" in err and "base_coarse_model/model.pt" in err
    assert "Dataset042_Phantoms (1 liver, 2 spleen, 3 kidney_left, 4 kidney_right)" in err and "FLARE22" in err
    assert "one label set" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "c3.nii.gz").exists()

    export_tiny_stage(mixed, "coarse", "unet", 32, seed=1, labels=four)  # the same label set: predicted
    assert _cli(in_dir, tmp_path / "out", mixed) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "c3.nii.gz")))
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("channels", [4, 16, 20, 70])
def test_upsample_labels_of_any_label_count_equal_the_full_resize(channels):
    """A dataset's label set may have more than FLARE22's 13 labels: reach bits widen past 15 channels (where the
    2^C histogram would not fit), and past 63 every boundary chunk is resized densely. Before, 16 labels failed
    every case (bincount of overflowed int16 bits)."""
    torch.manual_seed(channels)
    in_shape, out_shape = (12, 14, 10), (25, 31, 17)
    coarse = torch.randn(1, channels, 4, 4, 4)
    scores = F.interpolate(coarse, size=in_shape, mode="trilinear", align_corners=True)[0] * 3 - 1
    full = F.interpolate(scores[None], size=out_shape, mode="trilinear", align_corners=True)[0]
    expected = probs_to_labels(full, 0.0)
    got = upsample_labels(scores, out_shape, 0.0, chunk_elements=900)
    assert (got != expected).sum() <= 1
    assert int(expected.max()) > min(channels - 3, 13)  # the high labels really occur
    assert got.dtype == torch.uint8 and tuple(got.shape) == out_shape


def test_option_typos_are_refused_before_any_model_is_loaded(tmp_path):
    """PredictOptions checks every option when it is made: a typo costs no model load (the folder is empty)."""
    with pytest.raises(ValueError, match="uncertainty must be auto, on or off, got 'maybe'"):
        PredictOptions(weights_dir=tmp_path, uncertainty="maybe")
    with pytest.raises(ValueError, match="fine_size"):
        PredictOptions(weights_dir=tmp_path, fine_size=40)
