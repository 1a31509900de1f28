"""Tests of the data_prepare stage: end to end on tiny synthetic and real CTs, bad inputs, reruns, the split."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.config import PrepareConfig
from common.core.typed_config import load_config
from common.storage.image_io import canonical_flips, read_image, read_mask, to_canonical
from common.storage.lmdb_store import open_store
from common.volume.boxes import organ_bbox
from common.volume.resize import resize_hu_int16, resize_mask
from data_prepare.run import STAGE_DIR, fold_draw, main, split_5fold, split_fold1
from data_prepare.synthetic import write_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["coarse_size_zyx=[32,32,32]", "fine_size_zyx=[48,48,48]"]
ORIGINAL_KEYS = ("image_path", "mask_path", "smooth_mask_path", "coarse_image_path", "coarse_mask_path",
                 "fine_image_path", "fine_mask_path")
OUR_KEYS = ("spacing_zyx", "shape_zyx", "direction", "origin", "flips", "organ_bbox", "region_path",
            "region_mask_path", "region_offset_zyx", "region_shape_zyx", "labels_present")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "dataset"
    write_dataset(out, labeled=4, unlabeled=2, val=1, seed=3, size="tiny")
    return out


@pytest.fixture()
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset (tests add bad files and outputs to it)."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "dataset"))


def config(base: Path, *overrides: str) -> PrepareConfig:
    return load_config(PrepareConfig, STAGE_DIR / "config.yaml",
                       [f"data_base_dir={base}", "num_workers=1", *SMALL, *overrides])


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def canonical_case(record: dict) -> tuple[np.ndarray, np.ndarray | None]:
    image, meta = read_image(record["image_path"])
    flips = canonical_flips(meta)
    mask = None
    if record["mask_path"]:
        mask = np.ascontiguousarray(to_canonical(read_mask(record["mask_path"], meta)[0], flips))
    return np.ascontiguousarray(to_canonical(image, flips)), mask


def check_labeled_record(case_id: str, rec: dict, coarse=(32, 32, 32), fine=(48, 48, 48)) -> None:
    for key in ORIGINAL_KEYS + OUR_KEYS:
        assert key in rec, key
    assert rec["smooth_mask_path"] is None and rec["labeled"] is True
    for key in ("coarse_image_path", "coarse_mask_path", "fine_image_path", "fine_mask_path", "region_path",
                "region_mask_path"):
        assert os.path.isabs(rec[key]) and rec[key].endswith(f"{case_id}.npy"), rec[key]
    image, mask = canonical_case(rec)
    assert list(image.shape) == rec["shape_zyx"]
    assert rec["organ_bbox"] == [list(p) for p in organ_bbox(mask)]
    assert rec["labels_present"] == sorted(int(v) for v in np.unique(mask) if v)

    coarse_image = np.load(rec["coarse_image_path"])
    coarse_mask = np.load(rec["coarse_mask_path"])
    assert coarse_image.dtype == np.int16 and coarse_image.shape == coarse
    assert coarse_mask.dtype == np.uint8 and coarse_mask.shape == coarse
    np.testing.assert_array_equal(coarse_image, resize_hu_int16(image, coarse))
    np.testing.assert_array_equal(coarse_mask, resize_mask(mask, coarse))

    crop = tuple(slice(a, b) for a, b in rec["fine_crop_zyx"])
    for (lo, hi), s in zip(rec["organ_bbox"], crop):
        assert s.start <= lo and hi < s.stop  # the fine crop holds the whole organ box
    fine_image = np.load(rec["fine_image_path"])
    fine_mask = np.load(rec["fine_mask_path"])
    assert fine_image.dtype == np.int16 and fine_image.shape == fine and fine_mask.shape == fine
    np.testing.assert_array_equal(fine_image, resize_hu_int16(image[crop], fine))
    np.testing.assert_array_equal(fine_mask, resize_mask(mask[crop], fine))

    region = tuple(slice(o, o + n) for o, n in zip(rec["region_offset_zyx"], rec["region_shape_zyx"]))
    region_image = np.load(rec["region_path"], mmap_mode="r")
    region_mask = np.load(rec["region_mask_path"], mmap_mode="r")
    assert region_image.dtype == np.int16 and region_mask.dtype == np.uint8
    np.testing.assert_array_equal(region_image, image[region])
    np.testing.assert_array_equal(region_mask, mask[region])
    for (lo, hi), s, sp, n in zip(rec["organ_bbox"], region, rec["spacing_zyx"], rec["shape_zyx"]):
        m = int(40.0 / sp)
        assert s.start == max(0, lo - m) and s.stop == min(n, hi + m + 1)


# ---------------------------------------------------------------------------------------------------- end to end


def test_end_to_end_tiny_synthetic(dataset: Path) -> None:
    inputs_before = digest(dataset)
    assert main(config(dataset)) == 0
    db = dataset / "db"

    raw_train = open_store(db / "seg_raw_train").to_dict()
    assert sorted(raw_train) == [f"train_{i:03d}" for i in range(4)]
    assert raw_train["train_001"] == {"image_path": str(dataset / "train_images" / "train_001_0000.nii.gz"),
                                      "mask_path": str(dataset / "train_mask" / "train_001.nii.gz")}
    raw_u = open_store(db / "seg_raw_trainu").to_dict()
    assert sorted(raw_u) == ["trainu_0000", "trainu_0001"] and raw_u["trainu_0000"]["mask_path"] is None
    assert open_store(db / "seg_raw_test").to_dict() == {
        "validation_000": {"image_path": str(dataset / "val_images" / "validation_000_0000.nii.gz"),
                           "mask_path": None}}

    labeled = open_store(db / "seg_pre-process_database").to_dict()
    assert sorted(labeled) == sorted(raw_train)
    for case_id, rec in labeled.items():
        check_labeled_record(case_id, rec)

    unlabeled = open_store(db / "segu_pre-process_database").to_dict()
    assert sorted(unlabeled) == sorted(raw_u)
    for case_id, rec in unlabeled.items():
        assert rec["labeled"] is False
        # no unlabeled fine_image and no unlabeled region: the fine stage's boxes step cuts box + margin from the
        # raw image into its own output_dir once the box is known
        for key in ("mask_path", "coarse_mask_path", "fine_image_path", "fine_mask_path", "region_path",
                    "region_mask_path", "region_offset_zyx", "region_shape_zyx", "region_margin_mm", "organ_bbox"):
            assert rec[key] is None, key
        image, _ = canonical_case(rec)
        assert rec["shape_zyx"] == list(image.shape)
        np.testing.assert_array_equal(np.load(rec["coarse_image_path"]), resize_hu_int16(image, (32, 32, 32)))
    # the dataset holds no whole-volume copy of an unlabeled case
    assert sorted(p.name for p in (dataset / "region_image").iterdir()) == sorted(f"{k}.npy" for k in labeled)
    assert not [p for p in dataset.rglob("*.npy") if "trainu_" in p.name and "coarse_image" not in p.parts]

    train = open_store(db / "seg_train_fold_1").to_dict()
    val = open_store(db / "seg_val_fold_1").to_dict()
    assert sorted(val) == sorted(k for k in labeled if fold_draw(k, 0) < 0.2)  # each case by its own id
    assert set(train) | set(val) == set(labeled) and not set(train) & set(val)
    assert all(train[k] == labeled[k] for k in train) and all(val[k] == labeled[k] for k in val)
    assert open_store(db / "seg_trainu").to_dict() == unlabeled
    assert not (db / "seg_train_fold_2").exists()
    assert not (db / "failed_cases.txt").exists()
    assert (db / "split.json").is_file() and (db / "data_prepare.log").is_file()

    after = digest(dataset)
    assert {k: v for k, v in after.items() if k in inputs_before} == inputs_before  # inputs never modified
    assert not [p for p in dataset.rglob(".*tmp*")]  # no temporary files left behind

    # 5-fold on the same prepared data: folds 2..5 appear, their validation sets partition the labeled cases
    assert main(config(dataset, "split_5fold=true")) == 0
    vals = [set(open_store(db / f"seg_val_fold_{k}").keys()) for k in range(1, 6)]
    assert set().union(*vals) == set(labeled) and sum(len(v) for v in vals) == len(labeled)
    assert main(config(dataset)) == 0
    assert not (db / "seg_val_fold_3").exists()  # stale folds removed when 5-fold is off again


def test_rerun_skips_and_overwrite_redoes(dataset: Path) -> None:
    assert main(config(dataset)) == 0
    labeled = open_store(dataset / "db" / "seg_pre-process_database").to_dict()
    npy = sorted((dataset / "coarse_image").rglob("*.npy")) + sorted((dataset / "region_image").rglob("*.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in npy}

    assert main(config(dataset)) == 0
    assert {p: p.stat().st_mtime_ns for p in npy} == stamps  # nothing rewritten

    # a changed input file is prepared again, the others are skipped
    touched = Path(labeled["train_002"]["image_path"])
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert main(config(dataset)) == 0
    changed = {p for p in npy if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {dataset / "coarse_image" / "32_32_32" / "train_002.npy",
                       dataset / "region_image" / "train_002.npy"}

    # a missing output file makes its case unfinished
    (dataset / "region_image" / "train_001.npy").unlink()
    assert main(config(dataset)) == 0
    assert (dataset / "region_image" / "train_001.npy").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in npy}
    assert main(config(dataset, "overwrite=true")) == 0
    assert all(p.stat().st_mtime_ns != stamps[p] for p in npy)  # everything redone

    # other sizes are other outputs: a new size redoes every case into its own folder
    assert main(config(dataset, "coarse_size_zyx=[16,16,16]")) == 0
    rec = open_store(dataset / "db" / "seg_pre-process_database").get("train_000")
    assert rec["coarse_image_path"].endswith("coarse_image/16_16_16/train_000.npy")
    assert np.load(rec["coarse_image_path"]).shape == (16, 16, 16)


def test_rerun_removes_the_whole_volume_region_of_an_earlier_version(dataset: Path) -> None:
    """An unlabeled record of the earlier layout (a whole-volume region_image/<id>.npy) is prepared again, its
    record loses the region and the 100+ MB file is deleted; labeled cases are not redone."""
    assert main(config(dataset)) == 0
    db = dataset / "db"
    store = open_store(db / "segu_pre-process_database", readonly=False)
    old = store.get("trainu_0000")
    image, _ = canonical_case(old)
    legacy = dataset / "region_image" / "trainu_0000.npy"
    np.save(legacy, image)
    store.put_many({"trainu_0000": {**old, "region_path": str(legacy), "region_offset_zyx": [0, 0, 0],
                                    "region_shape_zyx": list(image.shape)}})
    store.close()
    labeled_npy = sorted((dataset / "region_image").glob("train_*.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in labeled_npy}
    assert main(config(dataset)) == 0
    assert not legacy.exists()
    assert open_store(db / "segu_pre-process_database").get("trainu_0000")["region_path"] is None
    assert open_store(db / "seg_trainu").get("trainu_0000")["region_path"] is None
    assert {p: p.stat().st_mtime_ns for p in labeled_npy} == stamps


# ---------------------------------------------------------------------------------------------------- bad inputs


def _write(array: np.ndarray, path: Path, like: sitk.Image | None = None, spacing=None) -> None:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _write_bad_inputs(dataset: Path) -> list[str]:
    """One labeled case of each kind of bad input (listed in the file list), a stray file; returns their ids."""
    images, masks = dataset / "train_images", dataset / "train_mask"
    good_image = sitk.ReadImage(str(images / "train_000_0000.nii.gz"))
    good_mask = sitk.ReadImage(str(masks / "train_000.nii.gz"))
    image_array = sitk.GetArrayFromImage(good_image)
    mask_array = sitk.GetArrayFromImage(good_mask)

    data = (images / "train_001_0000.nii.gz").read_bytes()
    (images / "bad_trunc_0000.nii.gz").write_bytes(data[: len(data) // 2])
    shutil.copy(masks / "train_001.nii.gz", masks / "bad_trunc.nii.gz")

    _write(image_array[5], images / "bad_2d_0000.nii.gz")
    _write(mask_array[5], masks / "bad_2d.nii.gz")

    sitk.WriteImage(sitk.JoinSeries([good_image, good_image]), str(images / "bad_4d_0000.nii.gz"))
    shutil.copy(masks / "train_000.nii.gz", masks / "bad_4d.nii.gz")

    shutil.copy(images / "train_000_0000.nii.gz", images / "bad_grid_0000.nii.gz")
    spacing = good_mask.GetSpacing()
    _write(mask_array, masks / "bad_grid.nii.gz", like=good_mask, spacing=(spacing[0], spacing[1], spacing[2] * 2))

    shutil.copy(images / "train_000_0000.nii.gz", images / "bad_label_0000.nii.gz")
    label20 = mask_array.copy()
    label20[label20 == 3] = 20
    _write(label20, masks / "bad_label.nii.gz", like=good_mask)

    shutil.copy(images / "train_000_0000.nii.gz", images / "bad_empty_0000.nii.gz")
    _write(np.zeros_like(mask_array), masks / "bad_empty.nii.gz", like=good_mask)

    shutil.copy(images / "train_000_0000.nii.gz", images / "bad_nomask_0000.nii.gz")
    (images / "notes.txt").write_text("a stray file")

    bad = ["bad_trunc", "bad_2d", "bad_4d", "bad_grid", "bad_label", "bad_empty", "bad_nomask", "bad_missing"]
    with open(dataset / "file_list" / "train_series_uids.txt", "a", encoding="utf-8") as f:
        f.write("".join(f"{case_id}\n" for case_id in bad))
    return bad


def test_bad_inputs_fail_with_messages_and_the_rest_finishes(dataset: Path) -> None:
    images, masks = dataset / "train_images", dataset / "train_mask"
    bad = _write_bad_inputs(dataset)
    assert main(config(dataset, "num_workers=2")) == 1  # worker processes report failures too

    report = (dataset / "db" / "failed_cases.txt").read_text(encoding="utf-8")
    lines = {line.split("\t", 1)[0]: line.split("\t", 1)[1] for line in report.splitlines()
             if not line.startswith("#")}
    assert sorted(lines) == sorted(bad)
    expected = {
        "bad_trunc": ("bad_trunc_0000.nii.gz", "truncated"),
        "bad_2d": ("bad_2d_0000.nii.gz", "2D image"),
        "bad_4d": ("bad_4d_0000.nii.gz", "4D image"),
        "bad_grid": ("bad_grid.nii.gz", "not on the image's grid: spacing"),
        "bad_label": ("bad_label.nii.gz", "labels outside 0..13: 20"),
        "bad_empty": ("bad_empty.nii.gz", "mask is empty"),
        "bad_nomask": ("train_mask", "no mask for case 'bad_nomask'"),
        "bad_missing": ("train_images", "no image for case 'bad_missing'"),
    }
    for case_id, (file_part, problem) in expected.items():
        assert file_part in lines[case_id] and problem in lines[case_id], lines[case_id]
    assert "notes.txt: not an image file" in report

    labeled = open_store(dataset / "db" / "seg_pre-process_database")
    assert labeled.keys() == [f"train_{i:03d}" for i in range(4)]
    folds = set(open_store(dataset / "db" / "seg_train_fold_1").keys()) | set(
        open_store(dataset / "db" / "seg_val_fold_1").keys())
    assert folds == set(labeled.keys())
    assert len(open_store(dataset / "db" / "segu_pre-process_database")) == 2

    # fixing the inputs and rerunning prepares the rest and clears the report
    for case_id in bad:
        for p in list(images.glob(f"{case_id}_0000.nii.gz")) + list(masks.glob(f"{case_id}.nii.gz")):
            p.unlink()
    (images / "notes.txt").unlink()
    (dataset / "file_list" / "train_series_uids.txt").write_text("".join(f"train_{i:03d}\n" for i in range(4)))
    assert main(config(dataset)) == 0
    assert not (dataset / "db" / "failed_cases.txt").exists()


def test_stray_file_only_warns_and_id_clash_fails(dataset: Path) -> None:
    shutil.rmtree(dataset / "file_list")  # without lists every image in the folders is a case
    (dataset / "trainu_images" / "README.md").write_text("stray")
    shutil.copy(dataset / "train_images" / "train_000_0000.nii.gz", dataset / "trainu_images" / "train_000.nii.gz")
    assert main(config(dataset)) == 1
    report = (dataset / "db" / "failed_cases.txt").read_text(encoding="utf-8")
    assert "README.md: not an image file" in report
    assert "also a labeled case" in report
    assert sorted(open_store(dataset / "db" / "seg_trainu").keys()) == ["trainu_0000", "trainu_0001"]
    (dataset / "trainu_images" / "train_000.nii.gz").unlink()
    assert main(config(dataset)) == 0  # a stray file alone is a warning, not a failure


def test_missing_dataset_and_config_errors(tmp_path: Path) -> None:
    assert main(config(tmp_path / "nowhere")) == 2
    (tmp_path / "empty").mkdir()
    assert main(config(tmp_path / "empty")) == 2  # no train_images folder
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(["sh", str(REPO_ROOT / "data_prepare" / "run.sh"), "num_wrkers=3"], env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 2
    assert "num_wrkers" in proc.stderr and "num_workers" in proc.stderr


# ---------------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_and_partitions() -> None:
    ids = [f"case_{i:03d}" for i in range(200)]
    train, val = split_fold1(ids, 0.2, 0)
    assert 25 <= len(val) <= 55 and sorted(train + val) == ids and not set(train) & set(val)
    assert split_fold1(list(reversed(ids)), 0.2, 0) == (train, val)  # order of the input does not matter
    assert split_fold1(ids, 0.2, 1) != (train, val)
    folds = split_5fold(train, val, 0.2, 0)
    vals = [set(val)] + [set(folds[k][1]) for k in range(2, 6)]
    assert sum(len(v) for v in vals) == 200 and set().union(*vals) == set(ids)
    for k in range(2, 6):
        assert not set(folds[k][0]) & set(folds[k][1]) and set(folds[k][0]) | set(folds[k][1]) == set(ids)
    assert split_fold1(["a", "b"], 0.2, 0)[1].__len__() == 1  # an empty side takes the case nearest the threshold
    assert split_fold1(["a"], 0.2, 0) == (["a"], ["a"])
    assert split_fold1([], 0.2, 0) == ([], [])
    assert split_fold1(ids, 0.0, 0) == (ids, [])


def test_a_failing_or_fixed_case_moves_no_other_case() -> None:
    ids = [f"case_{i:02d}" for i in range(40)]
    train, val = split_fold1(ids, 0.2, 0)
    folds = split_5fold(train, val, 0.2, 0)
    for gone in (val[0], train[0], train[-1]):  # it fails (or is fixed: the same two splits the other way round)
        rest = [i for i in ids if i != gone]
        train2, val2 = split_fold1(rest, 0.2, 0)
        assert val2 == [i for i in val if i != gone] and train2 == [i for i in train if i != gone]
        folds2 = split_5fold(train2, val2, 0.2, 0)
        for k in range(2, 6):
            assert folds2[k][1] == [i for i in folds[k][1] if i != gone]


# ---------------------------------------------------------------------------------------------------- real CTs


def test_real_cts_prepare(real_data_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "dataset"
    (base / "train_images").mkdir(parents=True)
    (base / "train_mask").mkdir()
    for case in ("case_0001", "case_0002", "case_0003"):
        shutil.copy(real_data_dir / f"{case}.nii.gz", base / "train_images" / f"{case}_0000.nii.gz")
        shutil.copy(real_data_dir / f"{case}_mask.nii.gz", base / "train_mask" / f"{case}.nii.gz")
    assert main(config(base)) == 0
    labeled = open_store(base / "db" / "seg_pre-process_database").to_dict()
    assert sorted(labeled) == ["case_0001", "case_0002", "case_0003"]
    for case_id, rec in labeled.items():
        check_labeled_record(case_id, rec)
    assert labeled["case_0001"]["flips"] == [False, False, False]  # RAS-stored
    assert labeled["case_0002"]["flips"] == [False, True, True]  # LPS-stored
    assert labeled["case_0002"]["labels_present"] == [1, 3, 4, 5, 6, 7, 11]
    assert labeled["case_0001"]["labels_present"] == [k for k in range(1, 14) if k != 10]
    assert labeled["case_0002"]["shape_zyx"] == [20, 512, 512]
    assert labeled["case_0002"]["spacing_zyx"] == pytest.approx([2.0, 0.9766, 0.9766], abs=1e-4)
    assert labeled["case_0001"]["hu_range"][0] < -1000


def test_a_rerun_makes_the_split_databases_exactly_the_prepared_records(dataset: Path) -> None:
    """No other stage writes the dataset's databases (the fine stage keeps its boxes and UIF pool under its
    output_dir), so a rerun simply rewrites them: a foreign key put there is not preserved."""
    assert main(config(dataset)) == 0
    trainu = open_store(dataset / "db" / "seg_trainu")
    writer = type(trainu)(trainu.path, readonly=False)
    record = writer.get("trainu_0000")
    writer.put("trainu_0000", {**record, "coarse_box": [[1, 2], [3, 4], [5, 6]]})
    writer.close()
    assert main(config(dataset)) == 0
    assert open_store(dataset / "db" / "seg_trainu").get("trainu_0000") == record


def test_config_yaml_matches_the_schema_and_documents_every_key() -> None:
    cfg = load_config(PrepareConfig, STAGE_DIR / "config.yaml")
    assert cfg == PrepareConfig(data_base_dir=cfg.data_base_dir)
    assert cfg.data_base_dir == str((STAGE_DIR / ".." / "dataset").resolve())
    for line in (STAGE_DIR / "config.yaml").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            assert "#" in line, f"undocumented key: {line}"


# ---------------------------------------------------------------------------------------------------- issue 14


def _spawned_children(parent: int) -> list[int]:
    """Worker processes (multiprocessing spawn) whose parent is `parent` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc to find the workers")
def test_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    import signal
    import sys
    import time

    # Each case's image is a FIFO nobody writes to: the workers block reading it, as on a slow case.
    fifos = []
    for i in range(2):
        fifo = tmp_path / f"c{i}.nii.gz"
        os.mkfifo(fifo)
        fifos.append(str(fifo))
    script = (
        "import sys; from data_prepare.run import CaseTask, run_tasks; "
        f"tasks = [CaseTask(f'c{{i}}', 'unlabeled', p, None, {str(tmp_path)!r}, (16, 16, 16), (16, 16, 16), 1.0, "
        f"1.0) for i, p in enumerate({fifos!r})]; run_tasks(tasks, 2)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.5)
            workers = _spawned_children(parent.pid)
        assert len(workers) == 2, "the workers did not start"
        time.sleep(2)  # let them reach the blocking read (and the watch thread start)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in workers if _alive(p)], "workers outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_corrupt_database_is_a_setup_error(dataset: Path, caplog) -> None:
    assert main(config(dataset)) == 0
    data = dataset / "db" / "seg_pre-process_database" / "data.mdb"
    data.write_bytes(np.random.default_rng(0).integers(0, 256, data.stat().st_size, dtype=np.uint8).tobytes())
    caplog.clear()
    assert main(config(dataset)) == 2
    assert "seg_pre-process_database: database is damaged" in caplog.text
    assert "delete this folder and run data_prepare again" in caplog.text


def test_unwritable_output_folder_fails_before_any_case(dataset: Path, caplog, monkeypatch) -> None:
    import tempfile

    import data_prepare.run as run

    region = dataset / "region_image"
    region.mkdir()
    region.chmod(0o555)
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):  # as the read-only folder would for a non-root user
        if dir is not None and Path(dir) == region:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(run, "prepare_case", lambda task: pytest.fail("prepared a case into a read-only folder"))
    try:
        assert main(config(dataset)) == 2
    finally:
        region.chmod(0o755)
    assert f"{region}: cannot write into the output folder" in caplog.text


def test_rerun_removes_temporaries_of_a_killed_run(dataset: Path) -> None:
    assert main(config(dataset)) == 0
    leftovers = [dataset / "region_image" / ".case_0001.npy.a1b2c3d4.tmp.npy",
                 dataset / "coarse_image" / "32_32_32" / ".x.npy.zzzzzzzz.tmp.npy",
                 dataset / "db" / ".split.json.q1w2e3r4.tmp.json"]
    for path in leftovers:
        path.write_bytes(b"\\0" * 1000)
    keep = dataset / "region_image" / ".notes"
    keep.write_text("not ours")
    assert main(config(dataset)) == 0
    assert not [p for p in leftovers if p.exists()] and keep.exists()


def test_nan_slab_absurd_spacing_and_duplicate_ids_fail_their_case(dataset: Path) -> None:
    shutil.rmtree(dataset / "file_list")  # every image of the folders is a case
    images, masks = dataset / "train_images", dataset / "train_mask"
    good_image = sitk.ReadImage(str(images / "train_000_0000.nii.gz"))
    good_mask = sitk.ReadImage(str(masks / "train_000.nii.gz"))
    slab = sitk.GetArrayFromImage(good_image).astype(np.float32)
    slab[2:12] = np.nan  # a 10-slice NaN slab: SimpleITK's NIfTI reader would make it 0 HU
    _write(slab, images / "nan_slab_0000.nii.gz", like=good_image)
    shutil.copy(masks / "train_000.nii.gz", masks / "nan_slab.nii.gz")
    for name, spacing in (("huge", 1e6), ("tiny", 1e-6)):
        _write(sitk.GetArrayFromImage(good_image), images / f"{name}.mha", like=good_image,
               spacing=(spacing, 0.8, 2.0))
        _write(sitk.GetArrayFromImage(good_mask), masks / f"{name}.mha", like=good_mask, spacing=(spacing, 0.8, 2.0))
    shutil.copy(images / "train_001_0000.nii.gz", images / "train_001.nii.gz")  # same id as train_001_0000
    before = digest(dataset)
    assert main(config(dataset)) == 1
    report = (dataset / "db" / "failed_cases.txt").read_text(encoding="utf-8")
    lines = {line.split("\t", 1)[0]: line.split("\t", 1)[1] for line in report.splitlines()
             if not line.startswith("#")}
    assert sorted(lines) == ["huge", "nan_slab", "tiny", "train_001"]
    assert "nan_slab_0000.nii.gz" in lines["nan_slab"] and "NaN or infinite" in lines["nan_slab"]
    for name in ("huge", "tiny"):
        assert f"{name}.mha" in lines[name] and "implausible voxel spacing" in lines[name]
    assert "train_001.nii.gz" in lines["train_001"] and "train_001_0000.nii.gz" in lines["train_001"]
    labeled = open_store(dataset / "db" / "seg_pre-process_database").keys()
    assert labeled == ["train_000", "train_002", "train_003"]
    after = digest(dataset)
    assert all(after[k] == v for k, v in before.items())  # no input changed


def test_a_constant_image_fails_by_the_same_rule_as_predict(dataset: Path) -> None:
    images, masks = dataset / "train_images", dataset / "train_mask"
    good_image = sitk.ReadImage(str(images / "train_000_0000.nii.gz"))
    _write(np.full(sitk.GetArrayFromImage(good_image).shape, -1024, np.int16), images / "air_0000.nii.gz",
           like=good_image)
    shutil.copy(masks / "train_000.nii.gz", masks / "air.nii.gz")
    with open(dataset / "file_list" / "train_series_uids.txt", "a", encoding="utf-8") as f:
        f.write("air\n")
    assert main(config(dataset)) == 1
    report = (dataset / "db" / "failed_cases.txt").read_text(encoding="utf-8")
    assert "air_0000.nii.gz: non-CT intensities: every voxel is -1024" in report


# ------------------------------------------------------------------------------------------------ issue 21


def test_a_npy_write_cut_short_fails_its_case_cleanly_and_a_rerun_redoes_it(dataset: Path, caplog,
                                                                            monkeypatch) -> None:
    """A full disk or `ulimit -f`: numpy raises ("N requested and M written") or a write comes out short. The case
    fails with one line naming the file (no traceback), nothing partial is left, and a plain rerun prepares it."""
    from common.core import files

    real_save = np.save

    def full_disk(path, array, **kwargs):
        if "train_001" in str(path):
            real_save(path, array, **kwargs)
            os.truncate(path, os.path.getsize(path) // 2)
            return
        real_save(path, array, **kwargs)

    monkeypatch.setattr(files.np, "save", full_disk)
    assert main(config(dataset)) == 1
    failed = (dataset / "db" / "failed_cases.txt").read_text()
    assert "could not be written completely" in failed and ".npy" in failed
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text
    assert not [p for p in dataset.rglob("*.npy") if files.is_temp_name(p.name)]
    monkeypatch.undo()
    caplog.clear()
    assert main(config(dataset)) == 0
    assert "to prepare" in caplog.text and not (dataset / "db" / "failed_cases.txt").exists()


def test_a_duplicate_id_is_not_also_called_a_mask_without_an_image(dataset: Path, caplog) -> None:
    shutil.copy(dataset / "train_images" / "train_001_0000.nii.gz", dataset / "train_images" / "train_001.nii.gz")
    assert main(config(dataset)) == 1
    assert "duplicate" in (dataset / "db" / "failed_cases.txt").read_text()
    assert "mask without an image" not in caplog.text


def test_file_list_entries_with_file_suffixes_are_explained(dataset: Path) -> None:
    listed = dataset / "file_list" / "train_series_uids.txt"
    listed.write_text(listed.read_text().replace("train_000\n", "train_000_0000.nii.gz\n"))
    assert main(config(dataset)) == 1
    failed = (dataset / "db" / "failed_cases.txt").read_text()
    assert "list case ids, not file names" in failed and "'train_000'" in failed
