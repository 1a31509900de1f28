"""The main job at CI size: `sh demo.sh` with tiny data and networks runs every stage through the same scripts."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT

TINY = {
    "DEMO_DATA_SIZE": "tiny",
    "DEMO_LABELED": "3",
    "DEMO_UNLABELED": "3",
    "DEMO_VAL": "2",
    "DEMO_COARSE_SIZE": "32",
    "DEMO_FINE_SIZE": "32",
    "DEMO_CHANNELS": "[2,4,4,8,8]",
    "DEMO_COARSE_ITERS": "4",
    "DEMO_FINE_ITERS": "4",
    "DEMO_VAL_INTERVAL": "2",
    "DEMO_UIF_ROUNDS": "2",
}


def _run_demo(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEMO_OUT=str(out), OMP_NUM_THREADS="1", **TINY)
    return subprocess.run(["sh", str(REPO_ROOT / "demo.sh")], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=900)


def test_demo_runs_every_stage_and_reuses_work(tmp_path):
    out = tmp_path / "demo_output"
    proc = _run_demo(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    ds = out / "dataset"
    for db in ("seg_raw_train", "seg_pre-process_database", "seg_train_fold_1", "seg_trainu"):
        assert (ds / "db" / db).is_dir(), db
    for db in ("unlabeled_boxes", "uif_pool"):  # the experiment's own databases, under its output_dir
        assert (out / "fine" / "db" / db / "data.mdb").is_file(), db
    assert not (ds / "db" / "seg_trainu_uif").exists()
    assert (out / "coarse" / "checkpoints" / "best_model_a.pt").is_file()
    assert (out / "fine" / "round1" / "checkpoints" / "best_model_b.pt").is_file()
    assert (out / "fine" / "round2" / "checkpoints" / "last.pt").is_file()
    # DEMO_UIF_ROUNDS=2: a second filter (uif_round2/) and round 3, which is the one exported
    assert (out / "fine" / "uif_round2" / "uif_scores.csv").is_file()
    assert str(out / "fine" / "round3") in (out / "fine" / "export.json").read_text()
    with open(out / "fine" / "uif_scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and sum(r["kept"] in ("1", "True", "true") for r in rows) == 2  # keep_ratio 0.5 of 3
    for stage in ("base_coarse_model", "efficient_fine_model"):
        assert (out / "model_weights" / stage / "model.pt").is_file()
    masks = sorted(p.name for p in (out / "predictions").glob("*.nii.gz"))
    assert masks == ["validation_000.nii.gz", "validation_001.nii.gz"]
    assert len(list((out / "predictions").glob("*_overlay.png"))) == 2
    with open(out / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    assert [r["Name"] for r in results] == masks
    assert "Liver_DSC" in results[0] and "LK_NSD" in results[0]
    # The UIF ranking is printed beside the truth of the round-1 pseudo labels: one line per unlabeled case.
    table = proc.stdout[proc.stdout.index("rank case"):] if "rank case" in proc.stdout else ""
    assert "true DSC" in proc.stdout and "Spearman(score, true error)" in table, proc.stdout[-3000:]
    assert sum(line.split()[1].startswith("trainu_") for line in table.splitlines()[1:4]) == 3
    assert (out / "round1_pool_predictions" / "trainu_0000.nii.gz").is_file()
    # The final table is printed, with the outputs' location.
    assert "mean" in proc.stdout.lower() and str(out) in proc.stdout

    # A second run reuses every finished step instead of training again.
    again = _run_demo(out)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    text = again.stdout + again.stderr
    assert "already finished" in text or "already done" in text or "skip" in text.lower()
