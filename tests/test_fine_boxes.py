"""The boxes step's unlabeled regions (fine_efficient_seg.boxes): crops equal those of the whole volume, resume,
rerun, and the dataset folder holds no unlabeled whole-volume copy.

Unlabeled CTs are written here with SimpleITK: odd sizes, anisotropic spacing, non-zero origins, LPS and flipped
directions, one stored as float with fractional values (data_prepare rounds it to int16).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from common.config import PrepareConfig
from common.core.defaults import HU_WINDOW
from common.core.errors import InputError
from common.core.typed_config import load_config
from common.storage.lmdb_store import open_store
from data_prepare import run as prepare_run
from data_prepare.synthetic import write_dataset
from fine_efficient_seg import boxes as fine_boxes
from fine_efficient_seg.augment import FineAugmentSettings, fine_crop_slices, sample_fine_augmentation, sample_rng
from fine_efficient_seg.boxes import compute_boxes
from fine_efficient_seg.dataset import (
    FineCase,
    FineStream,
    SampleSpec,
    StreamSpec,
    fixed_crop_input,
    load_cases,
    read_crop,
)

REPO = Path(__file__).resolve().parents[1]
MARGIN_MM = 12.0  # a few voxels at these spacings, so the regions are true sub-volumes
SETTINGS = FineAugmentSettings(extend_size_mm=8.0, max_extend_size_mm=MARGIN_MM, random_extend_prob=1.0)
# (size x, y, z), spacing (x, y, z) mm, direction, stored as float
CASES = {
    "trainu_lps": ((41, 37, 23), (3.1, 2.7, 4.3), (1, 0, 0, 0, 1, 0, 0, 0, 1), False),
    "trainu_ras": ((33, 47, 19), (2.3, 3.3, 5.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), False),
    "trainu_zflip": ((29, 31, 27), (2.9, 2.9, 3.7), (-1, 0, 0, 0, 1, 0, 0, 0, -1), True),
}


def _write_ct(path: Path, size_xyz, spacing_xyz, direction, as_float: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1024, 1500, size=size_xyz[::-1]).astype(np.float32)
    if as_float:
        array += rng.uniform(-0.45, 0.45, size=array.shape).astype(np.float32)
    image = sitk.GetImageFromArray(array if as_float else array.astype(np.int16))
    image.SetSpacing(spacing_xyz)
    image.SetDirection(tuple(float(v) for v in direction))
    image.SetOrigin((-101.5 + seed, 37.25, -612.0))
    sitk.WriteImage(image, str(path))


def canonical_reference(path: str) -> np.ndarray:
    """The whole canonical int16 volume computed here, not by the project's reader: SimpleITK's array, rounded,
    x and y flipped where the direction's diagonal is positive, z where it is negative (canonical = RAS-like)."""
    image = sitk.ReadImage(path)
    array = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)
    d = np.array(image.GetDirection()).reshape(3, 3)
    flip_x, flip_y, flip_z = d[0, 0] > 0, d[1, 1] > 0, d[2, 2] < 0
    axes = [axis for axis, f in zip((0, 1, 2), (flip_z, flip_y, flip_x)) if f]
    return np.ascontiguousarray(np.flip(array, axis=axes) if axes else array)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """2 synthetic labeled cases + the hand-written unlabeled CTs, prepared by data_prepare."""
    data = tmp_path_factory.mktemp("boxes") / "dataset"
    write_dataset(data, labeled=2, unlabeled=0, val=0, seed=5, size="tiny")
    (data / "file_list" / "trainu_series_uids.txt").unlink(missing_ok=True)
    (data / "trainu_images").mkdir(exist_ok=True)
    for seed, (case_id, (size, spacing, direction, as_float)) in enumerate(CASES.items()):
        _write_ct(data / "trainu_images" / f"{case_id}_0000.nii.gz", size, spacing, direction, as_float, seed)
    cfg = load_config(PrepareConfig, REPO / "data_prepare" / "config.yaml",
                      [f"data_base_dir={data}", "coarse_size_zyx=[16,16,16]", "fine_size_zyx=[16,16,16]",
                       "num_workers=0"])
    assert prepare_run.main(cfg) == 0
    return data


def boxes_step(data: Path, out: Path, margin_mm: float = MARGIN_MM) -> dict:
    """The boxes step without a coarse model (body boxes, or the boxes already in the database)."""
    return compute_boxes(data / "db" / "seg_trainu", out / "db" / "unlabeled_boxes", data, None, torch.device("cpu"),
                         "fp32", regions_dir=out / "db" / "unlabeled_regions", region_margin_mm=margin_mm)


def reference_cases(data: Path, cases: list[FineCase], tmp: Path) -> list[FineCase]:
    """The same cases over the whole canonical volume computed by `canonical_reference` (the old layout)."""
    records = open_store(data / "db" / "seg_trainu").to_dict()
    out = []
    for case in cases:
        full = canonical_reference(records[case.case_id]["image_path"])
        assert full.shape == case.shape_zyx
        path = tmp / f"{case.case_id}_whole.npy"
        np.save(path, full)
        out.append(replace(case, region_path=path, region_offset_zyx=(0, 0, 0), region_shape_zyx=full.shape))
    return out


def seed_boxes(out: Path, chosen: dict[str, list[list[int]]]) -> None:
    store = open_store(out / "db" / "unlabeled_boxes", readonly=False)
    store.put_many({k: {"coarse_box": box, "coarse_box_source": "coarse_model"} for k, box in chosen.items()})
    store.close()


# ------------------------------------------------------------------------------------------- crops are unchanged


def test_dataset_holds_no_unlabeled_image_copy(prepared):
    records = open_store(prepared / "db" / "seg_trainu").to_dict()
    assert sorted(records) == sorted(CASES)
    assert all(r["region_path"] is None and r["region_shape_zyx"] is None for r in records.values())
    arrays = [p for p in prepared.rglob("*.npy") if p.name.startswith("trainu_")]
    assert arrays and all(p.parts[-3] == "coarse_image" for p in arrays)  # the 16^3 coarse arrays only
    with pytest.raises(InputError, match=r"lacks region_path.*run the boxes step"):
        load_cases(prepared / "db" / "seg_trainu", prepared, labeled=False, need_box=False)


@pytest.mark.parametrize("where", ["body", "edges", "middle"])
def test_training_and_uif_crops_equal_the_whole_volume_crops(prepared, tmp_path, where):
    """Every crop the fine stage draws for an unlabeled case (random extensions, the fixed extend_size_mm crop),
    the training stream's batches and UIF's input are bit-identical to those read from the whole volume."""
    shapes = {k: tuple(r["shape_zyx"]) for k, r in open_store(prepared / "db" / "seg_trainu").to_dict().items()}
    if where == "edges":  # boxes on the low and high faces, one a single voxel in a corner
        seed_boxes(tmp_path, {"trainu_lps": [[0, 4], [0, 36], [30, 40]],
                              "trainu_ras": [[18, 18], [46, 46], [32, 32]],
                              "trainu_zflip": [[0, 26], [3, 9], [0, 0]]})
    elif where == "middle":
        seed_boxes(tmp_path, {k: [[n // 3, n // 2] for n in shape] for k, shape in shapes.items()})
    summary = boxes_step(prepared, tmp_path)
    assert summary["regions"] == 3 and summary["computed"] == (3 if where == "body" else 0)
    cases = load_cases(prepared / "db" / "seg_trainu", prepared, labeled=False,
                       boxes_db=tmp_path / "db" / "unlabeled_boxes")
    whole = reference_cases(prepared, cases, tmp_path)
    if where == "middle":
        for case in cases:  # true sub-volumes, stored under the experiment's folder
            assert all(n < s for n, s in zip(case.region_shape_zyx, case.shape_zyx))
            assert case.region_path.parent == (tmp_path / "db" / "unlabeled_regions").absolute()
            assert np.load(case.region_path).nbytes < 0.5 * np.prod(case.shape_zyx) * 2
    for case, ref in zip(cases, whole):
        full = np.load(ref.region_path)
        for n in range(40):
            aug = sample_fine_augmentation(sample_rng(7, "unlabeled", n), case.spacing_zyx, SETTINGS, labeled=False,
                                           num_organs=13)
            slices = fine_crop_slices(case.box, case.spacing_zyx, case.shape_zyx, aug, SETTINGS)
            crop, labels = read_crop(case, slices)
            assert labels is None and crop.dtype == np.int16
            np.testing.assert_array_equal(crop, full[slices])
        for extend_mm in (0.0, SETTINGS.extend_size_mm, MARGIN_MM):
            assert torch.equal(fixed_crop_input(case, (9, 11, 13), HU_WINDOW, extend_mm, "cpu"),
                               fixed_crop_input(ref, (9, 11, 13), HU_WINDOW, extend_mm, "cpu"))
    kwargs = dict(stream=StreamSpec("unlabeled", seed=3, batch_size=2, labeled=False),
                  sample=SampleSpec((9, 11, 13), HU_WINDOW, replace(SETTINGS, random_extend_prob=0.5)), device="cpu",
                  rank=0, world_size=1)
    new, old = FineStream(cases, **kwargs)(0), FineStream(whole, **kwargs)(0)
    for _ in range(4):
        assert torch.equal(next(new), next(old))
    new.close(), old.close()


# ------------------------------------------------------------------------------------------- resume and rerun


def _region_stamps(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "db" / "unlabeled_regions").glob("*.npy"))}


def test_rerun_writes_nothing_and_a_killed_step_resumes(prepared, tmp_path, monkeypatch):
    boxes_db = tmp_path / "db" / "unlabeled_boxes"
    regions = tmp_path / "db" / "unlabeled_regions"
    # killed after the first case's record was stored (batches of one), with a temporary file left behind
    monkeypatch.setattr(fine_boxes, "WRITE_BATCH", 1)
    real_read = fine_boxes.read_canonical_ct
    calls = []

    def read_then_die(path):
        calls.append(path)
        if len(calls) == 2:
            (regions / ".trainu_ras.npy.a1b2c3d4.tmp.npy").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_read(path)

    monkeypatch.setattr(fine_boxes, "read_canonical_ct", read_then_die)
    with pytest.raises(KeyboardInterrupt):
        boxes_step(prepared, tmp_path)
    assert len(open_store(boxes_db).keys()) == 1
    monkeypatch.setattr(fine_boxes, "read_canonical_ct", real_read)
    resumed = boxes_step(prepared, tmp_path)
    assert resumed["skipped"] == 1 and resumed["computed"] == 2 and resumed["regions"] == 2
    assert sorted(p.name for p in regions.iterdir()) == sorted(f"{k}.npy" for k in CASES)  # temp file gone
    records = open_store(boxes_db).to_dict()
    # the same inputs again: nothing is read or written
    stamps = _region_stamps(tmp_path)
    again = boxes_step(prepared, tmp_path)
    assert again["computed"] == 0 and again["regions"] == 0 and again["skipped"] == 3
    assert _region_stamps(tmp_path) == stamps and open_store(boxes_db).to_dict() == records
    # a lost region file is cut again from the stored box (no box computed), the others stay
    (regions / "trainu_lps.npy").unlink()
    lost = boxes_step(prepared, tmp_path)
    assert lost["computed"] == 0 and lost["regions"] == 1
    assert {k: v for k, v in _region_stamps(tmp_path).items() if k != "trainu_lps.npy"} == {
        k: v for k, v in stamps.items() if k != "trainu_lps.npy"}
    assert open_store(boxes_db).to_dict() == records
    # another margin: every region again, the boxes kept
    wider = boxes_step(prepared, tmp_path, margin_mm=20.0)
    assert wider["computed"] == 0 and wider["regions"] == 3
    after = open_store(boxes_db).to_dict()
    assert all(after[k]["coarse_box"] == records[k]["coarse_box"] and after[k]["region_margin_mm"] == 20.0
               for k in CASES)


def test_changed_raw_image_is_refused_with_its_path(prepared, tmp_path):
    record = open_store(prepared / "db" / "seg_trainu").get("trainu_ras")
    image = Path(record["image_path"])
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(InputError, match=r"trainu_ras_0000\.nii\.gz.*changed since data_prepare"):
            boxes_step(prepared, tmp_path)
    finally:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_data_prepare_rerun_keeps_the_experiment_usable(prepared, tmp_path):
    """data_prepare rewrites its databases without any field of the boxes step, and the experiment's boxes and
    regions stay valid: no stage has to preserve another's fields."""
    seg_trainu = prepared / "db" / "seg_trainu"
    before = open_store(seg_trainu).to_dict()
    boxes_step(prepared, tmp_path)
    boxes_db = tmp_path / "db" / "unlabeled_boxes"
    cases = load_cases(seg_trainu, prepared, labeled=False, boxes_db=boxes_db)
    cfg = load_config(PrepareConfig, REPO / "data_prepare" / "config.yaml",
                      [f"data_base_dir={prepared}", "coarse_size_zyx=[16,16,16]", "fine_size_zyx=[16,16,16]",
                       "num_workers=0", "overwrite=true"])
    assert prepare_run.main(cfg) == 0
    after = open_store(seg_trainu).to_dict()
    assert after == before
    assert not any("coarse_box" in r or r["region_path"] for r in after.values())
    assert boxes_step(prepared, tmp_path)["regions"] == 0
    assert load_cases(seg_trainu, prepared, labeled=False, boxes_db=boxes_db) == cases


def test_training_refuses_regions_narrower_than_its_crops(prepared, tmp_path):
    """Regions cut with a smaller margin than crop.max_extend_size_mm would clip crops silently: round 1 refuses
    them and names the fix; the boxes step of that config cuts them again (keeping the boxes)."""
    from common.config import FineTrainConfig
    from fine_efficient_seg.train import main

    boxes_step(prepared, tmp_path, margin_mm=MARGIN_MM)
    cfg = load_config(FineTrainConfig, REPO / "fine_efficient_seg" / "config.yaml",
                      [f"data_base_dir={prepared}", f"output_dir={tmp_path}", "device=cpu", "data.size_zyx=[32,32,32]",
                       "model.channels=[2,4,4,8,8]", "amp.precision=fp32", "boxes.coarse_model_dir=null",
                       f"crop.max_extend_size_mm={2 * MARGIN_MM}", "step=round1"])
    with pytest.raises(InputError, match=r"cut with less than crop\.max_extend_size_mm=24\.0; run the boxes step"):
        main(cfg)
    summary = main(replace(cfg, step="boxes"))["boxes"]
    assert summary["computed"] == 0 and summary["regions"] == 3
    cases = load_cases(prepared / "db" / "seg_trainu", prepared, labeled=False,
                       boxes_db=tmp_path / "db" / "unlabeled_boxes")
    assert {c.region_margin_mm for c in cases} == {2 * MARGIN_MM}


def test_unlabeled_disk_benchmark_reports_before_and_after(prepared, tmp_path, monkeypatch, capsys):
    """benchmarks/unlabeled_disk.py: the whole-volume baseline is what data_prepare used to write (the volume as
    int16 .npy) and the box region is the file the boxes step wrote."""
    from benchmarks import unlabeled_disk

    monkeypatch.setattr("sys.argv", ["unlabeled_disk", "--data", str(prepared), "--out", str(tmp_path / "fine"),
                                     "--boxes", "body"])
    unlabeled_disk.main_cli()
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| trainu_")]
    assert len(rows) == 3
    records = open_store(prepared / "db" / "seg_trainu").to_dict()
    for row in rows:
        case_id = row[0].strip("| ")
        whole = 128 + 2 * int(np.prod(records[case_id]["shape_zyx"]))  # .npy header + int16 voxels
        coarse = Path(records[case_id]["coarse_image_path"]).stat().st_size
        assert int(row[3].replace(",", "")) == coarse + whole
        region = Path(tmp_path / "fine" / "db" / "unlabeled_regions" / f"{case_id}.npy").stat().st_size
        assert row[4].startswith(f"{coarse + region:,} (region {region:,})")
