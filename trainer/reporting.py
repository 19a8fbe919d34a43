"""Where a run's results go: console and train.log tables, metrics.jsonl, sweep files,
prediction masks and TensorBoard (scalars, sweep curve, images)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from data_loader.transforms import denormalize
from trainer.sweep import format_sweep_table, sweep_figure, write_sweep
from utils.run_dir import METRICS_NAME, TENSORBOARD_NAME, backup_path, predictions_name, sweep_name
from utils.util import json_safe, storage_error, write_text
from utils.visualization import colorize, save_mask

logger = logging.getLogger("joem")


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def format_metrics_table(record: dict) -> str:
    """Three-line summary: pixel acc, class acc and mIoU for seen / unseen / harmonic / overall."""
    rows = [f"{'':10s} {'seen':>6s} {'unseen':>6s} {'harm.':>6s} {'all':>6s}"]
    for label, prefix in (("pixel acc", "pixel_acc"), ("class acc", "class_acc"), ("mIoU", "mIoU")):
        rows.append(f"{label:10s} " + " ".join(_fmt(record[f'{prefix}_{g}'])
                                              for g in ("seen", "unseen", "harmonic", "overall")))
    return "\n".join(rows)


def format_class_table(record: dict, unseen_names: Sequence[str]) -> str:
    """Per-class IoU table, unseen classes marked with '*'."""
    lines = ["class                    IoU"]
    for name, value in record["iou_by_class"].items():
        mark = "*" if name in unseen_names else " "
        lines.append(f"{mark}{name:22s} {'n/a' if value is None else f'{value:6.2f}'}")
    lines.append("(* = unseen class)")
    return "\n".join(lines)


class Reporter:
    """Writes one run's results (main process only; the other processes get ``is_main=False``
    and write nothing). ``tensorboard``: open a SummaryWriter in ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path, unseen_names: Sequence[str], is_main: bool = True, tensorboard: bool = False,
                 log_step: int = 50, precision: str | None = None):
        self.run_dir = Path(run_dir)
        self.precision = precision   # the resolved precision, written into every metrics.jsonl line
        self.unseen_names = list(unseen_names)
        self.is_main = is_main
        self.log_step = log_step
        self.metrics_path = self.run_dir / METRICS_NAME
        self.writer = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            folder = self.run_dir / TENSORBOARD_NAME
            _quiet_writer_threads()
            with self._tensorboard_errors("write into" if folder.is_dir() else "create folder"):
                self.writer = SummaryWriter(log_dir=str(folder))

    @contextlib.contextmanager
    def _tensorboard_errors(self, what: str = "write into") -> Iterator[None]:
        """A failed TensorBoard write (its events are written by a thread that reports the error
        at the next call) is a one-line StorageError naming the folder."""
        try:
            yield
        except OSError as err:
            self.writer = None   # nothing more is written there (closing it would fail again)
            raise storage_error(err, self.run_dir / TENSORBOARD_NAME, what) from None

    @property
    def wants_images(self) -> bool:
        return self.writer is not None

    def training_step(self, global_step: int, losses: dict[str, torch.Tensor]) -> None:
        if self.writer is not None and global_step % self.log_step == 0:
            with self._tensorboard_errors():
                for key, value in losses.items():
                    self.writer.add_scalar(f"train/loss_{key}", float(value), global_step)

    def epoch(self, epoch: int, epochs: int, means: dict[str, float], lrs: dict[str, float], seconds: float,
              steps: int) -> None:
        if not self.is_main:
            return
        logger.info("epoch %d/%d  loss %.4f (ce %.4f, bar %.4f, sc %.4f)  lr %s  %.1fs (%.2f s/step)",
                    epoch, epochs, means["loss_total"], means["loss_ce"], means["loss_bar"], means["loss_sc"],
                    " ".join(f"{k}={v:.3g}" for k, v in lrs.items()), seconds, seconds / max(1, steps))
        if self.writer is not None:
            with self._tensorboard_errors():
                for key, value in {**means, **{f"lr_{k}": v for k, v in lrs.items()}}.items():
                    self.writer.add_scalar(f"epoch/{key}", value, epoch)
                self.writer.flush()

    def evaluation(self, epoch: int, split_name: str, main: dict, records: list[dict], summary: dict | None,
                   samples: list[dict]) -> None:
        """Tables, metrics.jsonl (one line per sigma; the headline line carries the sweep's AUSUC
        and best sigma), the sweep's files and TensorBoard for one evaluation."""
        if not self.is_main:
            return
        logger.info("%s (epoch %d, sigma %g):\n%s", split_name, epoch, main["sigma"], format_metrics_table(main))
        logger.info("per-class IoU:\n%s", format_class_table(main, self.unseen_names))
        lines = [json.dumps(json_safe({"epoch": epoch, "split": split_name, "precision": self.precision,
                                       **(main if record["sigma"] == main["sigma"] else record)})) + "\n"
                 for record in records]
        append_text(self.metrics_path, "".join(lines))
        if summary is not None:
            logger.info("calibration sweep (%s, epoch %d):\n%s", split_name, epoch, format_sweep_table(summary))
            paths = write_sweep(self.run_dir, summary, sweep_name(split_name))
            logger.info("sweep written: %s", ", ".join(str(p) for p in paths))
        if self.writer is not None:
            with self._tensorboard_errors():
                for key, value in main.items():
                    if isinstance(value, float):
                        self.writer.add_scalar(f"{split_name}/{key}", value, epoch)
                if summary is not None:
                    self.writer.add_figure(f"{split_name}/seen_unseen_curve", sweep_figure(summary), epoch)
                for index, sample in enumerate(samples):
                    panel = torch.cat([denormalize(sample["image"]), colorize(sample["label"]),
                                       colorize(sample["pred"][0])], dim=2)
                    self.writer.add_image(f"{split_name}/image_truth_prediction_{index}", panel, epoch)
                self.writer.flush()

    def keep_records_until(self, epoch: int) -> None:
        """A run continued in its folder from the end of ``epoch``: evaluations it will redo are
        moved out of ``metrics.jsonl`` (the whole earlier file is kept as ``metrics.previous-N.jsonl``)."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
        if len(kept) == len([line for line in lines if line.strip()]):
            return
        backup = backup_path(self.metrics_path)
        self.metrics_path.rename(backup)
        write_text("".join(line + "\n" for line in kept), self.metrics_path)
        logger.info("%s: %d evaluation(s) after epoch %d will be redone (the earlier file is %s)",
                    METRICS_NAME, len(lines) - len(kept), epoch, backup.name)

    def prediction_writer(self, split_name: str) -> Callable[[str, torch.Tensor], None]:
        """A function saving each image's predicted labels as ``predictions_<split>/<name>.png``
        (palette PNG, values = class indices; every process writes its own shard)."""
        folder = self.run_dir / predictions_name(split_name)
        folder.mkdir(parents=True, exist_ok=True)

        def write(name: str, labels: torch.Tensor) -> None:
            save_mask(labels, folder / f"{Path(name).name}.png")
        return write

    def final(self, record: dict) -> None:
        """The last console lines: the headline mIoUs and where metrics.jsonl is."""
        if not self.is_main:
            return
        if record:
            logger.info("seen / unseen / harmonic mIoU: %s / %s / %s (sigma %g)", *(
                "n/a" if record.get(k) is None else f"{record[k]:.2f}"
                for k in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic")), record["sigma"])
        logger.info("metrics: %s", self.metrics_path)

    def close(self) -> None:
        if self.writer is not None:
            with self._tensorboard_errors():
                self.writer.close()
            self.writer = None


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread re-raises a failed write (a full disk, a read-only folder) after
    storing it for the next call, and Python prints that thread's traceback; the run reports it as
    one line at that next call (:meth:`Reporter._tensorboard_errors`), so the traceback is left out."""
    previous = threading.excepthook
    if getattr(previous, "quiet_writer_threads", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)
    hook.quiet_writer_threads = True
    threading.excepthook = hook


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to a file in one write; a failure (full disk, read-only folder) is a
    one-line StorageError and leaves the file as it was (no partial line)."""
    size = path.stat().st_size if path.is_file() else None
    try:
        with open(path, "a") as handle:
            handle.write(text)
    except OSError as err:
        if size is not None:
            try:
                os.truncate(path, size)
            except OSError:
                pass
        raise storage_error(err, path) from None
