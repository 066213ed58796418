"""Library modules log; the command line prints the records as kdcache printed its lines before (kdcache.log)."""

import contextlib
import io
import logging

import pytest

from kdcache.log import setup_cli_logging
from kdcache.progress import ProgressLines


@pytest.fixture
def kdcache_logger():
    """The "kdcache" logger as it was before the test (setup_cli_logging changes it for the whole process)."""
    logger = logging.getLogger("kdcache")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_the_command_line_prints_each_record_once_as_a_plain_line_on_the_current_stderr(kdcache_logger):
    setup_cli_logging()
    setup_cli_logging()   # a second command in the same process (kdcache.cli.run): still one line per record
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        logging.getLogger("kdcache.student.train").info("run: epoch 1/2: 3.1 s, 650 img/s")
        logging.getLogger("kdcache.student.train").warning("run: no checkpoint yet")
        logging.getLogger("kdcache.student.train").debug("not shown")
        logging.getLogger("elsewhere").warning("not kdcache's")
    assert err.getvalue().splitlines() == ["run: epoch 1/2: 3.1 s, 650 img/s", "kdcache: warning: run: no checkpoint yet"]


def test_a_result_goes_to_stdout_and_everything_else_to_stderr(kdcache_logger):
    from kdcache.log import RESULT
    setup_cli_logging()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        logging.getLogger("kdcache.report").info("teacher val top-1 80.5\nnone 79.1", extra=RESULT)
        logging.getLogger("kdcache.report").info("report: runs/x/report.md")
    assert out.getvalue() == "teacher val top-1 80.5\nnone 79.1\n"
    assert err.getvalue() == "report: runs/x/report.md\n"


def test_progress_lines_are_log_records_where_no_bar_can_be_seen(caplog):
    logger = logging.getLogger("kdcache.test_progress")
    lines = ProgressLines(True, file=io.StringIO(), interval=0, logger=logger)   # a StringIO is no terminal
    assert lines.due() and lines.tqdm_disabled()
    with caplog.at_level(logging.INFO, logger="kdcache"):
        lines.line("prepare train: 10/300 img, 5 img/s, ETA 58 s")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("kdcache.test_progress", logging.INFO, "prepare train: 10/300 img, 5 img/s, ETA 58 s")]
    assert not ProgressLines(False, file=io.StringIO()).due()
