"""The one command-line helper: every command's parser, its one-line errors and its exit codes.

Exit codes of every command: 0 done; 1 done, but some inputs were skipped or problems found
(the command says which); 2 a bad argument, setting, input or file (one ``error: ...`` line on
stderr, no traceback); 3 training diverged; 128 + N stopped by signal N (143 SIGTERM, 130 SIGINT).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from utils.errors import ConfigError

EXIT_CODES = "exit status: 0 ok, 1 some inputs skipped or problems found, 2 bad input (one 'error:' line)"


class ArgParser(argparse.ArgumentParser):
    """``argparse`` whose argument errors are one ``error:`` line and exit 2 (no usage dump)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ConfigError(message)


def error_exit(err: ConfigError, code: int = 2) -> int:
    """A command's answer to a user error: one ``error: ...`` line on stderr, status 2."""
    print(f"error: {err}", file=sys.stderr)
    return code


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) and run; a ConfigError anywhere is one line and exit 2."""
    try:
        return run(parser.parse_args(argv)) or 0
    except ConfigError as err:
        return error_exit(err)
