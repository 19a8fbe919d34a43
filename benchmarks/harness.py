"""Building blocks of the benchmark: modes, config, the pieces of a run (the project's own
builder, training step and inference path), synthetic batches, timing, peak memory, FLOPs."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from utils.errors import first_line

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "config_synthetic_zs3setting.json"
RESULTS_DIR = ROOT / "benchmarks" / "results"

# Dense peak TFLOP/s (bf16/fp16 tensor cores, fp32 without tensor cores), matched in order as
# case-insensitive substrings of the GPU name. Unknown GPU -> no MFU ("n/a").
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first non-empty line of the message``, plus the innermost cause when the error
    wraps another one (torch.compile errors do), for the table and the JSON."""
    text, root, seen = first_line(err), err, set()
    while root.__cause__ is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__
    if root is not err:
        text += f" (cause: {first_line(root)})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log(message: str) -> None:
    """Progress line on stderr (stdout is kept for the final report)."""
    print(message, file=sys.stderr, flush=True)


# --- modes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    """``fp32|bf16|fp16`` optionally followed by ``+cl`` (channels_last) and ``+compile``."""

    precision: str
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, text: str) -> "Mode":
        parts = [p.strip().lower() for p in text.split("+")]
        if not parts or parts[0] not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"mode {text!r}: must start with fp32, bf16 or fp16")
        flags = parts[1:]
        unknown = [f for f in flags if f not in ("cl", "compile")]
        if unknown or len(set(flags)) != len(flags):
            raise ValueError(f"mode {text!r}: options after '+' are 'cl' and 'compile', each at most once")
        return cls(parts[0], "cl" in flags, "compile" in flags)

    @property
    def name(self) -> str:
        return self.precision + ("+cl" if self.channels_last else "") + ("+compile" if self.compile else "")

    @property
    def amp(self) -> str | bool:
        """The value of ``trainer.amp`` this mode corresponds to."""
        return False if self.precision == "fp32" else self.precision

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def peak_tflops(gpu_name: str | None, precision: str) -> float | None:
    """Dense peak TFLOP/s of the GPU for ``precision`` (bf16/fp16 -> tensor cores), None if unknown."""
    if not gpu_name:
        return None
    for key, half, single in PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            return single if precision == "fp32" else half
    return None


# --- config and problem -----------------------------------------------------------------------
def load_config(path: str | Path, backbone: int, crop: int) -> dict:
    """The config with the benchmark's overrides: ResNet depth, ``data.crop_size`` = crop (and
    ``data.base_size`` raised to the crop so images are scaled to about the crop size)."""
    from utils.parse_config import load_config as load_json_config
    config = load_json_config(path)
    config.setdefault("model", {}).setdefault("args", {})["backbone"] = int(backbone)
    data = config.setdefault("data", {})
    data["crop_size"] = int(crop)
    if int(data.get("base_size", crop)) < crop:
        data["base_size"] = int(crop)
    return config


@dataclass
class Problem:
    """Class split and class embeddings (``note`` says when the embeddings are a stand-in)."""

    split: object
    embeddings: torch.Tensor
    note: str | None = None


def load_problem(config: dict, source: str) -> Problem:
    """Split and embeddings from the config's data (generates the synthetic data on first use).
    When the data/embeddings are not on this machine (e.g. the VOC config), the class split
    still comes from the config and the embeddings are random unit vectors (throughput does
    not depend on their values)."""
    from data_loader import prepare_data
    from data_loader.classes import parse_class_split
    from utils.errors import ConfigError
    from utils.settings import Settings
    settings = Settings.from_config(config, source)
    try:
        bundle = prepare_data(settings.data, train=False, val=False, source=source)
        return Problem(bundle.split, bundle.embeddings.float())
    except ConfigError as err:
        split = parse_class_split(settings.data, source)
        generator = torch.Generator().manual_seed(0)
        embeddings = F.normalize(torch.randn(split.num_classes, 300, generator=generator), dim=1)
        return Problem(split, embeddings, f"random stand-in embeddings ({one_line(err)})")


# --- the pieces of a training run -------------------------------------------------------------
class _CompiledFeatures:
    """Stands in for the model in the inference path: ``features`` is the compiled function."""

    def __init__(self, features: Callable):
        self.features = features


@dataclass
class Pieces:
    """Everything ``Trainer._train_step`` and ``evaluate`` use, built by the project's builders."""

    mode: Mode
    device: torch.device
    model: torch.nn.Module
    semantic_encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_gen: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    embeddings: torch.Tensor
    seen_object: torch.Tensor
    unseen_mask: torch.Tensor
    settings: object  # trainer.step.StepSettings
    sigma: float
    calibration: str
    split: object

    def __post_init__(self) -> None:
        self.train_fn: Callable = self.model
        self.features_model = self.model   # what evaluation calls ``.features`` on

    def compile(self) -> None:
        """``torch.compile`` the visual encoder (training forward and ``features`` for evaluation).
        Compilation itself happens lazily at the first call (the first warm-up step)."""
        self.train_fn = torch.compile(self.model)
        self.features_model = _CompiledFeatures(torch.compile(self.model.features))


def build_pieces(config: dict, problem: Problem, mode: Mode, device: torch.device, seed: int,
                 checkpoint: str | None = None) -> Pieces:
    """The run's pieces from the config, by the builders the Trainer uses (weights from
    ``checkpoint`` when given)."""
    from model.builder import build_encoders, load_encoder_weights, place
    from model.predictor import class_mask
    from segmentation.trained import read_model_checkpoint
    from trainer.optim import build_optimizers
    from trainer.step import StepSettings
    from utils.amp import amp_dtype
    from utils.settings import Settings

    settings = Settings.from_config(config, "benchmark config")
    split = problem.split
    torch.manual_seed(seed)
    model, semantic_encoder = build_encoders(settings, split.num_classes, problem.embeddings.shape[1], pretrained=False)
    if checkpoint:
        load_encoder_weights(model, semantic_encoder, read_model_checkpoint(checkpoint, settings), checkpoint)
    place(model, semantic_encoder, device, mode.channels_last)
    optimizer, optimizer_gen = build_optimizers(settings, model, semantic_encoder)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(mode.amp) == torch.float16)
    step = StepSettings.of(settings)
    step.amp, step.channels_last = mode.amp, mode.channels_last
    inference = settings.inference
    pieces = Pieces(
        mode=mode, device=device, model=model, semantic_encoder=semantic_encoder, optimizer=optimizer,
        optimizer_gen=optimizer_gen, scaler=scaler, embeddings=problem.embeddings.to(device),
        seen_object=torch.tensor(split.seen_object, device=device),
        unseen_mask=class_mask(split.num_classes, split.unseen, device), settings=step,
        sigma=inference.sigmas[0], calibration=inference.calibration, split=split)
    if mode.compile:
        pieces.compile()
    return pieces


def train_step(p: Pieces, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One training step: the Trainer's own ``trainer.step.train_step`` (non-distributed, no
    scheduler) on the mode's (possibly compiled) visual encoder; returns the total loss."""
    from trainer.step import train_step as joem_step
    losses = joem_step(p.train_fn, p.semantic_encoder, p.optimizer, p.optimizer_gen, p.scaler, images, labels,
                       p.embeddings, p.seen_object, p.settings)
    return losses["total"]


def prototypes(p: Pieces) -> torch.Tensor:
    from model.predictor import class_prototypes
    return class_prototypes(p.semantic_encoder, p.embeddings)


@torch.inference_mode()
def eval_batch(p: Pieces, protos: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
               evaluator) -> torch.Tensor:
    """One evaluation batch through the project's predictor (:class:`model.predictor.Predictor`:
    features under the mode's autocast, full-resolution calibrated nearest prototype at the
    configured sigma), then the confusion matrix."""
    from model.predictor import Predictor
    preds = Predictor(p.features_model, protos, p.unseen_mask, p.sigma, p.calibration, amp=p.mode.amp,
                      channels_last=p.mode.channels_last).labels(images)
    evaluator.add_batch(labels, preds)
    return preds


def new_evaluator(p: Pieces):
    from model.metric import Evaluator
    return Evaluator(p.split.num_classes, p.split.seen, p.split.unseen, device=p.device)


# --- synthetic inputs -------------------------------------------------------------------------
class SyntheticBatches:
    """Label maps of a few rectangles of the given classes on background, with some 255 (ignore)
    pixels; each class has a fixed random colour, the image is that colour plus noise (so the
    loss can decrease and the parity check compares real training)."""

    def __init__(self, num_classes: int, seed: int):
        self.num_classes = num_classes
        self.generator = torch.Generator().manual_seed(seed)
        colours = torch.randn(num_classes, 3, generator=self.generator)
        self.colours = torch.cat([colours, torch.zeros(1, 3)])  # last row: ignore pixels

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, max(high, low + 1), (1,), generator=self.generator))

    def make(self, batch: int, height: int, width: int, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.zeros(batch, height, width, dtype=torch.long)
        classes = [c for c in classes if c != 0] or [0]
        for i in range(batch):
            for _ in range(self._randint(1, 4)):
                h, w = self._randint(height // 6, height // 2 + 1), self._randint(width // 6, width // 2 + 1)
                y, x = self._randint(0, height - h + 1), self._randint(0, width - w + 1)
                labels[i, y:y + h, x:x + w] = classes[self._randint(0, len(classes))]
            h, w = max(1, height // 8), max(1, width // 3)        # one ignore band (~4% of pixels)
            y, x = self._randint(0, height - h + 1), self._randint(0, width - w + 1)
            labels[i, y:y + h, x:x + w] = 255
        index = torch.where(labels == 255, self.num_classes, labels)
        images = self.colours[index].permute(0, 3, 1, 2).contiguous()
        images += 0.5 * torch.randn(images.shape, generator=self.generator)
        return images, labels


# --- timing, memory, FLOPs ----------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable):
    """``(fn(), seconds)`` with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def summarize(seconds: Sequence[float], images_per_step: int) -> dict:
    """Per-step times and min/median/max images/s over them."""
    rates = [images_per_step / s for s in seconds]
    return {"step_s": [round(s, 6) for s in seconds], "images_per_step": images_per_step,
            "images_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)}}


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory of a phase: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the resident-set
    high-water mark (``VmHWM``) after resetting it through ``/proc/self/clear_refs``, or, where that
    is not possible, ``ru_maxrss`` (a process-lifetime peak; each mode runs in its own process)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_high_water_mark"
        self.baseline = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            if _status_kb("VmHWM") is None:
                raise OSError("no VmHWM")
        except OSError:
            self.kind = "ru_maxrss_process_lifetime"
        self.baseline = (_status_kb("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            sync(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss_high_water_mark":
            return (_status_kb("VmHWM") or 0) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def report(self) -> dict:
        peak = self.peak()
        return {"peak_bytes": peak, "baseline_bytes": self.baseline, "increase_bytes": max(0, peak - self.baseline),
                "kind": self.kind}


def count_flops(fn: Callable) -> int:
    """FLOPs of ``fn()`` counted by ``torch.utils.flop_counter.FlopCounterMode`` (forward and
    backward of convolutions, matmuls, etc.; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class Cycle:
    """Endless batches from a DataLoader (a new epoch when one ends)."""

    def __init__(self, loader):
        self.loader = loader
        self.iterator: Iterator = iter(loader)

    def next(self) -> dict:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)
