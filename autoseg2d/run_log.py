"""Where a run's messages go: the console gets this project's lines, the work dir's log file gets everything.

Third-party INFO lines (MONAI's loggers print to stdout by themselves), Python warnings (a
FutureWarning of a MONAI transform, a missing optional decoder) and progress bars drawn by other
libraries go to the log file only; their errors still reach the console. This project's details
(logged at DEBUG, e.g. the planning notes of each configuration) go to the file too. --debug shows
everything on the console as well. Lines logged before the work dir is known are kept and written to
the file once it is attached.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_FILE_NAME = "autoseg.log"  # in the work dir
OWN_LOGGERS = ("autoseg2d", "segresnet2d", "__main__")  # the driver, the template's algo and config, the CLI
CONSOLE_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
WARNINGS_LOGGER = "py.warnings"  # where logging.captureWarnings sends warnings.warn
PENDING_RECORDS = 10_000  # kept until the log file is attached; a command without a work dir drops them


def is_own(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OWN_LOGGERS


def for_console(record: logging.LogRecord) -> bool:
    """This project's lines and warnings, and anyone's errors."""
    if record.name == WARNINGS_LOGGER and record.levelno < logging.ERROR:
        return not from_installed_library(record.getMessage())
    return is_own(record) or record.levelno >= logging.ERROR


def from_installed_library(warning: str) -> bool:
    """A captured warning reads '<file>:<line>: <category>: ...'; installed libraries live in site-packages."""
    source = warning.split(":", 1)[0]
    return "site-packages" in source or "dist-packages" in source


class _RunHandler(logging.Handler):
    """Marks the handlers this module installs, so that configuring again replaces them."""


class ConsoleHandler(logging.StreamHandler, _RunHandler):
    pass


class FileHandler(logging.FileHandler, _RunHandler):
    pass


class PendingHandler(logging.handlers.BufferingHandler, _RunHandler):
    def flush(self) -> None:  # full: the oldest records go (BufferingHandler would drop them all)
        del self.buffer[:len(self.buffer) - self.capacity]

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return len(self.buffer) > self.capacity


class ToRunHandlers(logging.Handler):
    """Stands in for a library logger's own printing handler: its records go to the root's handlers.

    Not propagation: MONAI's get_logger turns that off again whenever it is called for the same name.
    """

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _replace(handler: logging.Handler, kind: type) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, kind)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)


def configure(debug: bool = False, stream=None) -> None:
    """The console (stream, default stderr) and a pending buffer for the log file; debug: all lines on the
    console too."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    logging.getLogger(OWN_LOGGERS[0]).setLevel(logging.DEBUG)  # details are written to the file
    console = ConsoleHandler(stream or sys.stderr)
    console.setFormatter(CONSOLE_FORMAT)
    console.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        console.addFilter(for_console)
    _replace(console, ConsoleHandler)
    _replace(PendingHandler(PENDING_RECORDS), PendingHandler)
    logging.captureWarnings(True)  # warnings.warn -> the 'py.warnings' logger -> the log file
    route_library_loggers()


def attach_file(path: Path) -> Path:
    """Append everything to `path` from now on, after the lines kept so far; replaces an earlier log file."""
    handler = FileHandler(path, encoding="utf-8")
    handler.setFormatter(FILE_FORMAT)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    for pending in [h for h in root.handlers if isinstance(h, PendingHandler)]:
        for record in pending.buffer:
            handler.handle(record)
        root.removeHandler(pending)
    _replace(handler, FileHandler)
    route_library_loggers()
    return path


def route_library_loggers() -> None:
    """Loggers of other libraries that print by themselves (MONAI's get_logger adds a stdout handler and stops
    propagation) hand their records to the root's handlers instead: the file, and the console where due.

    Run when configuring and at each stage: a library module imported later may have made a new one.
    """
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or logger.name.split(".")[0] in OWN_LOGGERS:
            continue
        printers = [h for h in logger.handlers if type(h) is logging.StreamHandler]
        for handler in printers:
            logger.removeHandler(handler)
        if printers and not any(isinstance(h, ToRunHandlers) for h in logger.handlers):
            logger.addHandler(ToRunHandlers())
            logger.propagate = False  # the root's handlers have the record once


class _LinesToLog(io.TextIOBase):
    """A text stream whose lines become log records; of a line redrawn with '\\r' (a progress bar), the last
    drawing."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.pending = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._emit(line)
        self.pending = self.pending[self.pending.rfind("\r"):] if "\r" in self.pending else self.pending
        return len(text)

    def close(self) -> None:
        self._emit(self.pending)
        self.pending = ""
        super().close()

    def _emit(self, line: str) -> None:
        line = line.split("\r")[-1].strip()
        if line:
            self.logger.info(line)


@contextlib.contextmanager
def stderr_to_log(logger_name: str) -> Iterator[None]:
    """What a library writes to stderr meanwhile (tqdm draws its bars there) goes to the log as `logger_name`."""
    stream = _LinesToLog(logging.getLogger(logger_name))
    with contextlib.redirect_stderr(stream):
        try:
            yield
        finally:
            stream.close()
