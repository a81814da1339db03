"""Where messages go: this project's lines on the console, other libraries' INFO lines, warnings and bars in the log."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from monai.apps.utils import get_logger
from tqdm import tqdm

from autoseg2d import run_log


@pytest.fixture
def console():
    """run_log configured onto a string console; the root logger and warning capture restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("autoseg2d").level)
    stream = io.StringIO()

    def configure(debug: bool = False) -> io.StringIO:
        run_log.configure(debug, stream=stream)
        return stream

    yield configure
    for handler in [h for h in root.handlers if h not in saved[0]]:
        root.removeHandler(handler)
        handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("autoseg2d").setLevel(saved[2])
    logging.captureWarnings(False)


def library_warning(text: str) -> None:
    warnings.warn_explicit(text, FutureWarning, "/venv/lib/python3.11/site-packages/monai/transforms/spatial.py", 7)


def test_a_monai_info_line_reaches_the_log_file_but_not_the_console(console, tmp_path, capsys):
    stream = console()
    monai_logger = get_logger("monai.apps.test_run_log")  # prints to stdout by itself, as MONAI's modules do
    run_log.route_library_loggers()
    log_file = run_log.attach_file(tmp_path / "autoseg.log")
    monai_logger.info("Using CPU for data analyzing!")
    logging.getLogger("autoseg2d.pipeline.test").info("=== stage 2/7: analyze ===")
    logging.getLogger("autoseg2d.pipeline.test").debug("planning notes")
    logging.getLogger("optuna.test").error("the storage is gone")
    library_warning("Orientationd labels default changed")
    warnings.warn_explicit("our own warning", UserWarning, "/work/autoseg2d/pipeline/ensemble.py", 3)

    shown, written = stream.getvalue(), log_file.read_text()
    assert "=== stage 2/7: analyze ===" in shown and "the storage is gone" in shown and "our own warning" in shown
    assert "Using CPU" not in shown and "Orientationd" not in shown and "planning notes" not in shown
    assert "Using CPU" not in capsys.readouterr().out  # MONAI's own stdout handler is gone
    for line in ("INFO monai.apps.test_run_log: Using CPU for data analyzing!", "=== stage 2/7: analyze ===",
                 "DEBUG autoseg2d.pipeline.test: planning notes", "FutureWarning: Orientationd labels default changed",
                 "ERROR optuna.test: the storage is gone"):
        assert line in written


def test_debug_shows_everything_on_the_console_too(console):
    stream = console(debug=True)
    get_logger("monai.apps.test_run_log_debug").info("Writing data stats")
    run_log.route_library_loggers()
    get_logger("monai.apps.test_run_log_debug").info("Writing by-case data stats")
    library_warning("get_mask_edges is deprecated")
    shown = stream.getvalue()
    assert "Writing by-case data stats" in shown and "get_mask_edges is deprecated" in shown


def test_lines_before_the_log_file_is_known_are_written_to_it(console, tmp_path):
    console()
    logging.getLogger("autoseg2d.check").info("input check: 5 cases checked")
    log_file = run_log.attach_file(tmp_path / "autoseg.log")
    logging.getLogger("autoseg2d.check").info("the next line")
    assert log_file.read_text().index("input check: 5 cases") < log_file.read_text().index("the next line")


def test_a_library_progress_bar_is_one_line_in_the_log(console, tmp_path, capsys):
    stream = console()
    log_file = run_log.attach_file(tmp_path / "autoseg.log")
    with run_log.stderr_to_log("monai.apps.auto3dseg.data_analyzer"):
        for _ in tqdm(range(7), mininterval=0):
            pass
    bars = [line for line in log_file.read_text().splitlines() if "data_analyzer" in line]
    assert len(bars) == 1 and "7/7" in bars[0]
    assert "7/7" not in stream.getvalue() + capsys.readouterr().err
