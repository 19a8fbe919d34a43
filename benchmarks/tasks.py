"""The benchmark's tasks; each runs in its own process by default and returns a JSON-able dict.

``settings`` is the resolved command line (see ``benchmarks.run.resolve_settings``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from benchmarks.harness import (Cycle, PeakMemory, Problem, SyntheticBatches, build_pieces, count_flops, eval_batch,
                                load_problem, log, new_evaluator, one_line, prototypes, summarize, sync, timed,
                                train_step)
from benchmarks.harness import Mode


def _problem(settings: dict) -> Problem:
    return load_problem(settings["config"], settings["config_path"])


def _device(settings: dict) -> torch.device:
    return torch.device(settings["device"])


def _failure(mode: Mode, err: BaseException) -> str:
    text = one_line(err)
    if "Expected more than 1 value per channel when training" in text:
        text += " [training needs batch >= 2: BatchNorm of the ASPP image-pooling branch]"
    if isinstance(err, torch.OutOfMemoryError):
        return f"out of memory: {text}"
    if mode.compile and not isinstance(err, FloatingPointError):
        return f"compile failed: {text}"
    return f"failed: {text}"


def eval_inputs(settings: dict, problem: Problem, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``eval_images`` full-resolution images in batches of ``eval_batch``: random synthetic
    images (every class, unseen included) or the config's first validation images resized."""
    width, height = settings["eval_size"]
    count, batch = settings["eval_images"], settings["eval_batch"]
    if settings["eval_source"] == "val":
        from data_loader import prepare_data
        val_set = prepare_data(settings["data"], train=False, val=True,
                               source=settings["data_config_path"]).val_set
        images, labels = [], []
        for index in range(count):
            item = val_set[index % len(val_set)]
            images.append(F.interpolate(item["image"][None].float(), size=(height, width), mode="bilinear",
                                        align_corners=False)[0])
            labels.append(F.interpolate(item["label"][None, None].float(), size=(height, width),
                                        mode="nearest")[0, 0].long())
        images, labels = torch.stack(images), torch.stack(labels)
    else:
        synth = SyntheticBatches(problem.split.num_classes, settings["seed"] + 7)
        images, labels = synth.make(count, height, width, range(problem.split.num_classes))
    return [(images[i:i + batch].to(device), labels[i:i + batch].to(device)) for i in range(0, count, batch)]


def train_inputs(settings: dict, problem: Problem, device: torch.device, count: int, seed_offset: int = 0):
    """``count`` synthetic training batches (seen classes only, as training with unseen images removed)."""
    synth = SyntheticBatches(problem.split.num_classes, settings["seed"] + seed_offset)
    crop, batch = settings["crop"], settings["batch"]
    return [tuple(t.to(device) for t in synth.make(batch, crop, crop, problem.split.seen)) for _ in range(count)]


def _time_train(pieces, settings: dict, next_batch, label: str) -> dict:
    """Warm-up then timed training steps; ``next_batch()`` -> (images, labels) on the device,
    called inside the timed region (so data loading is included when it loads)."""
    device = pieces.device
    pieces.model.train()
    pieces.semantic_encoder.train()
    warmup, steps = settings["warmup"], settings["steps"]
    warm, times, loss = [], [], None
    for i in range(warmup + steps):
        def step():
            images, labels = next_batch()
            return train_step(pieces, images, labels)
        loss, seconds = timed(device, step)
        (warm if i < warmup else times).append(seconds)
        log(f"  [{pieces.mode.name}] {label} {'warm-up' if i < warmup else 'step'} "
            f"{i + 1 if i < warmup else i + 1 - warmup}/{warmup if i < warmup else steps}: {seconds:.3f} s, "
            f"loss {float(loss):.4f}")
    return {**summarize(times, settings["batch"]), "warmup_s": [round(s, 6) for s in warm],
            "final_loss": float(loss)}


def _time_eval(pieces, settings: dict, inputs) -> dict:
    device = pieces.device
    pieces.model.eval()
    protos = prototypes(pieces)
    scratch = new_evaluator(pieces)
    warm = []
    for i in range(settings["eval_warmup"]):
        images, labels = inputs[i % len(inputs)]
        _, seconds = timed(device, lambda: eval_batch(pieces, protos, images, labels, scratch))
        warm.append(seconds)
    evaluator = new_evaluator(pieces)
    times = []
    for images, labels in inputs:
        _, seconds = timed(device, lambda: eval_batch(pieces, protos, images, labels, evaluator))
        times.append(seconds)
        log(f"  [{pieces.mode.name}] eval batch {len(times)}/{len(inputs)}: {seconds:.3f} s")
    stats = summarize(times, inputs[0][0].shape[0])
    if any(images.shape[0] != stats["images_per_step"] for images, _ in inputs):  # a short last batch
        sizes = [images.shape[0] for images, _ in inputs]
        rates = [n / s for n, s in zip(sizes, times)]
        stats["images_per_s"] = {"min": min(rates), "median": sorted(rates)[len(rates) // 2], "max": max(rates)}
    return {**stats, "warmup_s": [round(s, 6) for s in warm], "batch": settings["eval_batch"],
            "size_hw": list(inputs[0][0].shape[-2:]), "images": sum(i.shape[0] for i, _ in inputs),
            "labelled_pixels": int(evaluator.confusion_matrix.sum())}


def _count_flops(settings: dict, problem: Problem, device: torch.device, skip: set) -> dict:
    plain = build_pieces(settings["config"], problem, Mode("fp32"), device, settings["seed"])
    images, labels = train_inputs(settings, problem, device, 1, seed_offset=99)[0]
    plain.model.train()
    plain.semantic_encoder.train()
    out = {"flops_train_step": count_flops(lambda: train_step(plain, images, labels))}
    if "eval" not in skip:
        plain.model.eval()
        protos = prototypes(plain)
        eimages, elabels = eval_inputs(settings, problem, device)[0]
        out["flops_eval_batch"] = count_flops(lambda: eval_batch(plain, protos, eimages, elabels, new_evaluator(plain)))
        out["flops_eval_batch_images"] = int(eimages.shape[0])
    return out


def mode_task(settings: dict, spec: dict) -> dict:
    """One mode: evaluation, training on synthetic batches (data excluded) and, when asked,
    training from the real DataLoader (data included); peak memory of each phase; FLOPs once."""
    mode = Mode.parse(spec["mode"])
    device = _device(settings)
    skip = set(settings["skip"])
    problem = _problem(settings)
    result: dict = {"mode": mode.name, "status": "ok", "errors": {}, "memory": {}}
    log(f"[{mode.name}] building ResNet-{settings['backbone']} DeepLabV3+ on {device}")
    pieces = build_pieces(settings["config"], problem, mode, device, settings["seed"], settings["checkpoint"])
    memory = PeakMemory(device)

    # evaluation first: on CPU freed memory may stay resident, so the smaller phase goes first
    if "eval" not in skip:
        inputs = eval_inputs(settings, problem, device)
        memory.reset()
        try:
            result["eval"] = _time_eval(pieces, settings, inputs)
        except Exception as err:  # noqa: BLE001 - reported in the table
            result["errors"]["eval"] = _failure(mode, err)
            log(f"[{mode.name}] eval {result['errors']['eval']}")
        result["memory"]["eval"] = memory.report()
        del inputs

    if "train" not in skip:
        batches = train_inputs(settings, problem, device, 2)
        counter = iter(range(10 ** 9))
        memory.reset()
        try:
            result["train"] = _time_train(pieces, settings, lambda: batches[next(counter) % len(batches)], "train")
        except Exception as err:  # noqa: BLE001
            result["errors"]["train"] = _failure(mode, err)
            log(f"[{mode.name}] train {result['errors']['train']}")
        result["memory"]["train"] = memory.report()
        del batches

    if spec.get("with_data") and "train" not in result["errors"]:
        from data_loader import build_dataloader, prepare_data
        train_set = prepare_data(settings["data"], train=True, val=False,
                                 source=settings["data_config_path"]).train_set
        loader = build_dataloader(train_set, batch_size=settings["batch"], train=True,
                                  num_workers=settings["workers"], pin_memory=settings["pin_memory"],
                                  persistent_workers=True, seed=settings["seed"])
        batches = Cycle(loader)

        def next_batch():
            batch = batches.next()
            return (batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))
        try:
            result["train_with_data"] = {**_time_train(pieces, settings, next_batch, "train+data"),
                                         "workers": settings["workers"]}
        except Exception as err:  # noqa: BLE001
            result["errors"]["train_with_data"] = _failure(mode, err)
            log(f"[{mode.name}] train+data {result['errors']['train_with_data']}")
        del batches, loader

    del pieces
    if spec.get("count_flops"):
        # FLOPs do not depend on the mode: counted once, on an uncompiled fp32 model, after the
        # timed phases (so its step does not raise their memory baselines).
        try:
            result.update(_count_flops(settings, problem, device, skip))
            log(f"[{mode.name}] FLOPs per training step: {result['flops_train_step'] / 1e9:.1f} G")
        except Exception as err:  # noqa: BLE001 - the timings are still useful
            result["errors"]["flops"] = f"failed: {one_line(err)}"
            log(f"[{mode.name}] FLOP count {result['errors']['flops']}")

    failed = {k: v for k, v in result["errors"].items() if k != "flops"}
    if failed:
        result["status"] = next(iter(failed.values()))
    return result


def data_task(settings: dict, spec: dict) -> dict:
    """DataLoader throughput (training transforms at the crop, batch as configured) with 0 and
    the configured number of workers; images/s in total and per worker."""
    from data_loader import build_dataloader, prepare_data
    train_set = prepare_data(settings["data"], train=True, val=False,
                             source=settings["data_config_path"]).train_set
    batch, count = settings["batch"], settings["data_batches"]
    out = {"batch": batch, "crop": settings["crop"], "dataset_images": len(train_set), "batches": count,
           "results": []}
    for workers in sorted({0, settings["workers"]}):
        loader = build_dataloader(train_set, batch_size=batch, train=True, num_workers=workers,
                                  pin_memory=settings["pin_memory"], persistent_workers=workers > 0,
                                  seed=settings["seed"])
        batches = Cycle(loader)
        # warm-up: worker start-up and the prefetched batches (2 per worker)
        _, startup = timed(torch.device("cpu"), lambda: [batches.next() for _ in range(max(1, 2 * workers))])
        images, seconds = timed(torch.device("cpu"), lambda: sum(len(batches.next()["image"]) for _ in range(count)))
        rate = images / seconds
        out["results"].append({"workers": workers, "images_per_s": rate,
                               "images_per_s_per_worker": rate / max(1, workers), "startup_s": round(startup, 4),
                               "images": images, "seconds": round(seconds, 4)})
        log(f"[data] {workers} worker(s): {rate:.1f} images/s")
        del batches, loader
    return out


def parity_task(settings: dict, spec: dict) -> dict:
    """Same seed, same batches: ``parity_steps`` training steps in fp32 and in the fast mode
    (loss after N steps); then fp32 batch-1 evaluation vs the fast mode's evaluation on the
    same (fp32-trained) weights and images (identical-pixel fraction)."""
    device = _device(settings)
    problem = _problem(settings)
    steps = settings["parity_steps"]
    reference, fast = Mode("fp32"), Mode.parse(settings["fast_mode"])
    batches = train_inputs(settings, problem, device, steps, seed_offset=1)
    inputs = eval_inputs(settings, problem, device)
    config = settings["config"]
    if settings.get("parity_dropout") == "off":
        config = copy.deepcopy(config)
        config["model"].setdefault("args", {})["dropout"] = False
    out: dict = {"steps": steps, "reference": reference.name, "fast": fast.name,
                 "dropout": settings.get("parity_dropout", "config")}
    losses, trained = {}, None
    for mode in (reference, fast):
        pieces = build_pieces(config, problem, mode, device, settings["seed"], settings["checkpoint"])
        pieces.model.train()
        pieces.semantic_encoder.train()
        torch.manual_seed(settings["seed"])  # the same dropout masks
        values = []
        for i, (images, labels) in enumerate(batches):
            values.append(float(train_step(pieces, images, labels)))
            log(f"  [parity {mode.name}] step {i + 1}/{steps}: loss {values[-1]:.5f}")
        losses[mode.name] = values
        if mode is reference:
            trained = ({k: v.detach().clone() for k, v in pieces.model.state_dict().items()},
                       {k: v.detach().clone() for k, v in pieces.semantic_encoder.state_dict().items()})
            # fp32 batch-1 evaluation (the reference of the evaluation target), timed
            single = [(images[i:i + 1], labels[i:i + 1]) for images, labels in inputs for i in range(len(images))]
            one = {**settings, "eval_batch": 1}
            ref_eval = _time_eval(pieces, one, single)
            ref_preds = _predict(pieces, single)
            out["reference_eval"] = {"images_per_s": ref_eval["images_per_s"], "batch": 1}
        else:
            pieces.model.load_state_dict(trained[0])
            pieces.semantic_encoder.load_state_dict(trained[1])
            fast_preds = _predict(pieces, inputs)
        del pieces
    ref_loss, fast_loss = losses[reference.name][-1], losses[fast.name][-1]
    out.update({"loss_reference": ref_loss, "loss_fast": fast_loss,
                "loss_rel_diff": abs(fast_loss - ref_loss) / max(abs(ref_loss), 1e-12),
                "losses_reference": losses[reference.name], "losses_fast": losses[fast.name]})
    same = int((ref_preds == fast_preds).sum())
    out["eval_agreement"] = {"pixels": ref_preds.numel(), "identical_pixels": same,
                             "identical_fraction": same / max(1, ref_preds.numel()),
                             "reference": "fp32 batch 1", "fast": f"{fast.name} batch {settings['eval_batch']}"}
    return out


def _predict(pieces, inputs) -> torch.Tensor:
    pieces.model.eval()
    protos = prototypes(pieces)
    evaluator = new_evaluator(pieces)
    preds = [eval_batch(pieces, protos, images, labels, evaluator).cpu() for images, labels in inputs]
    sync(pieces.device)
    return torch.cat(preds)


TASKS = {"mode": mode_task, "data": data_task, "parity": parity_task}
