"""Command line of the FLARE22 evaluation: `python -m common.evaluate --pred DIR --gt DIR --out results.csv
[--labels MODEL_OR_DATASET]`.

Writes the official CSV and prints the per-organ means (common.evaluation.evaluate). Exit code 0: every case scored;
1: some case failed (named on stderr, the others scored); 2: setup error (a folder missing, no predictions, --out a
folder or not writable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from common.core.errors import InputError, WriteError
from common.core.files import check_writable
from common.core.labels import DEFAULT_NSD_TOLERANCE_MM, FLARE22, LabelSet
from common.core.logger import get_logger, setup_logging
from common.evaluation.evaluate import evaluate_folder, format_means_table
from common.storage.labelsets import DATASET_JSON, read_label_set

logger = get_logger("common.evaluate")


def _label_set(args: argparse.Namespace) -> LabelSet:
    """--labels, else the dataset.json of an nnU-Net raw dataset the ground truth lies in (labelsTs/, labelsTr/),
    else FLARE22."""
    if args.labels is not None:
        return read_label_set(args.labels, args.nsd_tolerance_mm)
    beside = Path(args.gt).resolve().parent / DATASET_JSON
    if beside.is_file():
        logger.info("label set from %s", beside)
        return read_label_set(beside, args.nsd_tolerance_mm)
    return FLARE22


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FLARE22 DSC/NSD evaluation (official rules).")
    parser.add_argument("--pred", required=True,
                        help="folder of predicted label maps (<id>.nii.gz, .nii, .mha, .mhd, .nrrd)")
    parser.add_argument("--gt", required=True, help="folder of ground-truth label maps with the same file names")
    parser.add_argument("--out", required=True, help="CSV to write (official columns)")
    parser.add_argument("--labels", default=None,
                        help="the label set: a model folder (or model.pt), an nnU-Net v2 dataset.json or a prepared "
                             "dataset folder (default: the dataset.json of the nnU-Net dataset --gt lies in, else "
                             "FLARE22's 13 organs)")
    parser.add_argument("--nsd-tolerance-mm", type=float, default=DEFAULT_NSD_TOLERANCE_MM,
                        help="NSD tolerance of labels FLARE22 does not know, read from a dataset.json "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging(None)
    failures: list[tuple[str, str]] = []
    try:
        out = Path(args.out)
        if out.is_dir():
            raise InputError(out, "--out is a folder; give the CSV file to write (e.g. results.csv)")
        check_writable(out.parent, "folder of --out")
        labels = _label_set(args)
        rows, means = evaluate_folder(args.pred, args.gt, out, failures=failures, labels=labels)
    except InputError as err:  # setup: missing folders, no predictions, an unwritable --out
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WriteError as err:  # the CSV could not be written completely (full disk, file size limit): none is left
        print(f"error: {err}", file=sys.stderr)
        return 1
    if rows:
        print(format_means_table(means, len(rows), labels))
        print(f"wrote {args.out}")
    for name, message in failures:
        print(f"FAILED {name}: {message}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(failures) + len(rows)} case(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
