"""The command line of a training stage (`python -m coarse_base_seg.train`, `python -m fine_efficient_seg.train`).

Parses the stage's config, runs its `main`, and turns the known failures into a one-line message and an exit code:
2 for a bad config or input, 1 for a non-finite loss, a failed rank or an output a full disk cut short, 128 + signal
after an interruption (with where last.pt is). The process group is torn down on every path.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from common.core.errors import InputError, WriteError
from common.core.typed_config import ConfigError, HelpRequested, parse_cli
from common.train.distributed import RankFailedError, destroy_distributed
from common.train.engine import NonFiniteLossError, TrainingInterrupted


def stage_cli(config_cls: type, default_config: Path, main: Callable[[Any], Any], argv: Sequence[str] | None = None,
              skip: Callable[[Any], bool] = lambda cfg: False) -> int:
    """Exit code of `main(parse_cli(config_cls, default_config, argv))`; `skip(cfg)` true: do nothing, exit 0."""
    try:
        cfg = parse_cli(config_cls, default_config, argv)
        if not skip(cfg):
            main(cfg)
    except HelpRequested as help_text:
        print(help_text.text)
        return 0
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, RankFailedError, WriteError) as exc:  # WriteError: the last good file is kept
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:  # the engine logged it too; stderr tells a caller that keeps only that
        print(exc.message, file=sys.stderr)
        return int(exc.code)
    finally:
        destroy_distributed()
    return 0
