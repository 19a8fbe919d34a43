"""Building blocks: modes, one mode's run parts from the project's own builders, timing, peak memory."""
import contextlib
import dataclasses
import resource
import statistics
import time
import types
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from data_loader import ClassSplit, parse_class_split, prepare_data
from model.builder import build_encoders, place
from model.predictor import Predictor
from trainer.evaluate import evaluate
from trainer.optim import build_optimizers
from trainer.step import StepSettings, train_step
from utils.errors import ConfigError, first_line
from utils.parse_config import load_config
from utils.settings import Settings


class Mode(NamedTuple):
    """``fp32|bf16|fp16`` with optional ``+cl`` (channels_last) and ``+compile`` (torch.compile)."""

    precision: str
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, text: str) -> "Mode":
        precision, *flags = [part.strip().lower() for part in text.split("+")]
        if precision not in ("fp32", "bf16", "fp16") or len(set(flags)) < len(flags) or set(flags) - {"cl", "compile"}:
            raise ConfigError(f"mode {text!r}: expected fp32, bf16 or fp16, then optionally +cl and/or +compile")
        return cls(precision, "cl" in flags, "compile" in flags)

    @property
    def name(self) -> str:
        return self.precision + "+cl" * self.channels_last + "+compile" * self.compile

def load_settings(path: str | Path, backbone: int, crop: int) -> Settings:
    """The config's settings with the benchmark's ResNet depth and crop (base size at least the crop)."""
    settings = Settings.from_config(load_config(path), str(path))
    model = dataclasses.replace(settings.model, args={**settings.model.args, "backbone": backbone})
    data = dataclasses.replace(settings.data, crop_size=crop, base_size=max(crop, settings.data.base_size or crop))
    return dataclasses.replace(settings, model=model, data=data)

# The class split and embeddings; ``note``: why the embeddings are a stand-in (None: the data's own).
Problem = NamedTuple("Problem", [("split", ClassSplit), ("embeddings", torch.Tensor), ("note", str | None)])

def load_problem(settings: Settings, source: str) -> Problem:
    """The data's split and embeddings, else (data not here) the config's split and random 300-d unit vectors."""
    try:
        bundle = prepare_data(settings.data, train=False, val=False, source=source)
        return Problem(bundle.split, bundle.embeddings.float(), None)
    except ConfigError as err:
        split = parse_class_split(settings.data, source)
        embeddings = F.normalize(torch.randn(split.num_classes, 300, generator=torch.Generator().manual_seed(0)), dim=1)
        return Problem(split, embeddings, f"random stand-in embeddings, the data is not here ({first_line(err)})")

class Parts:
    """One mode's encoders (random weights from ``seed``), optimizers and step, built as a run builds them."""

    def __init__(self, settings: Settings, problem: Problem, mode: Mode, device: torch.device, seed: int):
        amp = False if mode.precision == "fp32" else mode.precision   # the mode's trainer.amp and memory format
        trainer = dataclasses.replace(settings.trainer, amp=amp, channels_last=mode.channels_last)
        self.settings, self.split, self.device = dataclasses.replace(settings, trainer=trainer), problem.split, device
        torch.manual_seed(seed)
        self.visual, self.semantic = build_encoders(self.settings, self.split.num_classes,
                                                    problem.embeddings.shape[1], pretrained=False)
        place(self.visual, self.semantic, device, mode.channels_last)
        self.optimizers = build_optimizers(self.settings, self.visual, self.semantic)
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode.precision == "fp16")
        self.step_settings = StepSettings.of(self.settings)
        self.embeddings = problem.embeddings.to(device)
        self.seen_object = torch.tensor(self.split.seen_object, device=device)
        # the training forward and the predictor's model (anything with features()), compiled for +compile
        self.forward, self.features = (torch.compile(self.visual), types.SimpleNamespace(
            features=torch.compile(self.visual.features))) if mode.compile else (self.visual, self.visual)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One ``trainer.step.train_step``; the total loss."""
        self.visual.train()
        self.semantic.train()
        return train_step(self.forward, self.semantic, *self.optimizers, self.scaler, images, labels,
                          self.embeddings, self.seen_object, self.step_settings)["total"]

    def predictor(self) -> Predictor:
        """The predictor of the current weights, as ``--test`` builds it."""
        self.visual.eval()
        return Predictor.from_settings(self.features, self.semantic, self.embeddings, self.settings,
                                       self.split.unseen, self.split.never_predicted)

    def evaluate(self, predictor: Predictor, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch through ``trainer.evaluate.evaluate`` (every sigma's confusion matrix)."""
        seen = [c for c in self.split.seen if c not in self.split.never_predicted]
        evaluate(predictor, [{"image": images, "label": labels}], self.split.num_classes, seen, self.split.unseen,
                 device=self.device)

def timed(device: torch.device, fn: Callable) -> tuple[object, float]:
    """``(fn(), seconds)``, the device synchronised before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start

def rates(seconds: Sequence[float], images: Sequence[int]) -> dict:
    """Step times and min/median/max images/s over them."""
    per_step = [n / s for n, s in zip(images, seconds)]
    return {"step_s": seconds, "images_per_s": {"min": min(per_step), "median": statistics.median(per_step),
                                                "max": max(per_step)}}

def reset_peak(device: torch.device) -> None:
    """Start a phase's peak memory: CUDA peak stats, or the RSS high-water mark (Linux ``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")

def peak_bytes(device: torch.device) -> int:
    """CUDA max allocated since :func:`reset_peak`; on CPU the RSS high-water mark (``VmHWM``, else ``ru_maxrss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return 1024 * int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
