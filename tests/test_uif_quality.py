"""benchmarks/uif_quality.py: the statistics and the control selections it hands to round 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import stats
from benchmarks import uif_quality as q
from common.storage.lmdb_store import open_store
from fine_efficient_seg.uif import read_scores_csv


def test_spearman_and_auroc():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))  # constant: undefined
    assert stats.auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert stats.auroc([0.1], [0.1, 0.5]) == pytest.approx(0.25)  # one tie (half), one loss
    assert math.isnan(stats.auroc([], [0.1]))


def test_t_interval():
    mean, low, high = stats.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 * 1.0 / math.sqrt(3))
    assert math.isnan(stats.t_interval([1.0])[1])


def test_score_quality_perfect_and_inverted_scores():
    dsc = {f"u{i}": 0.9 - 0.1 * i for i in range(6)}           # u0 best ... u5 worst
    hard = {"u4", "u5"}
    perfect = {c: 1.0 - v for c, v in dsc.items()}             # score = true error
    r = q.score_quality(perfect, dsc, hard, keep=2, draws=500)
    assert r["spearman_vs_error"] == pytest.approx(1.0) and r["auroc_hard"] == 1.0
    assert r["auroc_worse"] == 1.0  # u3..u5 (below the median 0.65) all score less certain than u0..u2
    assert r["kept"] == ["u0", "u1"] and r["kept_dsc"] == pytest.approx(0.85) == r["oracle_dsc"]
    assert r["dropped_dsc"] == pytest.approx((0.7 + 0.6 + 0.5 + 0.4) / 4)
    assert r["random_dsc"] == pytest.approx(sum(dsc.values()) / 6, abs=0.02)   # the pool mean, on average
    inverted = q.score_quality({c: -s for c, s in perfect.items()}, dsc, hard, keep=2, draws=10)
    assert inverted["spearman_vs_error"] == pytest.approx(-1.0) and inverted["kept"] == ["u5", "u4"]
    assert inverted["auroc_worse"] == 0.0


def test_write_control_selection(tmp_path: Path):
    """A control selection: the control's own pool (with fine_cps's boxes) + uif_scores.csv in its folder."""
    from fine_efficient_seg.layout import RunLayout

    seed_dir = tmp_path / "seed0"
    pool = seed_dir / "dataset" / "db" / "seg_trainu"
    records = {f"u{i}": {"case": f"u{i}"} for i in range(4)}
    open_store(pool, readonly=False).put_many(records)
    boxes = {f"u{i}": {"coarse_box": [[0, i + 1], [0, 2], [0, 2]]} for i in range(4)}
    open_store(RunLayout(seed_dir / "fine_cps").boxes_db, readonly=False).put_many(boxes)
    q.write_control(seed_dir, "fine_oracle", {"u0": 0.5, "u1": 0.1, "u2": 0.9, "u3": 0.2}, keep=2)
    store = open_store(RunLayout(seed_dir / "fine_oracle").pool_db(1))
    assert store.keys() == ["u1", "u3"]
    assert store.get("u3")["coarse_box"] == [[0, 4], [0, 2], [0, 2]]
    store.close()
    rows = read_scores_csv(RunLayout(seed_dir / "fine_oracle").scores_csv(1))
    assert [(r.case, r.kept) for r in rows] == [("u1", True), ("u3", True), ("u0", False), ("u2", False)]
    assert open_store(pool).keys() == sorted(records)  # the original pool is untouched
    # a warm round 2 of the control starts from fine_cps's round 1, linked into its folder
    link = RunLayout(seed_dir / "fine_oracle").round_dir(1)
    assert link.is_symlink() and link.resolve() == (seed_dir / "fine_cps" / "round1").resolve()


def test_a_seed_folder_that_has_not_run_is_named_not_a_traceback(tmp_path: Path, capsys):
    assert q.main(["seed", "--seed-dir", str(tmp_path / "seed0"), "--keep", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "seed0" in err and "Traceback" not in err
    assert q.main(["report", str(tmp_path)]) == 2
    assert "no seed*/uif_quality.json" in capsys.readouterr().err


def test_ranking_of_a_missing_scores_file_is_named(tmp_path: Path, capsys):
    assert q.main(["ranking", "--scores", str(tmp_path / "uif_scores.csv"), "--dataset", str(tmp_path),
                   "--pred", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "uif_scores.csv: UIF scores not found" in err and "Traceback" not in err
