"""Smoke tests of benchmarks/semi_supervised.py's machinery (no training: commands, bookkeeping, the report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import semi_supervised as bench
from benchmarks import stats


def _settings(tmp_path: Path, *extra: str) -> bench.Settings:
    return bench.parse_args(["--seeds", "3", "--out", str(tmp_path / "out"), *extra])


def _without(argv: list[str], *prefixes: str) -> list[str]:
    return [a for a in argv if not a.startswith(prefixes)]


def test_steps_build_every_row_from_one_start_and_in_order(tmp_path: Path) -> None:
    s = _settings(tmp_path, "--labeled", "4", "--labeled-val", "1", "--keep-ratio", "0.25", "--fine-iters", "7",
                  "--warmup-iters", "5", "--rounds", "3", "--lu-variant", "conf=cps.confidence=0.9")
    assert bench.rows_of(s) == ("l0", "lu", "lu_conf", "lk", "lk_fresh", "lr", "lo", "ln", "lc")
    assert [bench.row_label(row, s) for row in ("l0", "lu_conf", "lk", "lk_fresh", "ln")] == [
        "4 / 0", "4 / 12, cps.confidence=0.9", "4 / 12 -> 3 (UIF)", "4 / 12 -> 3 (UIF, fresh start)",
        "4 / 12 -> 3 x 3 (UIF)"]
    steps = bench.seed_steps(s, 3)
    names = [st.name for st in steps]
    assert names[:9] == ["synthetic", "prepare", "ceiling_dataset", "prepare_ceiling", "coarse_train",
                         "coarse_export", "fine_warm", "fine_l0", "fine_lc"]
    order = ["fine_cps_round1", "fine_lu_export", "fine_lu_conf_round1", "predict_pool", "fine_cps_uif", "uif_quality",
             "fine_cps_round2", "fine_lk_export", "fine_random_round2", "fine_oracle_round2", "fine_uif_fresh_round2",
             "predict_pool_round2", "fine_cps_uif2", "fine_cps_round3", "fine_round3_export", "predict_pool_round3",
             "fine_cps_uif3", "fine_cps_round4", "fine_ln_export"]
    assert [n for n in names if n in order] == order
    assert [n for n in names if n.startswith("predict_") and "pool" not in n] == [
        f"predict_{row}" for row in bench.rows_of(s)]
    argv = {st.name: st.argv for st in steps}
    warm = f"model.init_from={tmp_path / 'out' / 'seed3' / 'weights_warm' / 'efficient_fine_model'}"
    # every row starts from the shared warm-up, which itself starts fresh
    assert not any(a.startswith("model.init_from=") for a in argv["fine_warm"])
    for name in ("fine_l0", "fine_lc", "fine_cps_round1", "fine_lu_conf_round1", "fine_random_round2",
                 "fine_uif_fresh_round2"):
        assert warm in argv[name], name
    # L / 0 and L / U differ only in the unlabeled pool, and give a labeled crop the same CPS weight
    assert "cps.parts=separate" in argv["fine_l0"] and "cps.parts=separate" in argv["fine_cps_round1"]
    assert _without(argv["fine_l0"], "output_dir=", "export.dir=", "data.unlabeled_db=", "step=") == \
        _without(argv["fine_cps_round1"], "output_dir=", "step=")
    # the ceiling: L / 0's training on the ceiling dataset
    assert _without(argv["fine_lc"], "data_base_dir=", "output_dir=", "export.dir=") == \
        _without(argv["fine_l0"], "data_base_dir=", "output_dir=", "export.dir=")
    # a variant differs from L / U in its own override only
    assert _without(argv["fine_lu_conf_round1"], "output_dir=", "cps.confidence=0.9") == \
        _without(argv["fine_cps_round1"], "output_dir=")
    # the K rows: same start (round 1's end), seeds and iterations; only the selection (folder) differs, and the
    # start control only its start
    assert "round2.init=warm" in argv["fine_cps_round2"]
    for name in ("fine_random_round2", "fine_oracle_round2"):
        assert _without(argv[name], "output_dir=") == _without(argv["fine_cps_round2"], "output_dir=")
    assert _without(argv["fine_uif_fresh_round2"], "output_dir=", "round2.init=") == \
        _without(argv["fine_cps_round2"], "output_dir=", "round2.init=")
    assert argv["fine_uif_fresh_round2"][-2:] == ["round2.init=fresh", "step=round2"]
    assert "--other-start" in argv["uif_quality"] and "fresh" in argv["uif_quality"]
    # each export names its round; the N-rounds row is round 4 (uif.rounds=3)
    assert "export.round=1" in argv["fine_lu_export"] and "export.round=2" in argv["fine_lk_export"]
    assert "export.round=4" in argv["fine_ln_export"] and "uif.rounds=3" in argv["fine_cps_round4"]
    assert argv["synthetic"][argv["synthetic"].index("--labeled") + 1] == "5"
    # the split is pinned (the last --labeled-val labeled cases validate), not data_prepare's val_ratio draw
    assert argv["synthetic"][argv["synthetic"].index("--fold1-val") + 1] == "1"
    assert not any(a.startswith("val_ratio=") for a in argv["prepare"])
    assert "uif.keep_ratio=0.25" in argv["fine_cps_uif"] and "schedule.iterations=7" in argv["fine_cps_round1"]
    assert "schedule.iterations=5" in argv["fine_warm"]
    # every path handed to a stage is absolute (run.sh changes directory)
    for st in steps:
        for arg in st.argv:
            if "=" in arg and ("dir=" in arg or "data_base_dir" in arg or "init_from" in arg):
                assert Path(arg.split("=", 1)[1]).is_absolute(), arg
    # the network seeds differ per seed and between A and B
    assert "model.seed_a=301" in argv["coarse_train"] and "model.seed_b=302" in argv["coarse_train"]
    # every step's cost goes to its row, or to the shared steps
    assert {st.row for st in steps} == set(bench.rows_of(s)) | {None}
    quality = bench.seed_steps(bench.parse_args(["--seeds", "3", "--out", str(tmp_path / "q"), "--stop-after",
                                                 "quality"]), 3)
    assert quality[-1].name == "uif_quality" and not any("round2" in st.name for st in quality)


def test_regime_preset_and_explicit_options(tmp_path: Path) -> None:
    s = _settings(tmp_path, "--regime", "headroom")
    assert (s.anatomy, s.labeled, s.labeled_val, s.val, s.rounds) == ("varied", 2, 2, 24, 3)
    assert [v.split("=")[0] for v in s.lu_variants] == ["conf09", "w03", "joint"]
    mine = _settings(tmp_path, "--regime", "headroom", "--labeled", "3", "--lu-variant", "w05=cps.weight=0.5")
    assert mine.labeled == 3 and mine.lu_variants == ["w05=cps.weight=0.5"]
    with pytest.raises(SystemExit):
        _settings(tmp_path, "--lu-variant", "no_override")


def test_resolvable_difference() -> None:
    """(t_{0.975,n-1} + t_{0.8,n-1}) * sd / sqrt(n): n = 5, sd 0.02 -> (2.7764 + 0.9410) * 0.02 / sqrt(5)."""
    values = [0.01, 0.03, 0.05, 0.02, 0.04]
    assert stats.resolvable(values) == pytest.approx((2.776445 + 0.940965) * 0.0158114 / math.sqrt(5), rel=1e-4)
    assert math.isnan(stats.resolvable([0.1]))


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


def test_a_finished_run_takes_more_variant_rows_but_keeps_its_own(tmp_path: Path) -> None:
    """An L / U variant trains its own folder from the shared warm-up: adding one to a finished run is accepted and
    recorded; dropping or changing one, or adding one together with another setting, is refused."""
    base = ["--lu-variant", "w03=cps.weight=0.3"]
    bench.check_settings(_settings(tmp_path, *base), 3)
    more = _settings(tmp_path, *base, "--lu-variant", "joint=cps.parts=joint")
    bench.check_settings(more, 3)
    recorded = json.loads((bench.seed_dir(more, 3) / bench.SETTINGS_FILE).read_text())
    assert recorded["lu_variants"] == ["w03=cps.weight=0.3", "joint=cps.parts=joint"]
    assert "lu_joint" in bench.rows_of(more)
    for argv, problem in ((base, "lu_variants"), (["--lu-variant", "w03=cps.weight=0.5"], "lu_variants"),
                          ([*base, "--lu-variant", "joint=cps.parts=joint", "--lu-variant", "c=cps.confidence=0.8",
                            "--fine-iters", "11"], "fine_iters")):
        with pytest.raises(SystemExit, match=problem):
            bench.check_settings(_settings(tmp_path, *argv), 3)


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


def _results(s: bench.Settings, values: dict[int, dict[str, float]]) -> list[dict]:
    """Fake per-seed results: {seed: {row: DSC}} (shaped DSC = DSC + 0.1, NSD = DSC - 0.1)."""
    uif = {"pool": 12, "kept": {"n": 6, "hard": 1}, "dropped": {"n": 6, "hard": 3}, "hard_ranks": [5, 8, 9, 12]}
    return [{"seed": seed, "uif": uif, "shaped": ["Liver"], "row_cpu_s": {"l0": 600.0, "shared": 120.0},
             "rows": {row: {"DSC": v, "DSC_shaped": v + 0.1, "NSD": v - 0.1} for row, v in rows.items()}}
            for seed, rows in values.items()]


def test_summary_and_table(tmp_path: Path) -> None:
    s = _settings(tmp_path, "--unlabeled", "12", "--keep-ratio", "0.5", "--no-start-control")
    rows = bench.rows_of(s)
    results = _results(s, {0: {row: 0.5 + 0.1 * i for i, row in enumerate(rows)},
                           1: {row: 0.6 + 0.1 * i for i, row in enumerate(rows)}})
    summary = bench.summarize(results, s)
    half = 12.706205 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
    assert summary["l0"]["DSC"]["mean"] == pytest.approx(0.55)
    assert summary["l0"]["DSC"]["high"] - 0.55 == pytest.approx(half)
    assert summary["lk"]["DSC"]["diff_vs_l0"]["per_seed"] == pytest.approx([0.2, 0.2])
    report = bench.build_report(results, s, "python -m benchmarks.semi_supervised", 12.0)
    assert "| 4 / 0 | 0.5500 [" in report and "| 4 / 12 |" in report and "4 / 12 -> 6 (UIF)" in report
    assert "| 0 | 12 | 1 / 6 | 3 / 6 | 5, 8, 9, 12 |" in report
    assert "| 10.0 |" in report and "2.0 CPU min per seed" in report  # L / 0's own steps; the shared ones
    assert "Shaped organs" in report and "Liver" in report


def test_paired_deltas_have_t_intervals(tmp_path: Path) -> None:
    """UIF minus random, paired by seed, with the 95 % Student-t interval over seeds (t(0.975, 2) = 4.3027)."""
    s = _settings(tmp_path, "--unlabeled", "12", "--keep-ratio", "0.5")
    results = _results(s, {seed: {**{row: 0.5 for row in bench.rows_of(s)}, "lk": 0.5 + gain}
                           for seed, gain in ((0, 0.01), (1, 0.03), (2, 0.02))})
    text = bench.format_diffs(results, s)
    half = 4.302653 * 0.01 / math.sqrt(3)
    line = next(x for x in text.splitlines() if x.startswith("| 4 / 12 -> 6 (UIF) minus 4 / 12 -> 6 (random)"))
    assert f"+0.0200 [{0.02 - half:+.4f}, {0.02 + half:+.4f}]" in line
    assert "+0.0100, +0.0300, +0.0200" in line
    assert f"| {stats.resolvable([0.01, 0.03, 0.02]):.4f} |" in line
    ceiling = next(x for x in text.splitlines() if x.startswith("| 4 + 12 with truth / 0 (ceiling) minus 4 / 0"))
    assert "+0.0000" in ceiling


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


def test_shaped_organs_are_described_per_seed() -> None:
    """Each seed's dataset has its own shaped organs: the report names those of every seed and the others with
    their seeds (it once printed seed 0's list as if it held for all)."""
    results = [{"seed": 0, "shaped": ["Liver", "RK", "Pancreas"]}, {"seed": 1, "shaped": ["Liver", "RK", "Aorta"]},
               {"seed": 2, "shaped": ["Liver", "Aorta"]}]
    assert bench.describe_shaped(results) == \
        "Liver in every seed; RK (seeds 0, 1), Pancreas (seed 0), Aorta (seeds 1, 2)"
    assert bench.describe_shaped([{"seed": 0, "shaped": ["Liver"]}]) == "Liver in every seed"


def test_report_only_names_an_unfinished_seed_and_bad_channels_are_a_usage_error(tmp_path: Path, capsys) -> None:
    s = _settings(tmp_path, "--report-only")
    bench.check_settings(s, 3)  # the seed folder exists with its settings, but nothing ran
    with pytest.raises(bench.StepFailed, match="has not finished"):
        bench.run_seed(s, 3, 0.0)
    with pytest.raises(SystemExit) as exit_info:
        _settings(tmp_path, "--channels", "8,x")
    assert exit_info.value.code == 2 and "--channels '8,x'" in capsys.readouterr().err


def test_round_quality_takes_round1_from_uif_quality_and_scores_later_rounds(tmp_path: Path, monkeypatch) -> None:
    """Round 1's pool was scored by uif_quality: its DSC comes from that record, not a second evaluation."""
    from benchmarks import uif_quality
    from common.evaluation.uncertainty import UifRow
    from fine_efficient_seg.layout import RunLayout
    from fine_efficient_seg.uif import rows_to_csv

    s = _settings(tmp_path, "--rounds", "2")
    sd = tmp_path / "seed3"
    layout = RunLayout(sd / "fine_cps")
    for k, kept in ((1, {"c1"}), (2, {"c2"})):
        layout.uif_dir(k).mkdir(parents=True, exist_ok=True)
        layout.scores_csv(k).write_text(rows_to_csv([UifRow(c, 0.1 * i, c in kept, i + 1)
                                                     for i, c in enumerate(("c1", "c2"))]))
    scored = []

    def pool_truth(pred, dataset, out_csv):
        scored.append(pred.name)
        return {"c1": 0.2, "c2": 0.6}

    monkeypatch.setattr(uif_quality, "pool_truth", pool_truth)
    quality = {"cases": {"c1": {"dsc": 0.5}, "c2": {"dsc": 0.3}}}
    first, second = bench.round_quality(s, sd, quality)
    assert scored == ["pred_pool_round2"]
    assert (first["kept_dsc"], first["pool_dsc"], second["kept_dsc"], second["pool_dsc"]) == (0.5, 0.4, 0.6, 0.4)
