"""Logging for the "semiseg" logger hierarchy: rank 0 to stdout (through tqdm, so bars stay intact), every rank
to its own log file.

`setup_logging` is called by entry points only (a stage's main/cli, predict.py, the evaluate and synthetic
command lines); library code logs through `get_logger(__name__)` and never configures handlers or levels. A run
that writes its own log file next to its outputs (the training engine's train.log) adds it with `log_to_file`
for the duration of the run."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

ROOT_LOGGER_NAME = "semiseg"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_HANDLER_FLAG = "_semiseg_setup_logging"


class TqdmStdoutHandler(logging.Handler):
    """Writes records with `tqdm.write` to the current `sys.stdout`, so running progress bars are redrawn below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # logging must never raise into the caller; report like logging.StreamHandler does
            self.handleError(record)


def setup_logging(log_file: str | os.PathLike | None, rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configure the "semiseg" logger: rank 0 logs to stdout, every rank appends to `log_file` (if given).

    Idempotent: handlers from an earlier call are closed and replaced, never duplicated. Records still
    propagate to the root logger (so pytest's caplog sees them); nothing is installed on the root logger.
    Returns the "semiseg" logger.
    """
    logger = logging.getLogger(ROOT_LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_FLAG, False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)
    formatter = _formatter(rank)
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(TqdmStdoutHandler())
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_FLAG, True)
        logger.addHandler(handler)
    return logger


def _formatter(rank: int) -> logging.Formatter:
    prefix = f"[rank {rank}] " if rank != 0 else ""
    return logging.Formatter(prefix + _FORMAT, datefmt=_DATE_FORMAT)


@contextlib.contextmanager
def log_to_file(log_file: str | os.PathLike, rank: int = 0) -> Iterator[None]:
    """Also append the "semiseg" records to `log_file` while the block runs (console and levels unchanged).

    Nested blocks for the same file add nothing (a stage's main and the engine may both ask for train.log)."""
    path = Path(log_file)
    logger = logging.getLogger(ROOT_LOGGER_NAME)
    target = os.path.abspath(path)
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in logger.handlers):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(_formatter(rank))
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)  # no entry point set a level: the run's log file still gets its INFO lines
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def get_logger(name: str) -> logging.Logger:
    """A child of the "semiseg" logger (`get_logger(__name__)` -> "semiseg.<module>")."""
    if name == ROOT_LOGGER_NAME or name.startswith(ROOT_LOGGER_NAME + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{ROOT_LOGGER_NAME}.{name}")


class WarningCollector(logging.Handler):
    """Keeps the messages of WARNING and above, for a worker process that hands them to its parent to log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def collect_warnings() -> WarningCollector:
    """Set up a worker process's logging (its entry point): the "semiseg" records of WARNING and above go to the
    returned collector only, none to a console or file of their own."""
    collector = WarningCollector()
    logger = logging.getLogger(ROOT_LOGGER_NAME)
    logger.addHandler(collector)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    return collector
