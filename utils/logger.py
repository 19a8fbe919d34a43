"""Console + file logging for a run: records before the run folder exists are kept and
written to its ``train.log`` once it does."""
from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from utils.run_dir import LOG_NAME

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def _add(root: logging.Logger, handler: logging.Handler) -> None:
    handler._joem = True   # the project's own handlers, replaced by the next start_logging
    root.addHandler(handler)


def start_logging(is_main: bool = True, level: int = logging.INFO) -> logging.Logger:
    """Console logging (main process: ``level``, others: warnings only); records are also kept
    in memory until :func:`log_to_file` names the run folder."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_joem", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    _add(root, console)
    if is_main:
        _add(root, logging.handlers.MemoryHandler(capacity=10 ** 6, flushLevel=logging.CRITICAL + 1))
    return logging.getLogger("joem")


def log_to_file(run_dir: Path) -> None:
    """Write the project's records to ``run_dir/train.log`` from now on, the kept ones first."""
    root = logging.getLogger()
    file_handler = logging.FileHandler(Path(run_dir) / LOG_NAME)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    for handler in list(root.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler) and getattr(handler, "_joem", False):
            handler.setTarget(file_handler)
            handler.flush()
            root.removeHandler(handler)
            handler.close()
    _add(root, file_handler)


def progress_enabled() -> bool:
    """tqdm bars only when stderr is a terminal (quiet in CI and log files)."""
    return sys.stderr.isatty()
