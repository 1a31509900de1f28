"""Errors that carry the offending file, so every message names the file and the problem."""

from __future__ import annotations

import os


class InputError(Exception):
    """A bad input file or folder: `str(error)` is "<path>: <problem>"."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep the two-argument form across process boundaries (worker pools)
        return (type(self), (self.path, self.problem))


class WeightsError(Exception):
    """Missing, corrupt or unusable model weights; the message names the file."""


class WriteError(OSError):
    """An output that could not be written completely (full disk, quota, file-size limit, I/O error); the partial file
    is removed. `str(error)` is "<path>: <problem>". An OSError, so callers that fall back on OSError still do."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"

    def __reduce__(self):  # keep the two-argument form across process boundaries (worker pools)
        return (type(self), (self.path, self.problem))
