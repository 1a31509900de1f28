"""benchmarks/gpu_check.py --smoke: every part of the GPU check runs on the CPU at tiny sizes and prints its table."""

from __future__ import annotations

import json

from benchmarks import gpu_check


def test_smoke_runs_every_part(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = gpu_check.main(["--smoke", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    failed = [r for r in rows if r["result"].startswith("FAILED")]
    assert rc == 0 and not failed, failed
    assert {r["part"] for r in rows} == set(gpu_check.PARTS)
    train = [r["what"] for r in rows if r["part"] == "train"]
    assert len(train) == 2 * len(gpu_check.TRAIN_VARIANTS)
    assert sum(r["part"] == "predict" for r in rows) == 4  # 3 cases + the run's memory row
    ddp = [r for r in rows if r["part"] == "ddp"]
    assert len(ddp) == 2 and all("gloo" in r["what"] and r["versus"] == "resume ok" for r in ddp)
    assert "| part | what | result | against |" in printed


def test_failing_part_still_prints_the_others(tmp_path, capsys, monkeypatch):
    def broken(setup, work, state):
        raise RuntimeError("simulated failure")

    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "train", broken)
    rc = gpu_check.main(["--smoke", "--parts", "train,pipeline", "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rc == 1
    assert rows[0]["part"] == "train" and "simulated failure" in rows[0]["result"]
    assert rows[1]["part"] == "pipeline" and "samples/s" in rows[1]["result"]
    assert "no fine step measured" in rows[1]["versus"]
