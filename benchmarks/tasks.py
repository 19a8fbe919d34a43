"""The measurements, one task each (a mode, the DataLoader, parity); ``opts``: ``benchmarks.run.resolve``."""
import functools
import itertools
import traceback
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import harness
from benchmarks.harness import Mode, Parts, Problem, rates, timed
from data_loader import build_dataloader, prepare_data
from utils.errors import first_line
from utils.malloc import retain_freed_memory
from utils.settings import Settings

Batch = tuple[torch.Tensor, torch.Tensor]


def synthetic(opts: dict, problem: Problem, seed: int, steps: int = 0) -> list[Batch]:
    """``steps`` training batches of seen classes, or (0) the evaluation batches of every class: 8 x 8 blocks
    of random classes under a band of 255 (ignore), each class's fixed colour plus noise (so the loss falls)."""
    (width, height), n, size = opts["eval_size"], opts["eval_images"], opts["eval_batch"]
    classes = torch.tensor(problem.split.seen if steps else range(problem.split.num_classes))
    if steps:   # training batches at the crop
        (width, height), n, size = [opts["crop"]] * 2, steps * opts["batch"], opts["batch"]
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(len(classes), (n, 1, -(-height // 8), -(-width // 8)), generator=generator)
    labels = classes[F.interpolate(blocks.float(), scale_factor=8.0)[:, 0, :height, :width].long()]
    labels[:, :max(1, height // 16)] = 255
    colours = torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    images = colours[labels].permute(0, 3, 1, 2) + 0.5 * torch.randn(n, 3, height, width, generator=generator)
    return [(images[i:i + size].contiguous().to(opts["device"]), labels[i:i + size].to(opts["device"]))
            for i in range(0, n, size)]

def loader_batches(opts: dict, workers: int, device: str) -> Iterator[Batch]:
    """Endless batches of the data config's training DataLoader (transforms at the crop), on ``device``."""
    settings = harness.load_settings(opts["data_config"], opts["backbone"], opts["crop"])
    train_set = prepare_data(settings.data, train=True, val=False, source=opts["data_config"]).train_set
    loader = build_dataloader(train_set, batch_size=opts["batch"], train=True, num_workers=workers,
                              pin_memory=opts["pin_memory"], persistent_workers=workers > 0, seed=opts["seed"])
    return ((batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))
            for batch in itertools.chain.from_iterable(itertools.repeat(loader)))

def time_train(parts: Parts, opts: dict, batches: Iterator[Batch]) -> dict:
    """Warm-up, then timed steps; the next batch is taken inside the timed region."""
    warmup, steps = opts["warmup"], opts["steps"]
    times = [timed(parts.device, lambda: parts.train_step(*next(batches)))[1] for _ in range(warmup + steps)]
    return {**rates(times[warmup:], [opts["batch"]] * steps), "warmup_s": times[:warmup]}

def time_eval(parts: Parts, inputs: list[Batch]) -> dict:
    """One warm-up batch, then every batch through the predictor into the confusion matrices."""
    predictor = parts.predictor()
    times = [timed(parts.device, functools.partial(parts.evaluate, predictor, *b))[1] for b in inputs[:1] + inputs]
    return {**rates(times[1:], [len(images) for images, _ in inputs]), "warmup_s": times[:1]}

def mode_task(opts: dict, spec: dict, settings: Settings, problem: Problem) -> dict:
    """One mode: evaluation, training on synthetic and (``with_data``) DataLoader batches, peak memory, FLOPs."""
    mode, device = Mode.parse(spec["mode"]), torch.device(opts["device"])
    parts, inputs = Parts(settings, problem, mode, device, opts["seed"]), synthetic(opts, problem, opts["seed"] + 7)
    batches = itertools.cycle(synthetic(opts, problem, opts["seed"], steps=2))
    phases = {"eval": lambda: time_eval(parts, inputs),   # first: freed CPU memory may stay resident
              "train": lambda: time_train(parts, opts, batches),
              "train_with_data": lambda: time_train(parts, opts, loader_batches(opts, opts["workers"], device))}
    row: dict = {"status": "ok", "errors": {}, "peak_bytes": {}}
    for name in [n for n in ("eval", "train") if n not in opts["skip"]] + ["train_with_data"] * spec["with_data"]:
        harness.reset_peak(device)
        try:
            row[name] = phases[name]()
        except Exception as err:  # noqa: BLE001 - reported in the table
            traceback.print_exc()
            row["errors"][name] = row["status"] = f"{'compile ' * mode.compile}failed: {first_line(err, 200)}"
        row["peak_bytes"][name] = harness.peak_bytes(device)
    if spec["count_flops"]:   # after the timed phases: its step raises no phase's peak
        with FlopCounterMode(display=False) as counter:   # convolutions and matrix products, not elementwise
            parts.train_step(*synthetic(opts, problem, opts["seed"] + 9, steps=1)[0])
        row["flops"] = {"mode": mode.name, "train_step": counter.get_total_flops()}
    return row

def data_task(opts: dict, spec: dict, settings: Settings, problem: Problem) -> dict:
    """DataLoader images/s with 0 and ``workers`` workers, after their start-up and prefetch."""
    def measure(workers: int) -> dict:
        batches, cpu = loader_batches(opts, workers, "cpu"), torch.device("cpu")
        timed(cpu, lambda: [next(batches) for _ in range(max(1, 2 * workers))])
        images, seconds = timed(cpu, lambda: sum(len(next(batches)[0]) for _ in range(opts["data_batches"])))
        return {"workers": workers, "images_per_s": images / seconds, "per_worker": images / seconds / max(1, workers)}
    return {"batch": opts["batch"], "crop": opts["crop"], "results": [measure(w) for w in sorted({0, opts["workers"]})]}

def parity_task(opts: dict, spec: dict, settings: Settings, problem: Problem) -> dict:
    """Loss after the same steps from one seed, fp32 vs fast mode; share of predictions equal to fp32 batch 1's."""
    device, fast = torch.device(opts["device"]), Mode.parse(opts["fast_mode"])
    runs = [Parts(settings, problem, mode, device, opts["seed"]) for mode in (Mode("fp32"), fast)]
    batches = synthetic(opts, problem, opts["seed"] + 1, steps=opts["parity_steps"])
    losses, predictions = [], []
    for parts in runs:
        torch.manual_seed(opts["seed"])   # the same dropout masks
        losses.append([float(parts.train_step(*batch)) for batch in batches])
    runs[1].visual.load_state_dict(runs[0].visual.state_dict())
    runs[1].semantic.load_state_dict(runs[0].semantic.state_dict())
    batched = [images for images, _ in synthetic(opts, problem, opts["seed"] + 7)]
    single = [image[None] for images in batched for image in images]
    for parts, inputs in zip(runs, (single, batched)):
        predictor = parts.predictor()
        predictions.append(torch.cat([predictor.labels(images)[0].cpu() for images in inputs]))
    reference, got = predictions
    return {"steps": len(batches), "fast": fast.name, "losses_fp32": losses[0], "losses_fast": losses[1],
            "loss_rel_diff": abs(losses[1][-1] - losses[0][-1]) / max(abs(losses[0][-1]), 1e-12),
            "identical_fraction": float((reference == got).double().mean()), "pixels": reference.numel(),
            "eval_batch": opts["eval_batch"]}

TASKS = {"mode": mode_task, "data": data_task, "parity": parity_task}

def execute(task: str, opts: dict, spec: dict) -> dict:
    """Run one task with the training entry points' allocator setting; an exception becomes its status."""
    try:
        retain_freed_memory()
        torch.set_num_threads(opts["threads"])
        settings = harness.load_settings(opts["config"], opts["backbone"], opts["crop"])
        return TASKS[task](opts, spec, settings, harness.load_problem(settings, opts["config"]))
    except Exception as err:  # noqa: BLE001 - the other tasks still run
        traceback.print_exc()
        return {"status": f"failed: {first_line(err, 300)}"}
