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
