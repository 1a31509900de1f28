"""Red-team pass: one representative bad input of each kind through the real entry points, inputs checksummed.

    python tests/red_team.py [--work DIR] [--keep]

Each probe builds its inputs under WORK/<probe>/in (tiny CTs, masks, a tiny synthetic dataset, tiny exported
networks), runs predict / evaluate / data_prepare / training in this process, and checks:
- the exit code (0 ok, 1 some case failed, 2 setup error);
- the message names the offending file and the problem (a fragment of each is expected);
- no exception escaped (no traceback);
- every input file is byte-identical afterwards (SHA-256 of every file under the probe's input folders).
Prints one line per probe and exits 1 if any probe failed. tests/test_red_team.py runs it in the suite.
Kills (data_prepare workers after a kill -9 of the parent, run.sh exec) are tested in test_data_prepare.py and
test_fine_train.py: they need processes of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tiny_models import TINY, export_tiny_stage  # noqa: E402

from common.storage import model_folder  # noqa: E402

SIZE = 32


@dataclass
class Probe:
    name: str
    expected_code: int
    fragments: tuple[str, ...]  # each must appear in the output (file name, problem)
    run: Callable[[Path], int]  # gets the probe folder (inputs in ./in), returns the exit code
    inputs: tuple[str, ...] = ("in",)  # folders (relative to the probe folder) whose files are inputs


# ------------------------------------------------------------------------------------------------ inputs


def ct_volume(shape=(17, 20, 19), seed=0) -> np.ndarray:
    """Air around a soft-tissue ellipse with noise: looks like a CT in HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    vol = np.full(shape, -1000.0)
    vol[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 40.0
    return (vol + rng.normal(0, 10, shape)).astype(np.int16)


def write(path: Path, array: np.ndarray, spacing=(0.8, 0.9, 2.5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def export_tiny_weights(folder: Path) -> Path:
    export_tiny_stage(folder, "coarse", "unet", SIZE, seed=1, config={"red_team": True})
    export_tiny_stage(folder, "fine", "efficient_seg_net", SIZE, seed=3, config={"red_team": True})
    return folder


def checksums(folders: list[Path]) -> dict[str, str]:
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            if path.is_file() and not path.is_symlink():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ probes


def _predict_cli(in_dir: Path, out_dir: Path, weights_dir: Path, *extra: str) -> int:
    import predict

    return predict.main(["-i", str(in_dir), "-o", str(out_dir), "--weights-dir", str(weights_dir), "--device", "cpu",
                         "--quiet", *extra])


def _evaluate_cli(d: Path, out: Path | None = None) -> int:
    from common.evaluate import main as evaluate

    return evaluate(["--pred", str(d / "in" / "pred"), "--gt", str(d / "in" / "gt"), "--out", str(out or d / "r.csv")])


def predict_probes(weights: Path) -> list[Probe]:
    def p_out_is_in(d: Path) -> int:
        write(d / "in" / "c1.nii.gz", ct_volume())  # no _0000: its mask would have its very name
        return _predict_cli(d / "in", d / "in", weights, "--overwrite")

    def p_nan(d: Path) -> int:
        vol = ct_volume().astype(np.float32)
        vol[3:8] = np.nan
        write(d / "in" / "nan_0000.nii.gz", vol)
        return _predict_cli(d / "in", d / "out", weights)

    def p_spacing(d: Path) -> int:
        write(d / "in" / "tiny_spacing.mha", ct_volume(), spacing=(1e-6, 0.8, 2.0))
        return _predict_cli(d / "in", d / "out", weights)

    def p_duplicate(d: Path) -> int:
        write(d / "in" / "dup.nii.gz", ct_volume())
        write(d / "in" / "dup_0000.nii.gz", ct_volume(seed=1))
        return _predict_cli(d / "in", d / "out", weights)

    def p_truncated(d: Path) -> int:
        data = write(d / "tmp" / "t.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (40, 50, 60))
                     .astype(np.int16)).read_bytes()
        (d / "in").mkdir()
        (d / "in" / "trunc_0000.nii.gz").write_bytes(data[: len(data) // 2])
        return _predict_cli(d / "in", d / "out", weights)

    def p_out_file(d: Path) -> int:
        write(d / "in" / "c1_0000.nii.gz", ct_volume())
        (d / "in" / "out.txt").write_text("an existing file")
        return _predict_cli(d / "in", d / "in" / "out.txt", weights)

    def p_random_weights(d: Path) -> int:
        write(d / "in" / "c1_0000.nii.gz", ct_volume())
        shutil.copytree(weights, d / "in" / "weights")
        (d / "in" / "weights" / model_folder.FINE_DIR / "model.pt").write_bytes(np.random.default_rng(7).bytes(3000))
        return _predict_cli(d / "in", d / "out", d / "in" / "weights")

    def p_empty(d: Path) -> int:
        (d / "in" / "sub").mkdir(parents=True)
        write(d / "in" / "sub" / "c1_0000.nii.gz", ct_volume())
        return _predict_cli(d / "in", d / "out", weights)

    return [
        Probe("predict: output folder = input folder", 2, ("output folder is the input folder",), p_out_is_in),
        Probe("predict: NaN slab in a float NIfTI", 1, ("nan_0000.nii.gz", "NaN or infinite"), p_nan),
        Probe("predict: 1e-6 mm spacing (.mha)", 1, ("tiny_spacing.mha", "implausible voxel spacing"), p_spacing),
        Probe("predict: duplicate case id", 1, ("dup.nii.gz", "dup_0000.nii.gz", "duplicate case id"), p_duplicate),
        Probe("predict: truncated NIfTI", 1, ("trunc_0000.nii.gz", "truncated"), p_truncated),
        Probe("predict: output path is a file", 2, ("out.txt", "existing file"), p_out_file),
        Probe("predict: random-bytes weights", 2, ("model.pt", "cannot read checkpoint"), p_random_weights),
        Probe("predict: folder of folders", 2, ("no CT images in the folder",), p_empty),
    ] + more_predict_probes(weights)


def more_predict_probes(weights: Path) -> list[Probe]:
    """Issue 21's: option ranges, a negative header spacing, a damaged ONNX cache."""
    def p_workers(d: Path) -> int:
        write(d / "in" / "c1_0000.nii.gz", ct_volume())
        return _predict_cli(d / "in", d / "out", weights, "--workers", "-3")

    def p_negative_spacing(d: Path) -> int:
        header = bytearray(write(d / "tmp" / "n.nii", ct_volume()).read_bytes())
        header[80:84] = np.float32(-0.8).tobytes()  # pixdim[1]: x
        (d / "in").mkdir()
        (d / "in" / "neg_0000.nii").write_bytes(bytes(header))
        return _predict_cli(d / "in", d / "out", weights)

    def p_truncated_onnx(d: Path) -> int:
        write(d / "in" / "c1_0000.nii.gz", ct_volume())
        shutil.copytree(weights, d / "weights")
        assert _predict_cli(d / "in", d / "out0", d / "weights", "--backend", "onnxruntime") == 0
        for graph in (d / "weights").rglob("*.onnx"):
            graph.write_bytes(graph.read_bytes()[:500])
        return _predict_cli(d / "in", d / "out", d / "weights", "--backend", "onnxruntime")

    return [
        Probe("predict: --workers -3", 2, ("--workers", "between 1 and"), p_workers),
        Probe("predict: negative NIfTI pixdim", 1, ("neg_0000.nii", "negative voxel spacing along x"),
              p_negative_spacing),
        Probe("predict: truncated cached ONNX graph", 0, (".onnx", "exporting it again"), p_truncated_onnx),
    ]


def _labels(seed: int = 0) -> np.ndarray:
    mask = np.zeros((9, 17, 15), np.uint8)
    mask[2:7, 3:12, 4:11] = 1
    mask[3:6, 12:15, 2 + seed:6] = 3
    return mask


def evaluate_probes() -> list[Probe]:
    def e_missing(d: Path) -> int:
        write(d / "in" / "gt" / "a.nii.gz", _labels())
        write(d / "in" / "gt" / "b.nii.gz", _labels())
        write(d / "in" / "pred" / "a.nii.gz", _labels(1))
        return _evaluate_cli(d)

    def e_truncated(d: Path) -> int:
        big = (np.random.default_rng(0).random((30, 40, 50)) < 0.3).astype(np.uint8)
        write(d / "in" / "gt" / "t.nii.gz", big)
        data = write(d / "tmp" / "t.nii.gz", big).read_bytes()
        (d / "in" / "pred").mkdir(parents=True)
        (d / "in" / "pred" / "t.nii.gz").write_bytes(data[: len(data) // 2])
        return _evaluate_cli(d)

    def e_label14(d: Path) -> int:
        high = _labels()
        high[0, 0, 0] = 14
        write(d / "in" / "gt" / "h.nii.gz", high)
        write(d / "in" / "pred" / "h.nii.gz", _labels())
        return _evaluate_cli(d)

    def e_out_dir(d: Path) -> int:
        write(d / "in" / "gt" / "a.nii.gz", _labels())
        write(d / "in" / "pred" / "a.nii.gz", _labels())
        return _evaluate_cli(d, out=d)

    def e_pred_file(d: Path) -> int:
        write(d / "in" / "gt" / "a.nii.gz", _labels())
        write(d / "in" / "pred.nii.gz", _labels())
        return evaluate_main(["--pred", str(d / "in" / "pred.nii.gz"), "--gt", str(d / "in" / "gt"),
                              "--out", str(d / "r.csv")])

    from common.evaluate import main as evaluate_main

    return [
        Probe("evaluate: missing prediction", 1, ("b.nii.gz", "prediction missing"), e_missing),
        Probe("evaluate: --pred is a file", 2, ("pred.nii.gz", "is a file, not a folder"), e_pred_file),
        Probe("evaluate: truncated prediction", 1, ("t.nii.gz", "truncated"), e_truncated),
        Probe("evaluate: label 14 in ground truth", 1, ("h.nii.gz", "outside 0..13"), e_label14),
        Probe("evaluate: --out is a folder", 2, ("--out is a folder",), e_out_dir),
    ]


DATA_INPUTS = ("in/train_images", "in/train_mask", "in/trainu_images", "in/file_list")


def _prepare(base: Path) -> int:
    from common.config import PrepareConfig
    from common.core.typed_config import load_config
    from data_prepare.run import STAGE_DIR
    from data_prepare.run import main as prepare

    return prepare(load_config(PrepareConfig, STAGE_DIR / "config.yaml", [
        f"data_base_dir={base}", "num_workers=1", f"coarse_size_zyx=[{SIZE},{SIZE},{SIZE}]",
        f"fine_size_zyx=[{SIZE},{SIZE},{SIZE}]"]))


def _add_labeled(base: Path, case_id: str, image: sitk.Image, file_name: str | None = None) -> None:
    like = sitk.ReadImage(str(base / "train_mask" / "train_000.nii.gz"))
    sitk.WriteImage(image, str(base / "train_images" / (file_name or f"{case_id}_0000.nii.gz")))
    sitk.WriteImage(like, str(base / "train_mask" / f"{case_id}.nii.gz"))
    with open(base / "file_list" / "train_series_uids.txt", "a", encoding="utf-8") as f:
        f.write(f"{case_id}\n")


def _good_image(base: Path) -> sitk.Image:
    return sitk.ReadImage(str(base / "train_images" / "train_000_0000.nii.gz"))


def prepare_probes(dataset: Path) -> list[Probe]:
    def copy_dataset(d: Path) -> Path:
        return Path(shutil.copytree(dataset, d / "in"))

    def d_nan(d: Path) -> int:
        base = copy_dataset(d)
        image = _good_image(base)
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array[1:11] = np.nan  # a 10-slice NaN slab
        slab = sitk.GetImageFromArray(array)
        slab.CopyInformation(image)
        _add_labeled(base, "nan_slab", slab)
        return _prepare(base)

    def d_spacing(d: Path) -> int:
        base = copy_dataset(d)
        image = _good_image(base)
        for key in image.GetMetaDataKeys():  # NIfTI header fields MetaImage cannot store (ITK would warn)
            image.EraseMetaData(key)
        image.SetSpacing((1e6, 0.8, 2.0))
        _add_labeled(base, "huge", image, "huge.mha")
        return _prepare(base)

    def d_duplicate(d: Path) -> int:
        base = copy_dataset(d)
        shutil.copy(base / "train_images" / "train_001_0000.nii.gz", base / "train_images" / "train_001.nii.gz")
        return _prepare(base)

    def d_constant(d: Path) -> int:
        base = copy_dataset(d)
        image = _good_image(base)
        air = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(image).shape, -1024, np.int16))
        air.CopyInformation(image)
        _add_labeled(base, "air", air)
        return _prepare(base)

    def d_corrupt_lmdb(d: Path) -> int:
        base = copy_dataset(d)
        data = base / "db" / "seg_pre-process_database" / "data.mdb"
        data.write_bytes(np.random.default_rng(1).bytes(data.stat().st_size))
        return _prepare(base)

    def d_truncated_lmdb(d: Path) -> int:
        base = copy_dataset(d)
        data = base / "db" / "seg_pre-process_database" / "data.mdb"
        with open(data, "r+b") as f:
            f.truncate(4096 * 2 + 100)  # the two meta pages survive, the tree is cut
        return _prepare(base)

    def d_listed_file_names(d: Path) -> int:
        base = copy_dataset(d)
        listed = base / "file_list" / "train_series_uids.txt"
        listed.write_text(listed.read_text().replace("train_000\n", "train_000_0000.nii.gz\n"))
        return _prepare(base)

    return [
        Probe("data_prepare: truncated data.mdb", 2, ("seg_pre-process_database", "truncated"), d_truncated_lmdb,
              DATA_INPUTS),
        Probe("data_prepare: file names in file_list", 1, ("train_000_0000.nii.gz", "list case ids, not file names"),
              d_listed_file_names, DATA_INPUTS),
        Probe("data_prepare: 10-slice NaN slab", 1, ("nan_slab_0000.nii.gz", "NaN or infinite"), d_nan, DATA_INPUTS),
        Probe("data_prepare: 1e6 mm spacing", 1, ("huge.mha", "implausible voxel spacing"), d_spacing, DATA_INPUTS),
        Probe("data_prepare: duplicate case id", 1, ("train_001.nii.gz", "train_001_0000.nii.gz", "duplicate"),
              d_duplicate, DATA_INPUTS),
        Probe("data_prepare: all -1024 HU image", 1, ("air_0000.nii.gz", "every voxel is -1024"), d_constant,
              DATA_INPUTS),
        Probe("data_prepare: damaged LMDB", 2, ("seg_pre-process_database", "damaged"), d_corrupt_lmdb, DATA_INPUTS),
    ]


def train_probes(dataset: Path) -> list[Probe]:
    from coarse_base_seg.train import cli as coarse_cli

    def train_args(base: Path, out: Path, *extra: str) -> list[str]:
        return [f"data_base_dir={base}", f"output_dir={out}", "device=cpu", f"model.channels={TINY}".replace(" ", ""),
                f"data.size_zyx=[{SIZE},{SIZE},{SIZE}]", "data.num_workers=0", "schedule.iterations=2", *extra]

    def t_size(d: Path) -> int:
        return coarse_cli(train_args(Path(shutil.copytree(dataset, d / "in")), d / "out", "data.size_zyx=[16,16,16]"))

    def t_random_last(d: Path) -> int:
        base = Path(shutil.copytree(dataset, d / "in"))
        (d / "out" / "checkpoints").mkdir(parents=True)
        (d / "out" / "checkpoints" / "last.pt").write_bytes(np.random.default_rng(5).bytes(5000))
        return coarse_cli(train_args(base, d / "out"))

    def t_alias_bomb(d: Path) -> int:
        base = Path(shutil.copytree(dataset, d / "in"))
        levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
            f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        (base / "bomb.yaml").write_text("x:\n" + "".join(f"  {line}\n" for line in levels)
                                        + "data:\n  hu_window: *a8\n")
        return coarse_cli([f"config={base / 'bomb.yaml'}", *train_args(base, d / "out")])

    def t_huge_size(d: Path) -> int:
        return coarse_cli(train_args(Path(shutil.copytree(dataset, d / "in")), d / "out",
                                     "data.size_zyx=[100000,100000,100000]"))

    def t_truncated_lmdb(d: Path) -> int:
        base = Path(shutil.copytree(dataset, d / "in"))
        data = base / "db" / "seg_train_fold_1" / "data.mdb"
        with open(data, "r+b") as f:
            f.truncate(4096 * 2 + 100)
        return coarse_cli(train_args(base, d / "out"))

    return [
        Probe("train: YAML alias bomb", 2, ("bomb.yaml", "aliases expand to more than"), t_alias_bomb, DATA_INPUTS),
        Probe("train: data.size_zyx 100000^3", 2, ("data.size_zyx", "<= 512"), t_huge_size, DATA_INPUTS),
        Probe("train: truncated data.mdb", 2, ("seg_train_fold_1", "truncated"), t_truncated_lmdb, DATA_INPUTS),
        Probe("train: data.size_zyx 16^3", 2, ("data.size_zyx", "bottleneck"), t_size, DATA_INPUTS),
        Probe("train: random-bytes last.pt", 2, ("last.pt", "cannot read checkpoint"), t_random_last, DATA_INPUTS),
    ]


def probes(weights: Path, dataset: Path) -> list[Probe]:
    """Every probe: one representative bad input of each kind per entry point."""
    return predict_probes(weights) + evaluate_probes() + prepare_probes(dataset) + train_probes(dataset)


# ------------------------------------------------------------------------------------------------ running


def run_probe(probe: Probe, folder: Path) -> tuple[bool, str]:
    """Run one probe in `folder`; (passed, one-line verdict)."""
    folder.mkdir(parents=True)
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    code: int | None = None
    escaped = ""

    def snapshot() -> dict[str, str]:
        return checksums([folder / sub for sub in probe.inputs])

    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            try:
                _PENDING[str(folder)] = snapshot  # taken when the probe's entry point starts (`_wrap_entry`)
                code = probe.run(folder)
            except SystemExit as exc:
                code = int(exc.code or 0)
            except BaseException:  # noqa: BLE001 - an escaped exception is exactly what a probe looks for
                escaped = traceback.format_exc()
    finally:
        root.removeHandler(handler)
        _PENDING.pop(str(folder), None)
    before = _BEFORE.pop(str(folder), None)
    after = snapshot()
    output = text.getvalue()
    problems = []
    if escaped or "Traceback" in output:
        problems.append("traceback: " + (escaped or output).strip().splitlines()[-1])
    if code != probe.expected_code:
        problems.append(f"exit {code}, expected {probe.expected_code}")
    missing = [f for f in probe.fragments if f not in output]
    if missing:
        problems.append(f"message lacks {missing}")
    if before is None:
        problems.append("inputs were never checksummed")
    elif before != after:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        problems.append(f"inputs changed: {changed[:3]}")
    verdict = f"exit {code}, {len(before or {})} input files unchanged" if not problems else "; ".join(problems)
    return not problems, verdict


# Inputs are checksummed right before the probe's entry point runs (after the probe built them), and again after.
_BEFORE: dict[str, dict[str, str]] = {}
_PENDING: dict[str, Callable[[], dict[str, str]]] = {}


def _wrap_entry(module, name: str) -> None:
    """Checksum the inputs of the current probe right before `module.name` runs (once per probe)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        for key, snapshot in list(_PENDING.items()):
            _BEFORE[key] = snapshot()
            del _PENDING[key]
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="red_team_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from common.config import PrepareConfig
        from common.core.typed_config import load_config
        from data_prepare.run import STAGE_DIR
        from data_prepare.run import main as prepare_main
        from data_prepare.synthetic import write_dataset

        weights = export_tiny_weights(work / "weights")
        dataset = work / "dataset"
        write_dataset(dataset, labeled=3, unlabeled=1, val=0, seed=3, size="tiny")
        cfg = load_config(PrepareConfig, STAGE_DIR / "config.yaml", [
            f"data_base_dir={dataset}", "num_workers=1", f"coarse_size_zyx=[{SIZE},{SIZE},{SIZE}]",
            f"fine_size_zyx=[{SIZE},{SIZE},{SIZE}]"])
        if prepare_main(cfg) != 0:
            print("red team: the clean tiny dataset did not prepare", file=sys.stderr)
            return 1

        import coarse_base_seg.train as coarse_train
        import common.evaluate as evaluate
        import data_prepare.run as prepare_run
        import predict

        for module, name in ((predict, "main"), (evaluate, "main"), (prepare_run, "main"), (coarse_train, "cli")):
            _wrap_entry(module, name)
        failed = 0
        for i, probe in enumerate(probes(weights, dataset)):
            ok, verdict = run_probe(probe, work / f"probe{i:02d}")
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {probe.name:<40} {verdict}")
        print(f"{len(probes(weights, dataset)) - failed} of {len(probes(weights, dataset))} probes handled well")
        return 1 if failed else 0
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
