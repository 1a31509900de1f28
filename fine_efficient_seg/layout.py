"""Where every fine step reads and writes under one experiment's output_dir: the one description of the run folder.

    <output_dir>/
    ├── run.json                  stage, fold and dataset of this experiment (common.storage.step_marker)
    ├── steps.log                 log of the steps (each round also has its own train.log)
    ├── db/unlabeled_boxes        LMDB: the coarse model's box of every unlabeled case and its region (boxes step)
    ├── db/unlabeled_regions/     <id>.npy: box + crop.max_extend_size_mm, canonical int16 (boxes step)
    ├── round1/                   CPS round 1 on labeled + every unlabeled case (a training run folder)
    ├── uif_scores.csv            filter 1 (uif step): case, score, kept, rank
    ├── uif.json                  filter 1's marker: what its pool was made from
    ├── db/uif_pool               filter 1's pool: the kept unlabeled records with their box, score and rank
    ├── round2/                   CPS round 2 on labeled + filter 1's pool
    ├── uif_round<k>/             filter k >= 2 (uif.rounds > 1): uif_scores.csv, uif.json, db/uif_pool
    ├── round<k+1>/               the round trained on filter k's pool
    └── export.json               what the export step wrote to export.dir

Filter k scores the pool with the networks of round k and feeds round k + 1; filter 1's files keep the places they
have always had, so run folders of earlier versions resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STEPS_LOG = "steps.log"
BOXES_DB = "db/unlabeled_boxes"
REGIONS_DIR = "db/unlabeled_regions"
SCORES_FILE = "uif_scores.csv"
UIF_MARKER = "uif.json"
POOL_DB = "db/uif_pool"
EXPORT_MARKER = "export.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one fine experiment (`RunLayout(cfg.output_dir)`); filters and rounds are numbered from 1."""

    output_dir: Path

    def __init__(self, output_dir: str | os.PathLike) -> None:
        object.__setattr__(self, "output_dir", Path(output_dir))

    @property
    def boxes_db(self) -> Path:
        return self.output_dir / BOXES_DB

    @property
    def regions_dir(self) -> Path:
        return self.output_dir / REGIONS_DIR

    @property
    def steps_log(self) -> Path:
        return self.output_dir / STEPS_LOG

    @property
    def export_marker(self) -> Path:
        return self.output_dir / EXPORT_MARKER

    def round_dir(self, k: int) -> Path:
        """Training run folder of round k (1: labeled + every unlabeled case; k > 1: filter k - 1's pool)."""
        if k < 1:
            raise ValueError(f"rounds are numbered from 1, got {k}")
        return self.output_dir / f"round{k}"

    def uif_dir(self, k: int) -> Path:
        """Folder of filter k's files: output_dir itself for filter 1, uif_round<k>/ after."""
        if k < 1:
            raise ValueError(f"filters are numbered from 1, got {k}")
        return self.output_dir if k == 1 else self.output_dir / f"uif_round{k}"

    def scores_csv(self, k: int = 1) -> Path:
        return self.uif_dir(k) / SCORES_FILE

    def uif_marker(self, k: int = 1) -> Path:
        return self.uif_dir(k) / UIF_MARKER

    def pool_db(self, k: int = 1) -> Path:
        return self.uif_dir(k) / POOL_DB
