"""Console + file logging for a run."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(run_dir: Path | None, is_main: bool = True, level: int = logging.INFO) -> logging.Logger:
    """Send the project's log records to the console and ``run_dir/train.log`` (main process only)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_joem", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    handlers = [console]
    if run_dir is not None and is_main:
        file_handler = logging.FileHandler(Path(run_dir) / "train.log")
        file_handler.setFormatter(logging.Formatter(FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler._joem = True
        root.addHandler(handler)
    return logging.getLogger("joem")


def progress_enabled() -> bool:
    """tqdm bars only when stderr is a terminal (quiet in CI and log files)."""
    return sys.stderr.isatty()
