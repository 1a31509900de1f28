"""One command that runs every CUDA path once and prints one markdown table: `python -m benchmarks.gpu_check`.

Made for a GPU session of 15 minutes: at most about 8 minutes on one H100/H200. Parts, each guarded (a failure is
a FAILED row with its message, the other parts still run; exit code 1 then):
1. train: the CPS training step of both stages at 160^3 (U-Net) / 192^3 (EfficientSegNet), full channels, in
   fp32 eager, bf16 autocast, fp16 autocast + GradScaler and bf16 + torch.compile (benchmarks.train_step: same
   weights and data, compiled graphs and cached memory dropped between variants, cuDNN autotuning as in
   training): seconds per step, the three GPU memory figures of common.core.gpu_memory, ratio to fp32 eager;
2. predict: the predictor warm (after one warm-up case) on 3 full-size synthetic CTs (.nii.gz, 512 x 512 x
   ~200, random full-size networks): per-phase seconds and GPU memory (allocated / reserved peak, total - free)
   next to the bars, 1.5 s per case and 1.5 GB against total - free (FLARE's measure);
3. pipeline: the fine data pipeline (FineStream: reader threads, resize on the GPU) in samples/s against the
   fine training step of part 1 -- does data starve the step;
4. ddp: a 1-process `torchrun` run of each stage (NCCL on CUDA) for a few iterations, SIGKILLed after its first
   checkpoint and rerun: it must resume from that checkpoint and finish;
5. cuda: benchmarks/cuda_checks.py: no host sync in the fine sample (CUDA sync debug mode), and the predictor's
   memory with cuDNN autotuning on and off against the 1.5 GB bar (decides whether autotuning stays on there);
   CUDA only, so --smoke reports it as not run.

`--smoke` runs the same code on the CPU at tiny sizes (32^3, channels 2,4,4,8,8, a 40 x 64 x 64 CT, gloo, the
compile variant through dynamo's eager backend) in about a minute; it is part of the test suite so the script
never rots. `--parts train,predict` runs a subset; `--json PATH` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.core.defaults import HU_WINDOW
from common.core.gpu_memory import MEMORY_BAR_MB
from common.storage.model_folder import PreprocessSpec

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "predict", "pipeline", "ddp", "cuda")
TRAIN_VARIANTS = ("fp32_eager", "bf16_eager", "fp16_eager", "bf16_compile")
TIME_BAR_S = 1.5
TINY_CHANNELS = [2, 4, 4, 8, 8]


@dataclass(frozen=True)
class Setup:
    """Sizes of one run: full (the GPU check) or smoke (CPU, tiny)."""

    smoke: bool
    device: torch.device
    coarse_size: int
    fine_size: int
    channels: list[int] | None      # None = the networks' full widths
    ct_shape_zyx: tuple[int, int, int]
    ddp_size: int
    ddp_channels: list[int] | None
    warmup: int
    steps: int

    @staticmethod
    def make(smoke: bool, device: str) -> Setup:
        if smoke:
            return Setup(True, torch.device("cpu"), 32, 32, TINY_CHANNELS, (24, 48, 40), 32, TINY_CHANNELS, 0, 1)
        dev = torch.device("cuda" if device == "auto" else device)
        return Setup(False, dev, 160, 192, None, (200, 512, 512), 64, None, 1, 3)


Row = dict[str, str]


def _row(part: str, what: str, result: str, versus: str = "") -> Row:
    return {"part": part, "what": what, "result": result, "versus": versus}


def _mb(value: float | str | None) -> str:
    try:
        return f"{float(value):.0f}"
    except (TypeError, ValueError):
        return "-"


# ------------------------------------------------------------------------------------------------ 1. train


def part_train(setup: Setup, work: Path, state: dict) -> list[Row]:
    """CPS step per stage and variant (benchmarks.train_step.time_variant)."""
    from benchmarks.train_step import _stages, time_variant

    rows: list[Row] = []
    for stage in _stages(None, "cuda"):
        stage = type(stage)(stage.name, stage.network, setup.coarse_size if stage.name == "coarse"
                            else setup.fine_size, stage.loss, stage.lr)
        base = None
        for variant in TRAIN_VARIANTS:
            what = f"{stage.name} {stage.network} {stage.size}^3 {variant}"
            try:
                r = time_variant(stage, variant, setup.device, setup.warmup, setup.steps, channels=setup.channels,
                                 compile_backend="eager" if setup.smoke else "inductor")
            except Exception as error:  # noqa: BLE001 - one variant failing must not hide the others
                rows.append(_row("train", what, f"FAILED: {_error(error)}"))
                continue
            if variant == "fp32_eager":
                base = r["s_per_step"]
                state[f"{stage.name}_step_s"] = base
            ratio = f"x{base / r['s_per_step']:.2f} vs fp32 eager" if base else ""
            rows.append(_row("train", what, f"{r['s_per_step']:.3f} s/step (first {r['first_step_s']:.1f} s); GPU MB "
                             f"alloc {_mb(r['alloc_peak_mb'])} / reserved {_mb(r['reserved_peak_mb'])} / used "
                             f"{_mb(r['used_mb'])}", ratio))
    return rows


# ------------------------------------------------------------------------------------------------ 2. predict


def part_predict(setup: Setup, work: Path, state: dict) -> list[Row]:
    """Predictor warm on 3 synthetic CTs; per-phase times and the three memory figures against the bars."""
    from benchmarks.predict_speed import export_random_models, make_ct, write_ct
    from common.core.gpu_memory import MEMORY_FIELDS, reset_peak, snapshot
    from common.infer.folder import predict_folder
    from common.infer.predictor import PredictOptions, Predictor

    weights = work / "predict_weights"
    export_random_models(weights, channels=setup.channels, sizes=(setup.coarse_size, setup.fine_size))
    in_dir, warm_dir = work / "predict_in", work / "predict_warm"
    in_dir.mkdir()
    warm_dir.mkdir()
    z, y, x = setup.ct_shape_zyx
    for i, depth in enumerate((z, z - z // 10, z + z // 10)):  # ~200 slices: 200, 180, 220
        image, _, spacing, origin, direction = make_ct((depth, y, x), seed=i)
        write_ct(in_dir / f"gpu{i:02d}_0000.nii.gz", image, spacing, origin, direction)
        if i == 0:
            write_ct(warm_dir / "warm_0000.nii.gz", image[: max(8, depth // 4)], spacing, origin, direction)
    predictor = Predictor(PredictOptions(weights, setup.device, uncertainty="off"))
    predict_folder(warm_dir, work / "predict_warm_out", PredictOptions(progress=False), predictor=predictor)
    reset_peak(setup.device)
    summary = predict_folder(in_dir, work / "predict_out", PredictOptions(progress=False), predictor=predictor)
    overall = snapshot(setup.device)
    rows: list[Row] = []
    for r in summary["rows"]:
        if r["status"] != "ok":
            rows.append(_row("predict", r["case_id"], f"FAILED: {r.get('error', '')}"))
            continue
        phases = ", ".join(f"{k[:-2]} {float(r.get(k) or 0):.2f}" for k in
                           ("read_s", "coarse_s", "fine_s", "post_s", "write_s"))
        alloc, reserved, used = (r[k] for k in MEMORY_FIELDS)  # the predictor's own per-case figures
        total = float(r["total_s"])
        rows.append(_row("predict", f"{r['case_id']} {setup.device.type}",
                         f"total {total:.2f} s ({phases}); GPU MB alloc {_mb(alloc)} / reserved {_mb(reserved)} / "
                         f"used {_mb(used)}", f"{'meets' if total <= TIME_BAR_S else 'OVER'} {TIME_BAR_S} s"))
    used = overall.used_mb
    rows.append(_row("predict", "3 cases: peak GPU memory of the run",
                     f"alloc {overall.alloc_peak_mb:.0f} / reserved {overall.reserved_peak_mb:.0f} / total - free "
                     f"{used:.0f} MB; wall {summary['wall_s']:.2f} s",
                     f"{'meets' if used <= MEMORY_BAR_MB else 'OVER'} {MEMORY_BAR_MB:.0f} MB (total - free)"
                     if setup.device.type == "cuda" else "CPU: no GPU memory"))
    return rows


# ------------------------------------------------------------------------------------------------ 3. pipeline


def _tiny_dataset(work: Path, size: int, channels: list[int] | None) -> Path:
    """Tiny synthetic dataset prepared at size^3 for both stages, and a random coarse model for the fine boxes."""
    from common.config import PrepareConfig
    from common.core.typed_config import load_config
    from common.networks import build_network
    from common.storage.checkpoint import model_state_dict
    from common.storage.model_folder import export_model
    from data_prepare.run import STAGE_DIR
    from data_prepare.run import main as prepare_main
    from data_prepare.synthetic import write_dataset

    data = work / "tiny_dataset"
    if (data / "db").is_dir():
        return data
    write_dataset(data, labeled=3, unlabeled=2, val=0, seed=0, size="tiny")
    cfg = load_config(PrepareConfig, STAGE_DIR / "config.yaml", [
        f"data_base_dir={data}", f"coarse_size_zyx=[{size},{size},{size}]", f"fine_size_zyx=[{size},{size},{size}]",
        "num_workers=0"])
    if prepare_main(cfg) != 0:
        raise RuntimeError(f"data_prepare failed on {data}")
    kwargs: dict = {"dropout": 0.0} | ({"channels": channels} if channels else {})
    torch.manual_seed(0)
    export_model(work / "tiny_coarse_model", stage="coarse", model={"name": "unet", "kwargs": kwargs},
                 networks={"a": model_state_dict(build_network("unet", **kwargs))}, primary="a",
                 preprocess=PreprocessSpec("coarse", (size,) * 3), config={})
    return data


def part_pipeline(setup: Setup, work: Path, state: dict) -> list[Row]:
    """Fine samples/s through FineStream on the device against the fp32 fine step of part 1."""
    from fine_efficient_seg.augment import FineAugmentSettings
    from fine_efficient_seg.dataset import FineStream, SampleSpec, StreamSpec, load_cases

    if setup.smoke:
        data = _tiny_dataset(work, setup.fine_size, setup.channels)
        db = data / "db" / "seg_pre-process_database"
    else:
        from benchmarks.fine_pipeline import prepare_dataset

        data = work / "full_dataset"
        db = prepare_dataset(data, cases=2)
    cases = load_cases(db, data, labeled=True)
    size = (setup.fine_size,) * 3
    stream = FineStream(cases, StreamSpec("labeled", 0, batch_size=1, labeled=True, read_threads=2),
                        SampleSpec(size, HU_WINDOW, FineAugmentSettings()), setup.device, rank=0, world_size=1)
    samples, warmup = (4, 1) if setup.smoke else (12, 2)
    it = stream(0)
    try:
        for _ in range(warmup):
            next(it)
        _sync(setup.device)
        t0 = time.perf_counter()
        for _ in range(samples):
            next(it)
        _sync(setup.device)
        per_sample = (time.perf_counter() - t0) / samples
    finally:
        it.close()
    # A CPS step takes 2 samples (1 labeled + 1 unlabeled crop): data keeps up when 2 samples take less than a step.
    step = state.get("fine_step_s")
    versus = "no fine step measured (part train)" if step is None else (
        f"fine step {step:.3f} s needs 2 samples = {2 * per_sample:.3f} s: "
        + ("data keeps up" if 2 * per_sample <= step else "DATA STARVES THE STEP"))
    return [_row("pipeline", f"FineStream {setup.fine_size}^3 on {setup.device.type}, {len(cases)} cases",
                 f"{1 / per_sample:.1f} samples/s ({per_sample * 1000:.0f} ms/sample)", versus)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ 4. ddp


def _torchrun(module: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", module, *args]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc): torchrun's workers may sit in their own process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (a hard stop, as a crash or an OOM kill would be)."""
    for pid in _process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _kill_resume(name: str, module: str, args: list[str], last: Path, done: Path, train_log: Path, work: Path,
                 timeout_s: float) -> Row:
    log = work / f"ddp_{name}.log"
    t0 = time.perf_counter()
    proc = _torchrun(module, args, log)
    try:
        while not last.is_file():
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: exited with {proc.returncode} before its first checkpoint: "
                                   f"{log.read_text()[-800:]}")
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"{name}: no checkpoint {last} after {timeout_s:.0f} s")
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    killed_s = time.perf_counter() - t0
    if done.exists():
        raise RuntimeError(f"{name}: finished before the kill (raise schedule.iterations)")
    from common.storage.checkpoint import load_checkpoint

    killed_at = int(load_checkpoint(last)["iteration"])
    t1 = time.perf_counter()
    proc = _torchrun(module, args, log)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise RuntimeError(f"{name}: the resumed run did not finish in {timeout_s:.0f} s") from None
    text = train_log.read_text() if train_log.is_file() else ""
    if rc != 0 or not done.exists() or "resuming from" not in text:
        raise RuntimeError(f"{name}: resumed run rc {rc}, DONE {done.exists()}, 'resuming from' in its log "
                           f"{'resuming from' in text}: {log.read_text()[-800:]}")
    backend = "nccl" if "cuda" in str(args) else "gloo"
    return _row("ddp", f"{name}: torchrun 1 process ({backend}), SIGKILL after the first checkpoint, rerun",
                f"killed at iteration {killed_at} after {killed_s:.1f} s; resumed and finished in "
                f"{time.perf_counter() - t1:.1f} s", "resume ok")


def part_ddp(setup: Setup, work: Path, state: dict) -> list[Row]:
    """Both stages through torchrun (1 process), killed after the first checkpoint and resumed."""
    size = setup.ddp_size
    data = _tiny_dataset(work, size, setup.ddp_channels)
    device = "cpu" if setup.smoke else str(setup.device)
    channels = [f"model.channels=[{','.join(map(str, setup.ddp_channels))}]"] if setup.ddp_channels else []
    common = [f"data_base_dir={data}", f"device={device}", f"data.size_zyx=[{size},{size},{size}]",
              f"schedule.iterations={4 if setup.smoke else 30}", "schedule.val_interval=100",
              "schedule.checkpoint_interval=1",
              "schedule.log_interval=1", "data.num_workers=1", *channels]
    if setup.smoke:
        common.append("amp.precision=fp32")
    timeout = 300.0
    rows = []
    coarse_out = work / "ddp_coarse"
    coarse_args = [*common, f"output_dir={coarse_out}", f"export.dir={work / 'ddp_coarse_export'}"]
    rows.append(_kill_resume("coarse", "coarse_base_seg.train", coarse_args, coarse_out / "checkpoints" / "last.pt",
                             coarse_out / "DONE", coarse_out / "train.log", work, timeout))
    fine_out = work / "ddp_fine"
    fine_args = [*common, f"output_dir={fine_out}", f"boxes.coarse_model_dir={work / 'tiny_coarse_model'}",
                 f"export.dir={work / 'ddp_fine_export'}"]
    boxes = subprocess.run([sys.executable, "-m", "fine_efficient_seg.train", *fine_args, "step=boxes"], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                           timeout=timeout, check=False)
    if boxes.returncode != 0:
        raise RuntimeError(f"fine boxes step failed: {boxes.stderr[-800:]}")
    round_dir = fine_out / "round1"
    rows.append(_kill_resume("fine round1", "fine_efficient_seg.train", [*fine_args, "step=round1"],
                             round_dir / "checkpoints" / "last.pt", round_dir / "DONE", round_dir / "train.log",
                             work, timeout))
    return rows


# ------------------------------------------------------------------------------------------------ 5. cuda


def part_cuda(setup: Setup, work: Path, state: dict) -> list[Row]:
    """The GPU-only decisions of benchmarks/cuda_checks.py: host syncs in the fine sample (sync debug mode) and
    the predictor's memory with cuDNN autotuning on and off. They need CUDA's sync debug mode, so --smoke says so."""
    if setup.device.type != "cuda":
        return [_row("cuda", "fine-sample syncs, cuDNN on/off memory", "not run: needs CUDA (sync debug mode)")]
    from benchmarks.cuda_checks import run_checks

    results = run_checks(setup.device, setup.ct_shape_zyx, cases=3)
    syncs = results["fine_sample_syncs"]
    rows = [_row("cuda", "fine sample without host syncs", "yes" if syncs["ok"] else f"FAILED: {syncs['error']}")]
    for r in results["predictor"]:
        used = r["gpu_used_mb"]
        rows.append(_row("cuda", f"predictor, cudnn.benchmark={r['cudnn_benchmark']}",
                         f"compute {r['compute_s']:.3f} s; GPU MB alloc {r['gpu_alloc_peak_mb']:.0f} / reserved "
                         f"{r['gpu_reserved_peak_mb']:.0f} / used {used:.0f}",
                         f"{'meets' if used <= MEMORY_BAR_MB else 'OVER'} {MEMORY_BAR_MB:.0f} MB (total - free)"))
    return rows


# ------------------------------------------------------------------------------------------------ main


def _error(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    return f"{type(error).__name__}: {text[:300]}"


PART_FUNCTIONS: dict[str, Callable[[Setup, Path, dict], list[Row]]] = {
    "train": part_train, "predict": part_predict, "pipeline": part_pipeline, "ddp": part_ddp, "cuda": part_cuda}


def run_parts(setup: Setup, parts: list[str], work: Path) -> list[Row]:
    """Every part in order, each guarded; a failed part is one FAILED row."""
    rows: list[Row] = []
    state: dict = {}
    for part in parts:
        t0 = time.perf_counter()
        try:
            rows.extend(PART_FUNCTIONS[part](setup, work, state))
        except Exception as error:  # noqa: BLE001 - the table must still print the other parts
            traceback.print_exc()
            rows.append(_row(part, "part failed", f"FAILED: {_error(error)}"))
        print(f"[gpu_check] {part}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| part | what | result | against |", "|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['what']} | {r['result']} | {r['versus']} |" for r in rows]
    return "\n".join(lines)


def machine(setup: Setup) -> str:
    if setup.device.type == "cuda":
        props = torch.cuda.get_device_properties(setup.device)
        return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, cuDNN "
                f"{torch.backends.cudnn.version()}, torch {torch.__version__}")
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N (ignored with --smoke)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    setup = Setup.make(args.smoke, args.device)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        rows = run_parts(setup, parts, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ngpu_check{' --smoke' if setup.smoke else ''} on {machine(setup)}; {time.perf_counter() - t0:.0f} s\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(r["result"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
