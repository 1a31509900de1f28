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
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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


PLAIN_PROGRESS_EVERY_S = 30.0
"""A progress line at most this often when the output is not a terminal (and one at the end)."""


def is_terminal(stream: Any) -> bool:
    """True when `stream` is an interactive terminal (progress bars redraw there; a file or pipe gets lines)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed stream
        return False


class PlainProgress:
    """The `progress` of a run whose output goes to a file (nohup, SLURM, CI): one plain log line every
    PLAIN_PROGRESS_EVERY_S seconds and one at the end, instead of a bar redrawn with carriage returns. Offers the
    part of tqdm's interface the project uses (iteration, update, set_postfix, set_postfix_str, close)."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.n = desc, unit, initial
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False
        self.logger = get_logger("progress")

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= PLAIN_PROGRESS_EVERY_S:
            self.last = now
            self._line()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n:
                self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100.0 * self.n / self.total:.0f} %)" if self.total else ""
        self.logger.info("%s: %s %s%s in %.0f s%s", self.desc, done, self.unit, share, elapsed,
                         f" [{self.postfix}]" if self.postfix else "")


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, initial: int = 0, file: Any = None, lines: bool = True) -> Any:
    """The project's progress display of a long loop: a tqdm bar on a terminal; when the output is a file or a pipe
    a `PlainProgress` (with `lines`) or nothing (without: the caller logs its own lines, as the training engine
    does every log_interval). `disable` turns it off either way."""
    stream = file if file is not None else sys.stderr
    if disable or is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, file=stream,
                    dynamic_ncols=True)
    if not lines:
        return tqdm(iterable, total=total, disable=True)
    return PlainProgress(iterable, total, desc, unit, initial)
