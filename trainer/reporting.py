"""Where a run's results go: console and train.log tables, metrics.jsonl, a calibration sweep's table,
figure and files, prediction masks and TensorBoard (scalars, sweep curve, images)."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from data_loader.transforms import denormalize
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


def format_sweep_table(summary: dict) -> str:
    """sigma | seen | unseen | harmonic, the best row marked, then AUSUC."""
    lines = [f"{'sigma':>8s} {'seen':>7s} {'unseen':>7s} {'harm.':>7s}"]
    for row in summary["rows"]:
        mark = "  <- best" if row is summary["best"] else ""
        lines.append(f"{row['sigma']:8.4g} " + " ".join(
            f"{row[k]:7.2f}" for k in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic")) + mark)
    for name, end in summary["ends"].items():
        lines.append(f"{name:>8s} {end['mIoU_seen']:7.2f} {end['mIoU_unseen']:7.2f}")
    lines.append(f"AUSUC (calibrated stacking 1e-3..1e3, ends included): {summary['ausuc']:.4f}")
    return "\n".join(lines)


def sweep_figure(summary: dict, title: str = ""):
    """Matplotlib figure of the seen-vs-unseen mIoU curve with the best sigma marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(5.2, 4.2), dpi=110)
    stacking = sorted(summary["ausuc_curve"], key=lambda r: -r["sigma"])   # seen end -> unseen end
    curve = [summary["ends"]["seen_only"], *stacking, summary["ends"]["unseen_only"]]
    axis.plot([r["mIoU_unseen"] for r in curve], [r["mIoU_seen"] for r in curve], ".-", color="0.65", lw=1, ms=3,
              zorder=1, label="calibrated stacking, 1e-3..1e3 (AUSUC)")
    rule = {"top2": "top-2", "all": "all-class"}[summary["calibration"]]
    axis.plot([r["mIoU_unseen"] for r in summary["rows"]], [r["mIoU_seen"] for r in summary["rows"]], "o-",
              c="tab:blue", ms=4, lw=1, zorder=2, label=f"sigma sweep ({rule} calibration)")
    best = summary["best"]
    axis.scatter([best["mIoU_unseen"]], [best["mIoU_seen"]], marker="*", s=180, c="tab:red", zorder=3,
                 label=f"best harmonic: sigma {best['sigma']:.3g} ({best['mIoU_harmonic']:.1f})")
    axis.set(xlabel="unseen mIoU (%)", ylabel="seen mIoU (%)", xlim=(0, 100), ylim=(0, 100))
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right", fontsize=8)
    axis.set_title(f"{title}AUSUC {summary['ausuc']:.4f}", fontsize=10)
    figure.tight_layout()
    return figure


def write_sweep(run_dir: Path, summary: dict, stem: str) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.png`` into the run directory."""
    paths = [Path(run_dir) / f"{stem}{suffix}" for suffix in (".json", ".csv", ".png")]
    paths[0].write_text(json.dumps(summary, indent=2) + "\n")
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sigma", "mIoU_seen", "mIoU_unseen", "mIoU_harmonic"])
        writer.writeheader()
        writer.writerows(summary["rows"])
    figure = sweep_figure(summary, title=f"{stem}: ")
    figure.savefig(paths[2])
    import matplotlib.pyplot as plt
    plt.close(figure)
    return paths


class Reporter:
    """Writes one run's results (the main process only); ``tensorboard``: also into ``run_dir/tensorboard``."""

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
        """A failed TensorBoard write (reported by its writer thread at the next call) is a one-line StorageError."""
        try:
            yield
        except OSError as err:
            self.writer = None   # nothing more is written there (closing it would fail again)
            raise storage_error(err, self.run_dir / TENSORBOARD_NAME, what) from None

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
        """Tables, metrics.jsonl (one line per sigma, the headline one with the sweep's AUSUC and best
        sigma), the sweep's files and TensorBoard for one evaluation."""
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
        """A run continued in its folder from the end of ``epoch``: the evaluations it redoes leave
        ``metrics.jsonl`` (the earlier file is kept as ``metrics.previous-N.jsonl``)."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epoch]
        if len(kept) == len(lines):
            return
        backup = backup_path(self.metrics_path)
        self.metrics_path.rename(backup)
        write_text("".join(line + "\n" for line in kept), self.metrics_path)
        logger.info("%s: %d evaluation(s) after epoch %d will be redone (the earlier file is %s)",
                    METRICS_NAME, len(lines) - len(kept), epoch, backup.name)

    def prediction_writer(self, split_name: str) -> Callable[[str, torch.Tensor], None]:
        """A function saving each image's labels as the palette PNG ``predictions_<split>/<name>.png``."""
        folder = self.run_dir / predictions_name(split_name)
        folder.mkdir(parents=True, exist_ok=True)
        return lambda name, labels: save_mask(labels, folder / f"{Path(name).name}.png")

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
    """Leave out the traceback Python prints when TensorBoard's writer thread re-raises a failed write
    (the run reports it as one line at the next call: :meth:`Reporter._tensorboard_errors`)."""
    previous = threading.excepthook
    if getattr(previous, "quiet_writer_threads", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)
    hook.quiet_writer_threads = True
    threading.excepthook = hook


def append_text(path: Path, text: str) -> None:
    """Append ``text`` in one write; a failure is a one-line StorageError and leaves the file as it was."""
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
