"""Tests for common.core.logger: stdout on rank 0, a file for every rank, no duplicate handlers."""

from __future__ import annotations

import logging

import pytest

from common.core.logger import get_logger, log_to_file, setup_logging


@pytest.fixture(autouse=True)
def _reset_semiseg_logger():
    yield
    logger = logging.getLogger("semiseg")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def test_file_and_stdout_rank0(tmp_path, capsys):
    log_file = tmp_path / "run" / "train.log"
    logger = setup_logging(log_file)
    assert logger.name == "semiseg"
    get_logger("stage.train").info("hello %d", 42)
    for handler in logger.handlers:
        handler.flush()
    text = log_file.read_text()
    assert "hello 42" in text and "semiseg.stage.train" in text and "INFO" in text
    assert text[:4].isdigit()  # starts with a timestamp
    assert "hello 42" in capsys.readouterr().out


def test_idempotent_no_duplicate_handlers(tmp_path, capsys):
    log_file = tmp_path / "train.log"
    setup_logging(log_file)
    logger = setup_logging(log_file)
    assert len(logger.handlers) == 2
    get_logger("x").info("once")
    for handler in logger.handlers:
        handler.flush()
    assert log_file.read_text().count("once") == 1
    assert capsys.readouterr().out.count("once") == 1


def test_other_rank_file_only_and_append(tmp_path, capsys):
    log_file = tmp_path / "rank1.log"
    log_file.write_text("earlier\n")
    logger = setup_logging(log_file, rank=1)
    get_logger("semiseg.engine").warning("from rank one")
    for handler in logger.handlers:
        handler.flush()
    text = log_file.read_text()
    assert text.startswith("earlier\n") and "[rank 1]" in text and "from rank one" in text
    assert "from rank one" not in capsys.readouterr().out


def test_no_file_and_level(tmp_path, capsys):
    logger = setup_logging(None, level=logging.WARNING)
    assert len(logger.handlers) == 1
    get_logger("y").info("hidden")
    get_logger("y").warning("shown")
    out = capsys.readouterr().out
    assert "hidden" not in out and "shown" in out


def test_get_logger_names():
    assert get_logger("common.config").name == "semiseg.common.config"
    assert get_logger("semiseg").name == "semiseg"
    assert get_logger("semiseg.a").parent is logging.getLogger("semiseg")


def test_records_reach_caplog(tmp_path, caplog):
    setup_logging(tmp_path / "t.log")
    with caplog.at_level(logging.INFO, logger="semiseg"):
        get_logger("z").info("seen by caplog")
    assert "seen by caplog" in caplog.text


def test_log_to_file_adds_a_run_log_for_the_block_only(tmp_path, capsys):
    """A run's own log file (the engine's train.log) is added and removed again; the console set up by the
    entry point is left as it was."""
    setup_logging(None)
    log = get_logger("semiseg.test")
    with log_to_file(tmp_path / "run" / "train.log"):
        log.info("inside the run")
    log.info("after the run")
    text = (tmp_path / "run" / "train.log").read_text()
    assert "inside the run" in text and "after the run" not in text
    out = capsys.readouterr().out
    assert "inside the run" in out and "after the run" in out
    assert len(logging.getLogger("semiseg").handlers) == 1


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_file(caplog, monkeypatch):
    import io

    from tqdm import tqdm

    from common.core import logger as logger_module
    from common.core.logger import PlainProgress, progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress(range(3), desc="x", file=Terminal()), tqdm)
    caplog.set_level("INFO")
    monkeypatch.setattr(logger_module, "PLAIN_PROGRESS_EVERY_S", 0.0)  # a line per step here
    stream = io.StringIO()  # a file: no terminal
    bar = progress(total=4, desc="prepare", unit="case", file=stream)
    assert isinstance(bar, PlainProgress)
    for _ in range(4):
        bar.update()
    bar.set_postfix_str("case_3")
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "semiseg.progress"]
    assert lines[0].startswith("prepare: 1/4 case (25 %)") and lines[-1].startswith("prepare: 4/4 case (100 %)")
    assert "[case_3]" in lines[-1] and stream.getvalue() == ""
    assert list(progress(range(3), desc="it", file=io.StringIO())) == [0, 1, 2]
    before = len(caplog.records)
    quiet_file = io.StringIO()
    silent = progress(total=2, file=quiet_file, lines=False)  # the engine logs its own lines
    silent.update()
    silent.close()
    assert len(caplog.records) == before and quiet_file.getvalue() == ""  # neither lines nor a bar
