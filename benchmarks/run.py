"""Benchmark harness: ``python -m benchmarks.run [-c CONFIG] [--backbone 101] [--crop 312] [--batch 4] ...``

For one config, ResNet depth, crop and batch size it measures, per mode (fp32, bf16 autocast,
channels_last, torch.compile):
  * training step throughput (images/s, min/median/max over the timed steps after warm-up) on
    synthetic batches (data excluded) and, for the ``--data-modes``, from the config's DataLoader
    (data included);
  * evaluation throughput on full-resolution images (features + calibrated nearest prototype +
    confusion-matrix accumulation);
  * peak memory (CUDA max allocated on GPU, resident-set high-water mark on CPU);
  * achieved FLOP/s (FLOPs of one training step counted with ``torch.utils.flop_counter``) and,
    on a known GPU, model FLOP utilisation;
plus DataLoader throughput (0 and the configured workers), and a parity check (loss after N steps
fp32 vs the fast mode from the same seed; identical-prediction fraction of the fast evaluation
vs fp32 batch-1). Each mode runs in a fresh subprocess (so peaks and compile caches do not
leak between modes); prints one table and writes a JSON file. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import Mode, log
from utils.environment import default_threads, environment

SKIPPABLE = ("train", "eval", "data", "parity")
DEFAULT_MODES = "fp32,fp32+cl,bf16+cl,auto"
AUTO_TOLERANCE = 0.05   # auto must be within 5% of the fastest measured mode
SCHEMA = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description="Training / evaluation / data-loader throughput, peak memory, "
                                "FLOP utilisation and bf16 parity of the JoEm pipeline (see docs/benchmarks.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default=str(harness.DEFAULT_CONFIG),
                   help="training config (model, loss, optimizer, data and loader settings)")
    p.add_argument("--data-config", default=None,
                   help="config whose training set feeds the data-loader benchmark and the +data column "
                        "(its data and data_loader sections; default: -c). Lets the official recipe (-c "
                        "configs/config_pascal_zs3setting.json) be timed where only the synthetic data exists")
    p.add_argument("--backbone", type=int, default=101, choices=(18, 34, 50, 101), help="ResNet depth")
    p.add_argument("--crop", type=int, default=312, help="training crop (data.crop_size override)")
    p.add_argument("--batch", type=int, default=4, help="training batch size")
    p.add_argument("--eval-size", default="500x375", help="evaluation image size WIDTHxHEIGHT")
    p.add_argument("--eval-images", type=int, default=8, help="timed evaluation images")
    p.add_argument("--eval-batch", type=int, default=1, help="evaluation batch size")
    p.add_argument("--eval-warmup", type=int, default=1, help="evaluation warm-up batches")
    p.add_argument("--eval-source", choices=("random", "val"), default="random",
                   help="evaluation images: synthetic, or the config's validation images resized to --eval-size")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help="comma list of fp32|bf16|fp16 [+cl (channels_last)] [+compile (torch.compile)], or auto "
                        "(what trainer.amp \"auto\" and the config's channels_last resolve to on this device; "
                        "measured once even when it equals a listed mode)")
    p.add_argument("--fast-mode", default="auto", help="the mode the parity check compares with fp32")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="warm-up training steps (not timed)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers [None: the config's data_loader.num_workers]")
    p.add_argument("--data-batches", type=int, default=40, help="timed batches of the DataLoader benchmark")
    p.add_argument("--data-modes", default="fast",
                   help="modes whose training is also timed from the real DataLoader (data included): "
                        "'fast' (= --fast-mode), 'all', 'none' or a comma list")
    p.add_argument("--parity-steps", type=int, default=20, help="training steps of the parity check")
    p.add_argument("--parity-dropout", choices=("config", "off"), default="config",
                   help="dropout in the parity runs: as configured, or off (the masks do not depend on the "
                        "memory format or dtype; 'off' takes dropout out of the comparison altogether)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads [None: the cores available to the process]")
    p.add_argument("--seed", type=int, default=None, help="seed [None: the config's seed]")
    p.add_argument("--checkpoint", default=None,
                   help="start from this checkpoint's weights (evaluation agreement on trained weights)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--json", default=None,
                   help="output JSON [None: benchmarks/results/<host>-<device>-<timestamp>.json]")
    p.add_argument("--skip", default="", help=f"comma list of parts to skip: {', '.join(SKIPPABLE)}")
    p.add_argument("--in-process", action="store_true",
                   help="run every part in this process (faster start; CPU peak memory is then a "
                        "per-phase high-water mark of a shared process)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def auto_mode(config: dict, device: str) -> tuple[Mode, str]:
    """The mode a run of ``config`` uses on ``device`` when its ``trainer.amp`` is ``"auto"``
    (utils.amp's rule), with the config's channels_last and compile; and the rule's reason."""
    from utils.amp import resolve_precision
    trainer = config.get("trainer") or {}
    precision = resolve_precision("auto", torch.device(device))
    return Mode(precision.name, bool(trainer.get("channels_last", False)), bool(trainer.get("compile", False))), \
        precision.reason


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Check the command line and resolve defaults into a JSON-able dict (passed to workers)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    config_path = Path(args.config).resolve()
    if not config_path.is_file():
        parser.error(f"-c/--config: {args.config} not found")
    config = harness.load_config(config_path, args.backbone, args.crop)
    auto, auto_reason = auto_mode(config, args.device)

    def parse(text: str) -> Mode:
        return auto if text.lower() == "auto" else Mode.parse(text)
    try:
        explicit = [Mode.parse(m).name for m in _csv(args.modes) if m.lower() != "auto"]
        fast = parse(args.fast_mode)
    except ValueError as err:
        parser.error(str(err))
    if len(set(explicit)) != len(explicit):
        parser.error(f"--modes: duplicate modes in {args.modes!r}")
    # auto may equal a listed mode: it is measured once
    names = list(dict.fromkeys(parse(m).name for m in _csv(args.modes)))
    skip = _csv(args.skip)
    for part in skip:
        if part not in SKIPPABLE:
            parser.error(f"--skip: unknown part {part!r}; valid: {', '.join(SKIPPABLE)}")
    try:
        width, height = (int(v) for v in args.eval_size.lower().split("x"))
    except ValueError:
        parser.error(f"--eval-size: expected WIDTHxHEIGHT, got {args.eval_size!r}")
    for name in ("crop", "batch", "eval_images", "eval_batch", "steps", "data_batches", "parity_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1")
    if min(width, height) < 16 or args.crop < 16:
        parser.error("--crop and --eval-size: at least 16 pixels")
    if args.warmup < 0 or args.eval_warmup < 0:
        parser.error("--warmup/--eval-warmup: must be >= 0")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint: {args.checkpoint} not found")
    data_config_path = Path(args.data_config).resolve() if args.data_config else config_path
    if not data_config_path.is_file():
        parser.error(f"--data-config: {args.data_config} not found")
    data_config = harness.load_config(data_config_path, args.backbone, args.crop)
    loader_cfg = data_config.get("data_loader", {})
    workers = int(loader_cfg.get("num_workers", 0)) if args.workers is None else args.workers
    if workers < 0:
        parser.error("--workers: must be >= 0")
    if args.data_modes == "fast":
        data_modes = [fast.name] if fast.name in names else []
    elif args.data_modes == "all":
        data_modes = names
    elif args.data_modes == "none":
        data_modes = []
    else:
        try:
            data_modes = [parse(m).name for m in _csv(args.data_modes)]
        except ValueError as err:
            parser.error(f"--data-modes: {err}")
        if not set(data_modes) <= set(names):
            parser.error(f"--data-modes: {', '.join(sorted(set(data_modes) - set(names)))} not in --modes")
    return {
        "config_path": str(config_path), "config": config, "data_config_path": str(data_config_path),
        "data": data_config["data"], "backbone": args.backbone, "crop": args.crop,
        "batch": args.batch, "eval_size": [width, height], "eval_images": args.eval_images,
        "eval_batch": args.eval_batch, "eval_warmup": args.eval_warmup, "eval_source": args.eval_source,
        "modes": names, "fast_mode": fast.name, "auto_mode": auto.name, "auto_reason": auto_reason,
        "steps": args.steps, "warmup": args.warmup,
        "device": args.device, "workers": workers, "pin_memory": bool(loader_cfg.get("pin_memory", False)),
        "data_batches": args.data_batches, "data_modes": data_modes, "parity_steps": args.parity_steps,
        "parity_dropout": args.parity_dropout,
        "threads": args.threads or default_threads(),
        "seed": int(config.get("seed", 0)) if args.seed is None else args.seed,
        "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        "cudnn_benchmark": args.cudnn_benchmark, "skip": skip, "in_process": args.in_process,
    }


def apply_runtime(settings: dict) -> None:
    from utils.malloc import retain_freed_memory
    retain_freed_memory()                      # as the training entry points do
    torch.set_num_threads(int(settings["threads"]))
    if settings["device"] == "cuda":
        torch.backends.cudnn.benchmark = bool(settings["cudnn_benchmark"])


# --- running tasks ------------------------------------------------------------------------------
def run_task(settings: dict, spec: dict) -> dict:
    """Run one task in a fresh ``python -m benchmarks.run --_worker`` process (or in-process)."""
    from benchmarks.tasks import TASKS
    if settings["in_process"]:
        try:
            return TASKS[spec["task"]](settings, spec)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            return {"status": f"failed: {harness.one_line(err)}"}
        finally:
            if hasattr(torch, "_dynamo"):
                torch._dynamo.reset()
    with tempfile.TemporaryDirectory(prefix="joem-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({"settings": settings, "spec": spec, "result": str(result_path)}))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(harness.ROOT), env.get("PYTHONPATH")]))
        try:
            stdout = sys.stderr.fileno()   # worker chatter goes to stderr, the report to stdout
        except (AttributeError, OSError, ValueError):
            stdout = None
        proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--_worker", str(spec_path)],
                              cwd=os.getcwd(), env=env, stdout=stdout)
        if result_path.is_file():
            return json.loads(result_path.read_text())
        why = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"status": f"failed: worker exited with code {proc.returncode}{why}"}


def worker_main(spec_path: str) -> int:
    from benchmarks.tasks import TASKS
    payload = json.loads(Path(spec_path).read_text())
    settings, spec = payload["settings"], payload["spec"]
    apply_runtime(settings)
    try:
        result = TASKS[spec["task"]](settings, spec)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        result = {"status": f"failed: {harness.one_line(err)}"}
    Path(payload["result"]).write_text(json.dumps(result))
    return 0


# --- derived numbers ------------------------------------------------------------------------------
def _median(part: dict | None) -> float | None:
    return part["images_per_s"]["median"] if part else None


def derive(results: dict) -> None:
    """Speed-ups vs fp32, achieved FLOP/s and MFU, and the issue's target checks (in place)."""
    settings, modes = results["settings"], results["modes"]
    gpu = (results["environment"].get("gpu") or {}).get("name")
    flops = results.get("flops") or {}
    step_flops = flops.get("train_step")
    eval_flops_per_image = (flops["eval_batch"] / flops["eval_batch_images"]) if flops.get("eval_batch") else None
    base = modes.get("fp32", {})
    for name, row in modes.items():
        mode = Mode.parse(name)
        train, evaluation = row.get("train"), row.get("eval")
        row["speedup_vs_fp32"] = {
            "train": _ratio(_median(train), _median(base.get("train"))),
            "eval": _ratio(_median(evaluation), _median(base.get("eval")))}
        if train and step_flops:
            achieved = step_flops / settings["batch"] * _median(train)
            peak = harness.peak_tflops(gpu, mode.precision) if settings["device"] == "cuda" else None
            train["achieved_tflops"] = achieved / 1e12
            train["peak_tflops"] = peak
            train["mfu"] = achieved / (peak * 1e12) if peak else None
        if evaluation and eval_flops_per_image:
            evaluation["achieved_tflops"] = eval_flops_per_image * _median(evaluation) / 1e12
    results["checks"] = checks(results)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def checks(results: dict) -> list[dict]:
    """The issue's targets, evaluated on whatever this run measured (meaningful at the target config)."""
    settings, modes = results["settings"], results["modes"]
    fast, out = settings["fast_mode"], []

    def add(name, value, target, ok, text):
        out.append({"check": name, "value": value, "target": target, "pass": ok, "text": text})

    auto = settings.get("auto_mode")
    for part, label in (("train", "training"), ("eval", "evaluation")):
        measured = {n: _median(r.get(part)) for n, r in modes.items() if r.get(part)}
        if auto in measured and len(measured) > 1:
            best = max(measured, key=measured.get)
            ratio = measured[auto] / measured[best]
            add(f"auto_{part}", ratio, 1 - AUTO_TOLERANCE, ratio >= 1 - AUTO_TOLERANCE,
                f"{label}: auto ({auto}) {measured[auto]:.2f} images/s = {100 * ratio:.1f}% of the fastest mode "
                f"({best}, {measured[best]:.2f}) (target >= {100 * (1 - AUTO_TOLERANCE):.0f}%)")
    fast_row, base_row = modes.get(fast, {}), modes.get("fp32", {})
    # The bf16 speed-up targets were set for (and measured on) CPUs with AMX.
    amx = (results["environment"].get("cpu") or {}).get("amx_bf16")
    if settings["device"] == "cpu" and amx and Mode.parse(fast).precision == "bf16":
        ratio = _ratio(_median(fast_row.get("train")), _median(base_row.get("train")))
        if ratio is not None:
            add("train_speedup", ratio, 2.5, ratio >= 2.5,
                f"training {fast} vs fp32 (median images/s): {ratio:.2f}x (target >= 2.5x)")
        ref_eval = _median(base_row.get("eval")) if settings["eval_batch"] == 1 else None
        parity = results.get("parity") or {}
        if ref_eval is None and parity.get("reference_eval"):
            ref_eval = parity["reference_eval"]["images_per_s"]["median"]
        ratio = _ratio(_median(fast_row.get("eval")), ref_eval)
        if ratio is not None:
            add("eval_speedup", ratio, 2.0, ratio >= 2.0,
                f"evaluation {fast} (batch {settings['eval_batch']}) vs fp32 batch 1: {ratio:.2f}x (target >= 2x)")
    parity = results.get("parity") or {}
    if "loss_rel_diff" in parity:
        d = parity["loss_rel_diff"]
        add("loss_parity", d, 0.02, d <= 0.02,
            f"loss after {parity['steps']} steps: fp32 {parity['loss_reference']:.5f}, {fast} "
            f"{parity['loss_fast']:.5f}, relative difference {100 * d:.2f}% (target <= 2%)")
    if "eval_agreement" in parity:
        a = parity["eval_agreement"]
        add("eval_agreement", a["identical_fraction"], 0.999, a["identical_fraction"] >= 0.999,
            f"evaluation predictions identical to fp32 batch 1: {100 * a['identical_fraction']:.3f}% of "
            f"{a['pixels']:,} pixels (target >= 99.9%)")
    loader = results.get("data_loader") or {}
    consumed = [_median(r.get("train")) for r in modes.values() if r.get("train")]
    delivered = [r for r in loader.get("results", []) if r["workers"] == settings["workers"]]
    if consumed and delivered:
        rate, need = delivered[0]["images_per_s"], max(consumed)
        included = [(n, _median(r["train_with_data"]), _median(r["train"])) for n, r in modes.items()
                    if r.get("train_with_data") and r.get("train")]
        extra = "".join(f"; {n} training with data {w:.2f} vs without {wo:.2f} images/s" for n, w, wo in included)
        add("data_loader", rate / need, 1.0, rate > need,
            f"data loader ({settings['workers']} workers) {rate:.1f} images/s vs fastest training step "
            f"{need:.2f} images/s: {'not ' if rate > need else ''}the bottleneck{extra}")
    if settings["device"] == "cuda":
        for name, row in modes.items():
            mfu = (row.get("train") or {}).get("mfu")
            if Mode.parse(name).precision == "bf16" and mfu is not None:
                add(f"mfu_{name}", mfu, 0.35, mfu >= 0.35, f"MFU {name}: {100 * mfu:.1f}% (target >= 35%)")
    return out


# --- report ----------------------------------------------------------------------------------------
def _gib(n: int | None) -> str:
    return "-" if not n else f"{n / 2 ** 30:.2f} GiB"


def _rates(part: dict | None) -> str:
    if not part:
        return "-"
    r = part["images_per_s"]
    return f"{r['min']:.2f} / {r['median']:.2f} / {r['max']:.2f}"


def table(results: dict) -> str:
    cuda = results["settings"]["device"] == "cuda"
    unit = "TFLOP/s (MFU)" if cuda else "GFLOP/s"
    header = ["mode", "train img/s min/med/max", "+data img/s med", "eval img/s min/med/max",
              "peak mem train / eval", f"train {unit}", "speed-up train / eval"]
    rows = []
    for name, row in results["modes"].items():
        if "train" not in row and "eval" not in row and row.get("status", "ok") != "ok":
            rows.append([name, row["status"]])
            continue
        train, data = row.get("train"), row.get("train_with_data")
        mem = row.get("memory", {})
        if train and train.get("achieved_tflops") is not None:
            if cuda:
                mfu = train.get("mfu")
                flops = f"{train['achieved_tflops']:.1f} ({'n/a' if mfu is None else f'{100 * mfu:.1f}%'})"
            else:
                flops = f"{1000 * train['achieved_tflops']:.1f}"
        else:
            flops = "-"
        speed = row.get("speedup_vs_fp32", {})
        errors = row.get("errors", {})
        rows.append([
            name, errors.get("train") or _rates(train),
            errors.get("train_with_data") or (f"{_median(data):.2f}" if data else "-"),
            errors.get("eval") or _rates(row.get("eval")),
            f"{_gib(mem.get('train', {}).get('peak_bytes'))} / {_gib(mem.get('eval', {}).get('peak_bytes'))}",
            flops,
            " / ".join("-" if speed.get(k) is None else f"{speed[k]:.2f}x" for k in ("train", "eval"))])
    notes = []
    for r in rows:  # long error messages: shortened in the table, in full below it
        for i, cell in enumerate(r[1:], start=1):
            if len(cell) > 40:
                notes.append(f"  {r[0]}: {cell}")
                r[i] = cell.split(":")[0][:30] + f" [{len(notes)}]"
    widths = [max(len(r[i]) for r in [header] + rows if len(r) > i) for i in range(len(header))]

    def fmt(cells):
        if len(cells) == 2:  # a failed mode: the message spans the row
            return f"{cells[0]:<{widths[0]}} | {cells[1]}"
        return " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    if notes:
        lines += ["errors:"] + [f"  [{i}]{note[1:]}" for i, note in enumerate(notes, start=1)]
    return "\n".join(lines)


def report(results: dict) -> str:
    env, settings = results["environment"], results["settings"]
    cpu, gpu = env["cpu"], env.get("gpu")
    lines = [
        f"torch {env['torch']} (torchvision {env['torchvision']}, python {env['python']}) on {env['host']}",
        f"CPU: {cpu['model']}; {cpu['physical_cores']} cores / {cpu['available_cpus']} CPUs available; "
        f"avx512_bf16: {'yes' if cpu['avx512_bf16'] else 'no'}; amx_bf16: {'yes' if cpu['amx_bf16'] else 'no'}; "
        f"torch threads {settings['threads']}; glibc malloc tuning (utils.malloc): "
        f"{'on' if env.get('malloc_tuning') else 'off'}",
        f"GPU: {gpu['name']} (cudnn.benchmark {gpu['cudnn_benchmark']}, cudnn TF32 {gpu['cudnn_allow_tf32']})"
        if gpu else "GPU: none used",
        f"config {settings['config_path']}; ResNet-{settings['backbone']} DeepLabV3+; crop {settings['crop']}, "
        f"batch {settings['batch']}; {settings['warmup']} warm-up + {settings['steps']} timed steps; eval "
        f"{settings['eval_images']} x {settings['eval_size'][0]}x{settings['eval_size'][1]} ({settings['eval_source']}), "
        f"batch {settings['eval_batch']}; device {settings['device']}",
    ]
    if settings.get("data_config_path") and settings["data_config_path"] != settings["config_path"]:
        lines.append(f"data (data loader, +data column): {settings['data_config_path']}")
    if settings.get("auto_mode"):
        lines.append(f"auto: {settings['auto_mode']} ({settings['auto_reason']}; channels_last from the config)")
    if results.get("problem_note"):
        lines.append(f"note: {results['problem_note']}")
    flops = results.get("flops") or {}
    if flops.get("train_step"):
        per = flops["train_step"] / settings["batch"] / 1e9
        lines.append(f"FLOPs (torch.utils.flop_counter): training step {flops['train_step'] / 1e9:.1f} G "
                     f"({per:.1f} G/image, forward + backward)"
                     + (f"; evaluation {flops['eval_batch'] / flops['eval_batch_images'] / 1e9:.1f} G/image"
                        if flops.get("eval_batch") else ""))
    if results["modes"]:
        lines += ["", table(results)]
        kinds = {m.get("kind") for row in results["modes"].values() for m in row.get("memory", {}).values()}
        lines.append(f"peak memory: {', '.join(sorted(k for k in kinds if k))}")
    parity = results.get("parity")
    if parity:
        lines.append("")
        if "loss_rel_diff" in parity:
            lines.append(f"parity: loss after {parity['steps']} steps fp32 {parity['loss_reference']:.5f} vs "
                         f"{parity['fast']} {parity['loss_fast']:.5f} (relative difference "
                         f"{100 * parity['loss_rel_diff']:.3f}%)")
            a = parity["eval_agreement"]
            lines.append(f"parity: evaluation {a['fast']} vs {a['reference']}: "
                         f"{100 * a['identical_fraction']:.4f}% identical pixels ({a['pixels']:,} pixels)")
        else:
            lines.append(f"parity: {parity.get('status')}")
    loader = results.get("data_loader")
    if loader:
        lines.append("")
        if "results" in loader:
            for r in loader["results"]:
                lines.append(f"data loader: {r['workers']} worker(s): {r['images_per_s']:.1f} images/s "
                             f"({r['images_per_s_per_worker']:.1f} per worker; batch {loader['batch']}, crop "
                             f"{loader['crop']}; start-up {r['startup_s']:.2f} s)")
        else:
            lines.append(f"data loader: {loader.get('status')}")
    if results.get("checks"):
        lines += ["", "targets:"] + [f"  {'PASS' if c['pass'] else 'FAIL'}  {c['text']}" for c in results["checks"]]
    return "\n".join(lines)


def default_json_path(env: dict, device: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in env["host"])
    return harness.RESULTS_DIR / f"{host}-{device}-{stamp}.json"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    settings = resolve_settings(args, parser)
    apply_runtime(settings)
    device = torch.device(settings["device"])
    env = environment(device)
    started = time.perf_counter()
    results: dict = {"schema": SCHEMA, "created": datetime.now().isoformat(timespec="seconds"),
                     "command": [sys.executable, "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])],
                     "environment": env,
                     "settings": {k: v for k, v in settings.items() if k != "config"},
                     "config": settings["config"], "modes": {}}
    log(f"environment: torch {env['torch']}, CPU {env['cpu']['model']} (avx512_bf16: {env['cpu']['avx512_bf16']}), "
        f"GPU {(env['gpu'] or {}).get('name', 'none')}, {settings['threads']} threads")
    problem = harness.load_problem(settings["config"], settings["config_path"])  # generates synthetic data once
    results["problem_note"] = problem.note
    results["classes"] = {"total": problem.split.num_classes, "unseen": list(problem.split.unseen)}
    skip = set(settings["skip"])

    if "data" not in skip:
        log("[data] DataLoader throughput")
        results["data_loader"] = run_task(settings, {"task": "data"})
    counted = False
    if not {"train", "eval"} <= skip:
        for name in settings["modes"]:
            mode = Mode.parse(name)
            count = not counted and not mode.compile
            spec = {"task": "mode", "mode": name, "count_flops": count,
                    "with_data": "data" not in skip and "train" not in skip and name in settings["data_modes"]}
            row = run_task(settings, spec)
            if count and "flops_train_step" in row:
                counted = True
                results["flops"] = {"train_step": row.pop("flops_train_step"),
                                    "eval_batch": row.pop("flops_eval_batch", None),
                                    "eval_batch_images": row.pop("flops_eval_batch_images", None),
                                    "counter": "torch.utils.flop_counter.FlopCounterMode", "batch": settings["batch"]}
            results["modes"][name] = row
    if "parity" not in skip:
        log(f"[parity] fp32 vs {settings['fast_mode']}, {settings['parity_steps']} steps")
        results["parity"] = run_task(settings, {"task": "parity"})
    results["elapsed_s"] = round(time.perf_counter() - started, 2)
    derive(results)
    text = report(results)
    print(text, flush=True)
    path = Path(args.json) if args.json else default_json_path(env, settings["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nJSON: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
