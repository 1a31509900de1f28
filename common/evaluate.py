"""Command line of the FLARE22 evaluation: `python -m common.evaluate --pred DIR --gt DIR --out results.csv`.

Writes the official CSV and prints the per-organ means (common.evaluation.evaluate). Exit code 0: every case scored;
1: some case failed (named on stderr, the others scored); 2: setup error (a folder missing, no predictions, --out a
folder or not writable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from common.core.errors import InputError
from common.core.files import check_writable
from common.core.logger import setup_logging
from common.evaluation.evaluate import evaluate_folder, format_means_table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FLARE22 DSC/NSD evaluation (official rules).")
    parser.add_argument("--pred", required=True,
                        help="folder of predicted label maps (<id>.nii.gz, .nii, .mha, .mhd, .nrrd)")
    parser.add_argument("--gt", required=True, help="folder of ground-truth label maps with the same file names")
    parser.add_argument("--out", required=True, help="CSV to write (official columns)")
    args = parser.parse_args(argv)
    setup_logging(None)
    failures: list[tuple[str, str]] = []
    try:
        out = Path(args.out)
        if out.is_dir():
            raise InputError(out, "--out is a folder; give the CSV file to write (e.g. results.csv)")
        check_writable(out.parent, "folder of --out")
        rows, means = evaluate_folder(args.pred, args.gt, out, failures=failures)
    except InputError as err:  # setup: missing folders, no predictions, an unwritable --out
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rows:
        print(format_means_table(means, len(rows)))
        print(f"wrote {args.out}")
    for name, message in failures:
        print(f"FAILED {name}: {message}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(failures) + len(rows)} case(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
