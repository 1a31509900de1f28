"""Smoke tests of benchmarks/semi_supervised.py's machinery (no training: commands, bookkeeping, the report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import semi_supervised as bench


def _settings(tmp_path: Path, *extra: str) -> bench.Settings:
    return bench.parse_args(["--seeds", "3", "--out", str(tmp_path / "out"), *extra])


def test_steps_cover_the_five_rows_in_order(tmp_path: Path) -> None:
    s = _settings(tmp_path, "--labeled", "4", "--labeled-val", "1", "--keep-ratio", "0.25", "--fine-iters", "7")
    steps = bench.seed_steps(s, 3)
    names = [st.name for st in steps]
    assert names[:6] == ["synthetic", "prepare", "ceiling_dataset", "prepare_ceiling", "coarse_train",
                         "coarse_export"]
    # round 1 is exported for row 2 before round 2 exists; row 3 is exported after round 2
    assert names.index("fine_cps_round1") < names.index("fine_lu_export") < names.index("fine_cps_round2") \
        < names.index("fine_lk_export")
    assert [n for n in names if n.startswith("predict_")] == ["predict_pool", "predict_l0", "predict_lu",
                                                               "predict_lk", "predict_lr", "predict_lo",
                                                               "predict_lc"]
    # the true pseudo-label quality needs round 1's pool prediction and comes before any round 2, whose control
    # rows read the selections it writes
    assert names.index("fine_lu_export") < names.index("predict_pool") < names.index("uif_quality") \
        < names.index("fine_cps_round2") < names.index("fine_random_round2") < names.index("fine_oracle_round2")
    argv = {st.name: st.argv for st in steps}
    # each control trains round 2 in its own experiment folder, where uif_quality stored its selection
    assert any(a.endswith("seed3/fine_random") and a.startswith("output_dir=") for a in argv["fine_random_round2"])
    assert any(a.endswith("seed3/fine_oracle") and a.startswith("output_dir=") for a in argv["fine_oracle_round2"])
    assert not any(a.startswith("data.unlabeled_db=") for a in argv["fine_random_round2"])
    assert any(a.endswith("seed3/fine_oracle") for a in argv["fine_lo_export"])
    assert "--scan-profiles" in argv["synthetic"] and "shift" in argv["synthetic"]
    # every round-2 row trains with the same network seeds and iterations: only the selection differs
    for name in ("fine_random_round2", "fine_oracle_round2"):
        assert [a for a in argv[name] if "seed" in a.split("=")[0] or "iterations" in a] == \
            [a for a in argv["fine_cps_round2"] if "seed" in a.split("=")[0] or "iterations" in a]
    quality = bench.seed_steps(bench.parse_args(["--seeds", "3", "--out", str(tmp_path / "q"), "--stop-after",
                                                 "quality"]), 3)
    assert quality[-1].name == "uif_quality" and not any("round2" in st.name for st in quality)
    assert "data.unlabeled_db=null" in argv["fine_l0"]
    assert "data.unlabeled_db=null" not in argv["fine_cps_round1"]
    assert "--labeled" in argv["synthetic"] and argv["synthetic"][argv["synthetic"].index("--labeled") + 1] == "5"
    # the split is pinned (the last --labeled-val labeled cases validate), not data_prepare's val_ratio draw
    assert argv["synthetic"][argv["synthetic"].index("--fold1-val") + 1] == "1"
    assert not any(a.startswith("val_ratio=") for a in argv["prepare"])
    # the ceiling row: row 1's training on the ceiling dataset (unlabeled cases with their truth)
    assert any(a.endswith("seed3/dataset_ceiling") for a in argv["fine_lc"]) and "data.unlabeled_db=null" in \
        argv["fine_lc"]
    assert [a for a in argv["fine_lc"] if not a.startswith(("data_base_dir=", "output_dir=", "export.dir="))] == \
        [a for a in argv["fine_l0"] if not a.startswith(("data_base_dir=", "output_dir=", "export.dir="))]
    assert "uif.keep_ratio=0.25" in argv["fine_cps_uif"]
    assert "schedule.iterations=7" in argv["fine_cps_round1"]
    # every path handed to a stage is absolute (run.sh changes directory)
    for st in steps:
        if st.name.startswith("predict_"):
            continue
        for arg in st.argv:
            if "=" in arg and ("dir=" in arg or "data_base_dir" in arg):
                assert Path(arg.split("=", 1)[1]).is_absolute(), arg
    # the network seeds differ per seed and between A and B
    assert "model.seed_a=301" in argv["coarse_train"] and "model.seed_b=302" in argv["coarse_train"]
    lu_export = next(st for st in steps if st.name == "fine_lu_export")
    assert lu_export.done_marker is not None and lu_export.done_marker.name == "model.pt"


def test_dry_run_prints_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--dry-run", "--seeds", "0", "1", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "# seed 0" in out and "# seed 1" in out and "fine_cps_round2:" in out
    assert not (tmp_path / "o").exists()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _settings(tmp_path, "--fine-size", "60")
    with pytest.raises(SystemExit):
        _settings(tmp_path, "--keep-ratio", "1.0")


def test_settings_change_is_refused(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    bench.check_settings(s, 3)
    bench.check_settings(s, 3)  # same settings: fine
    other = _settings(tmp_path, "--fine-iters", "11")
    with pytest.raises(SystemExit, match="fine_iters"):
        bench.check_settings(other, 3)


def test_uif_hard_share(tmp_path: Path) -> None:
    csv_path = tmp_path / "uif_scores.csv"
    csv_path.write_text("case,score,kept,rank\nu0,0.1,1,1\nu1,0.2,1,2\nu2,0.5,0,3\nu3,0.9,0,4\n", encoding="utf-8")
    meta = {"u0": {"hard": False}, "u1": {"hard": True, "hard_kinds": ["noise"]}, "u2": {"hard": True},
            "u3": {"hard": True}}
    meta_path = tmp_path / "synthetic_meta.json"
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    share = bench.uif_hard_share(csv_path, meta_path)
    assert share["kept"]["n"] == 2 and share["kept"]["hard"] == 1 and share["kept"]["share"] == 0.5
    assert share["dropped"]["n"] == 2 and share["dropped"]["hard"] == 2
    assert share["hard_ranks"] == [2, 3, 4]
    assert share["scores"]["u1"]["hard_kinds"] == ["noise"]


def test_summary_and_table(tmp_path: Path) -> None:
    s = _settings(tmp_path, "--unlabeled", "12", "--keep-ratio", "0.5")
    results = []
    for seed, base in ((0, 0.5), (1, 0.6)):
        rows = {row: {"DSC": base + 0.1 * i, "NSD": base + 0.05 * i} for i, row in enumerate(bench.ROWS)}
        uif = {"pool": 12, "kept": {"n": 6, "hard": 1}, "dropped": {"n": 6, "hard": 3}, "hard_ranks": [5, 8, 9, 12]}
        results.append({"seed": seed, "rows": rows, "uif": uif})
    summary = bench.summarize(results)
    assert summary["l0"]["DSC"]["mean"] == pytest.approx(0.55)
    assert summary["l0"]["DSC"]["std"] == pytest.approx(math.sqrt(0.005))
    assert summary["lk"]["DSC"]["diff_vs_l0"]["per_seed"] == pytest.approx([0.2, 0.2])
    report = bench.build_report(results, s, "python -m benchmarks.semi_supervised", 12.0)
    assert "| 4 / 0 |" in report and "| 4 / 12 |" in report and "4 / 12 -> 6 (UIF)" in report
    assert "0.5500 ± 0.0707" in report
    assert "| 0 | 12 | 1 / 6 | 3 / 6 | 5, 8, 9, 12 |" in report


def test_paired_deltas_have_t_intervals(tmp_path: Path) -> None:
    """UIF minus random, paired by seed, with the 95 % Student-t interval over seeds (t(0.975, 2) = 4.3027)."""
    s = _settings(tmp_path, "--unlabeled", "12", "--keep-ratio", "0.5")
    results = []
    for seed, gain in ((0, 0.01), (1, 0.03), (2, 0.02)):
        rows = {row: {"DSC": 0.5, "NSD": 0.4} for row in bench.ROWS}
        rows["lk"] = {"DSC": 0.5 + gain, "NSD": 0.4}
        results.append({"seed": seed, "rows": rows})
    text = bench.format_diffs(results, s)
    half = 4.302653 * 0.01 / math.sqrt(3)
    line = next(x for x in text.splitlines() if x.startswith("| 4 / 12 -> 6 (UIF) minus 4 / 12 -> 6 (random)"))
    assert f"+0.0200 [{0.02 - half:+.4f}, {0.02 + half:+.4f}]" in line
    assert "+0.0100, +0.0300, +0.0200" in line


def test_splits_give_the_counts_the_rows_name(tmp_path: Path) -> None:
    """Each seed's fold 1 holds exactly --labeled training and --labeled-val validation cases, in the dataset and
    in the ceiling dataset (which adds the unlabeled cases to training), whatever the seed: the benchmark's own
    synthetic and prepare steps, run in-process on tiny cases. (data_prepare's per-case val_ratio draw gave seed 0
    of the 4 + 1 setting 2 training and 3 validation cases.)"""
    from benchmarks import headroom
    from data_prepare import run as prepare
    from data_prepare import synthetic

    for seed, labeled, labeled_val in ((0, 4, 1), (1, 1, 2), (2, 3, 2)):
        s = bench.parse_args(["--seeds", str(seed), "--out", str(tmp_path / "out"), "--labeled", str(labeled),
                              "--labeled-val", str(labeled_val), "--unlabeled", "2", "--val", "1", "--size", "tiny",
                              "--coarse-size", "16", "--fine-size", "16", "--workers", "1"])
        steps = {st.name: st.argv for st in bench.seed_steps(s, seed)}
        assert synthetic.main(steps["synthetic"][3:]) == 0
        assert headroom.main(steps["ceiling_dataset"][3:]) == 0
        for name in ("prepare", "prepare_ceiling"):
            assert prepare.cli(steps[name][2:]) == 0
        sd = bench.seed_dir(s, seed)
        fold = json.loads((sd / "dataset" / "db" / "split.json").read_text())["folds"]["1"]
        assert (len(fold["train"]), len(fold["val"])) == (labeled, labeled_val)
        assert bench.row_label("l0", s) == f"{labeled} / 0"
        ceiling = json.loads((sd / "dataset_ceiling" / "db" / "split.json").read_text())["folds"]["1"]
        assert ceiling["val"] == fold["val"] and len(ceiling["train"]) == labeled + 2
        assert set(fold["train"]) < set(ceiling["train"])
