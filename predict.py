"""Segment every CT volume in a folder with the coarse and fine models: `python predict.py -i IN -o OUT`.

Writes `OUT/<id>.nii.gz` (uint8 labels 0..13 on the input's exact grid) per case and `OUT/predictions.csv`
(status, per-phase times, peak GPU memory, coarse box, fallback, uncertainty and flag per case).
Exit code: 0 all fine, 1 some case failed, 2 setup error (missing/corrupt weights, missing input folder, bad option).
Usually run as `sh predict.sh IN OUT [options]`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from common.core.errors import InputError, WeightsError, WriteError
from common.core.logger import get_logger, setup_logging
from common.infer.backends import BACKENDS
from common.infer.folder import predict_folder
from common.infer.predictor import DEFAULT_UNCERTAINTY_THRESHOLD, PredictOptions, option_problem

REPO_ROOT = Path(__file__).resolve().parent
logger = get_logger("predict")


def _checked(name: str, cast: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type for option `name` of PredictOptions: a bad value exits with 2 and names the flag."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        problem = option_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Coarse-to-fine 13-organ segmentation of every CT in a folder "
                    "(.nii.gz, .nii, .mha, .mhd, .nrrd, DICOM series sub-folders).")
    parser.add_argument("-i", "--input", required=True, help="folder of CT volumes (<id>_0000.nii.gz -> <id>.nii.gz)")
    parser.add_argument("-o", "--output", required=True, help="folder for <id>.nii.gz masks and predictions.csv")
    parser.add_argument("--weights-dir", default=str(REPO_ROOT / "model_weights"),
                        help="folder with base_coarse_model/ and efficient_fine_model/: exported model.pt folders, or "
                             "the original release's best_model.pt folders (converted in memory) "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto = cuda if available (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="network precision on CUDA; auto = fp16 on CUDA, fp32 on CPU (default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="where the networks run: auto = onnxruntime on the CPU when installed (faster, see "
                             "BENCHMARKS.md), torch otherwise and on CUDA (default: %(default)s)")
    parser.add_argument("--fine-size", type=_checked("fine_size", int), default=None,
                        help="fine network input size per axis: 192 (trained, default from the model) or 160 "
                             "(faster); any multiple of 16")
    parser.add_argument("--ensemble", action="store_true",
                        help="average networks A and B (both stages; both must hold network B)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    parser.add_argument("--overlays", action="store_true", help="also write <id>_overlay.png (axial + coronal)")
    parser.add_argument("--workers", type=_checked("workers", int), default=2,
                        help="background reader threads = cases read ahead (default: %(default)s)")
    parser.add_argument("--uncertainty", default="auto", choices=("auto", "on", "off"),
                        help="A/B disagreement score: auto = with --ensemble or on CUDA (on the CPU it costs a "
                             "second fine forward pass) (default: %(default)s)")
    parser.add_argument("--uncertainty-threshold", type=_checked("uncertainty_threshold", float),
                        default=DEFAULT_UNCERTAINTY_THRESHOLD,
                        help="flag cases whose uncertainty is above this (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    post = parser.add_argument_group("post-processing (default: the values each exported model carries)")
    post.add_argument("--coarse-min-volume-mm3", type=_checked("coarse_min_volume_mm3", float), default=None,
                      help="smallest coarse component kept per organ, mm^3 of the coarse grid")
    post.add_argument("--z-window-mm", type=_checked("z_window_mm", float), default=None,
                      help="half height of the organ box's z-window around the largest coarse region, mm")
    post.add_argument("--extend-size-mm", type=_checked("extend_size_mm", float), default=None,
                      help="margin around the organ box, mm")
    post.add_argument("--fine-min-volume-mm3", type=_checked("fine_min_volume_mm3", float), default=None,
                      help="smallest fine component kept per organ, mm^3")
    return parser.parse_args(argv)


def print_summary(summary: dict) -> None:
    """Table of the cases that ran, then the failures and the flagged cases."""
    rows = [r for r in summary["rows"] if r["status"] in ("ok", "failed")]
    if rows:
        print(f"{'case':<24} {'status':<7} {'read':>6} {'coarse':>7} {'fine':>6} {'post':>6} {'write':>6} "
              f"{'total':>6} {'gpu MB':>7} {'unc.':>6}")
        for r in rows:
            def sec(key: str) -> str:
                return f"{r[key]:.2f}" if isinstance(r.get(key), float) else "-"
            unc = f"{r['uncertainty']:.3f}" if isinstance(r.get("uncertainty"), float) else "-"
            gpu = f"{r['gpu_used_mb']:.0f}" if isinstance(r.get("gpu_used_mb"), float) else "-"  # total - free
            print(f"{r['case_id'][:24]:<24} {r['status']:<7} {sec('read_s'):>6} {sec('coarse_s'):>7} "
                  f"{sec('fine_s'):>6} {sec('post_s'):>6} {sec('write_s'):>6} {sec('total_s'):>6} {gpu:>7} "
                  f"{unc:>6}{'  FLAGGED' if r.get('flagged') else ''}")
    for r in summary["rows"]:
        if r["status"] == "failed":
            print(f"FAILED {r['case_id']}: {r.get('error', '')}")
    print(f"{summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped, "
          f"{summary['flagged']} flagged for review; {summary['wall_s']:.1f} s; report: {summary['csv']}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (no case catches it as its failure)."""

    signum = signal.SIGTERM


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(None, level=logging.WARNING if args.quiet else logging.INFO)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _run(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the folder lock is released, finished cases are kept
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted by {signal.Signals(signum).name}: the cases finished so far are kept (mask and report "
              "row); run the same command again to continue", file=sys.stderr)
        return 128 + int(signum)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """Predict the folder of `args`; the exit code (0, 1, 2: README's rule)."""
    try:
        options = PredictOptions(
            weights_dir=args.weights_dir, device=args.device, precision=args.precision, fine_size=args.fine_size,
            ensemble=args.ensemble, uncertainty=args.uncertainty, overwrite=args.overwrite, overlays=args.overlays,
            workers=args.workers, uncertainty_threshold=args.uncertainty_threshold, progress=not args.quiet,
            coarse_min_volume_mm3=args.coarse_min_volume_mm3, z_window_mm=args.z_window_mm,
            extend_size_mm=args.extend_size_mm, fine_min_volume_mm3=args.fine_min_volume_mm3,
            backend=args.backend)
        summary = predict_folder(args.input, args.output, options)
    except (WeightsError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # the report itself could not be written (full disk): the masks written are complete
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
