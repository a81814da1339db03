"""The command line's contract with its user: one clear message per expected error, no raw return values,
and only this project's lines on the console (run_log: the rest goes to the work dir's log file).

Expected errors (bad input or options, a missing work dir, a profile or config error, a skipped
template, a failed training) are printed as one message on stderr with a non-zero exit; --debug
(or AUTOSEG2D_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
from collections.abc import Callable

import fire

from autoseg2d import run_log
from autoseg2d.run.bundles import TrainingError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "AUTOSEG2D_DEBUG"
# Every error class of this project derives from ValueError (input, datalist, profile, work dir, config,
# planning) or is a TrainingError; OSError covers files that cannot be read or written.
EXPECTED_ERRORS = (ValueError, OSError, TrainingError)
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def call_with_options(function: Callable, options: dict, command: str):
    """function(**options), refusing an unknown option with the closest known one (fire passes any --key on)."""
    known = [name for name, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY
             or p.kind is p.POSITIONAL_OR_KEYWORD]
    if options.get("help") is True and "help" not in known:  # fire hands --help on to a **options command
        print(f"{command}: {inspect.getdoc(function) or ''}\n\nOptions: {', '.join('--' + k for k in known)}",
              flush=True)
        return None
    unknown = [key for key in options if key not in known]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], known, n=1)
        raise ValueError(f"{command}: unknown option --{unknown[0]}" + (f"; did you mean --{hint[0]}?" if hint else "")
                         + f" Options: {', '.join('--' + k for k in known)}")
    return function(**options)


def without_return_value(command: Callable) -> Callable:
    """fire prints whatever a command returns (a dict as YAML-like lines): commands print their own summary."""
    @functools.wraps(command)
    def run(*args, **kwargs) -> None:
        command(*args, **kwargs)

    return run


def main(commands: dict[str, Callable], argv: list[str] | None = None, default: str = "run") -> int:
    """Run one command through fire; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv.insert(0, default)  # `run_autoseg.py --datalist ...` runs every stage
    run_log.configure(debug)
    try:
        fire.Fire({name: without_return_value(command) for name, command in commands.items()}, command=argv,
                  name=os.path.basename(sys.argv[0]))
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        print(f"\nerror: {err}\n(for the traceback run again with {DEBUG_FLAG} or {DEBUG_ENV}=1)", file=sys.stderr,
              flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
