"""Command line of the original-weights converter:

    python -m common.original_weights --coarse DIR_OR_FILE --fine DIR_OR_FILE --out model_weights/

writes this project's model folders (OUT/base_coarse_model/, OUT/efficient_fine_model/) from the original release's
best_model.pt files (common.storage.original_release), after which `sh predict.sh IN OUT` works.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common.core.errors import InputError, WriteError
from common.core.logger import setup_logging
from common.storage.original_release import COARSE_SIZE, FINE_SIZE, ORIGINAL_PREDICTOR_FINE_SIZE, convert_release


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m common.original_weights",
        description="Convert the original release's best_model.pt files into this project's model folders "
                    "(OUT/base_coarse_model/, OUT/efficient_fine_model/) for `sh predict.sh` and model.init_from.")
    parser.add_argument("--coarse", help="original coarse stage: its folder (best_model.pt [+ best_model_1.pt]) "
                                         "or its best_model.pt")
    parser.add_argument("--fine", help="original fine stage: its folder or its best_model.pt (network A only)")
    parser.add_argument("--coarse-b", help="coarse network B file, when not best_model_1.pt beside --coarse")
    parser.add_argument("--fine-b", help="fine network B file (the original fine stage saved none)")
    parser.add_argument("--out", required=True, help="destination folder, e.g. model_weights/")
    parser.add_argument("--coarse-size", type=int, default=COARSE_SIZE,
                        help="coarse input size per axis (default: %(default)s, as trained)")
    parser.add_argument("--fine-size", type=int, default=FINE_SIZE,
                        help=f"fine input size per axis stored in the model (default: %(default)s, as trained; "
                             f"{ORIGINAL_PREDICTOR_FINE_SIZE} = the original predictor's setting, faster; "
                             "`predict.sh --fine-size` overrides it at prediction time)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code 0 = written, 2 = a file was refused or an option is wrong (nothing written)."""
    args = parse_args(argv)
    setup_logging(None)
    if args.coarse is None and args.fine is None:
        print("error: give --coarse and/or --fine", file=sys.stderr)
        return 2
    try:
        written = convert_release(args.out, args.coarse, args.fine, args.coarse_b, args.fine_b,
                                  args.coarse_size, args.fine_size)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WriteError as exc:  # a model file could not be written completely (full disk): none is left half-written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out is a file, or a folder that cannot be created or written
        print(f"error: --out {args.out}: {exc.strerror or exc} ({exc.filename or args.out})", file=sys.stderr)
        return 2
    for stage, path in written.items():
        print(f"{stage}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
