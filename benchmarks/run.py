"""``python -m benchmarks.run``: per mode (precision, channels_last, torch.compile) training and evaluation
throughput, peak memory and FLOP/s, DataLoader throughput and a parity check; a table and a JSON file."""
import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path

import torch

from benchmarks import tasks
from benchmarks.harness import Mode, Problem, load_problem, load_settings
from utils.amp import resolve_precision
from utils.cli import ArgParser, run_command
from utils.environment import default_threads, environment
from utils.errors import ConfigError
from utils.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("train", "eval", "data", "parity")
# Dense peak TFLOP/s (bf16/fp16 tensor cores, fp32), by the first key found in the GPU's name.
PEAK_TFLOPS = (("H100 PCIe", 756.0, 51.0), ("H100", 989.0, 67.0), ("H200", 989.0, 67.0), ("A100", 312.0, 19.5))

def size(text: str) -> list[int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return [width, height]

def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m benchmarks.run", description=__doc__,
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default=str(ROOT / "configs" / "config_synthetic_zs3setting.json"),
                   help="model, loss, optimizer and data settings")
    p.add_argument("--data-config", help="config whose data and data_loader feed the DataLoader parts [None: -c]")
    p.add_argument("--backbone", type=int, default=101, choices=(18, 34, 50, 101), help="ResNet depth")
    p.add_argument("--crop", type=int, default=312, help="training crop")
    p.add_argument("--batch", type=int, default=4, help="training batch (>= 2: the ASPP image-pool BatchNorm)")
    p.add_argument("--modes", default="fp32,fp32+cl,bf16+cl,auto", help="fp32|bf16|fp16 [+cl] [+compile], or auto "
                   "(resolve_precision('auto'), the config's channels_last; measured once)")
    p.add_argument("--fast-mode", default="auto", help="the mode the parity check compares with fp32")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="warm-up training steps")
    p.add_argument("--eval-size", type=size, default="500x375", help="evaluation images WIDTHxHEIGHT")
    p.add_argument("--eval-images", type=int, default=8, help="timed evaluation images")
    p.add_argument("--eval-batch", type=int, default=1, help="evaluation batch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workers", type=int, help="DataLoader workers [None: the data config's]")
    p.add_argument("--data-batches", type=int, default=40, help="timed batches of the DataLoader benchmark")
    p.add_argument("--data-modes", default="fast", help="modes also timed on DataLoader batches: fast, all, none, list")
    p.add_argument("--parity-steps", type=int, default=20, help="training steps of the parity check")
    p.add_argument("--threads", type=int, help="torch threads [None: the cores available]")
    p.add_argument("--skip", default="", help=f"parts to skip: {','.join(PARTS)}")
    p.add_argument("--in-process", action="store_true", help="run every part in this process")
    p.add_argument("--json", help="output file [None: benchmarks/results/<host>-<device>-<time>.json]")
    return p

def _modes(text: str, option: str, auto: Mode) -> list[str]:
    try:
        return [(auto if m.strip().lower() == "auto" else Mode.parse(m)).name for m in text.split(",") if m.strip()]
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None

def resolve(args: argparse.Namespace) -> tuple[dict, Settings, Problem]:
    """The checked command line as a JSON-able dict, the settings and the class problem."""
    counts = (args.batch, args.steps, args.eval_images, args.eval_batch, args.data_batches, args.parity_steps)
    if min(*counts, args.threads or 1) < 1 or min(args.warmup, args.workers or 0) < 0 or \
            min(args.crop, *args.eval_size) < 16:
        raise ConfigError("out of range: counts >= 1, --warmup/--workers >= 0, --crop/--eval-size >= 16 pixels")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    settings, precision = load_settings(args.config, args.backbone, args.crop), resolve_precision("auto", args.device)
    data_config = str(Path(args.data_config or args.config).resolve())
    loader = load_settings(data_config, args.backbone, args.crop).loader
    auto = Mode(precision.name, settings.trainer.channels_last)
    listed, fast = _modes(args.modes, "--modes", auto), _modes(args.fast_mode, "--fast-mode", auto)
    modes = list(dict.fromkeys(listed))   # a mode listed twice (auto too) is measured once
    if not modes or len(fast) != 1:
        raise ConfigError("--modes: no mode given" if not modes else f"--fast-mode: one mode, not {args.fast_mode!r}")
    data_modes = {"fast": [m for m in fast if m in modes], "all": modes, "none": []}.get(args.data_modes)
    data_modes = _modes(args.data_modes, "--data-modes", auto) if data_modes is None else data_modes
    skip = [part for part in args.skip.split(",") if part]
    bad = [f"--skip: {part!r} is not one of {','.join(PARTS)}" for part in skip if part not in PARTS] + \
        [f"--data-modes: {mode} is not in --modes" for mode in data_modes if mode not in modes]
    if bad:
        raise ConfigError(bad[0])
    opts = {**vars(args), "config": str(Path(args.config).resolve()), "data_config": data_config, "modes": modes,
            "auto_mode": auto.name, "auto_reason": precision.reason, "fast_mode": fast[0], "data_modes": data_modes,
            "workers": loader.num_workers if args.workers is None else args.workers, "pin_memory": loader.pin_memory,
            "threads": args.threads or default_threads(), "seed": settings.seed, "skip": skip}
    return opts, settings, load_problem(settings, opts["config"])

def run_task(task: str, opts: dict, spec: dict | None = None) -> dict:
    """One task in a fresh (spawned) process, or here with ``--in-process``."""
    print(f"[{task}] {(spec or {}).get('mode', '')}", file=sys.stderr, flush=True)
    if opts["in_process"]:
        try:
            return tasks.execute(task, opts, spec or {})
        finally:
            torch._dynamo.reset()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(tasks.execute, task, opts, spec or {}).result()
    except BrokenProcessPool:
        return {"status": "failed: the benchmark process died (out of memory?)"}

def median(row: dict, part: str) -> float | None:
    return (row.get(part) or {}).get("images_per_s", {}).get("median")

def derive(results: dict) -> None:
    """Achieved training FLOP/s per mode and, on a known GPU, the MFU (in place)."""
    opts, flops = results["settings"], results.get("flops")
    gpu = (results["environment"].get("gpu") or {}).get("name", "").lower()
    for name, row in results["modes"].items() if flops else ():
        if row.get("train"):
            achieved = flops["train_step"] / opts["batch"] * median(row, "train")
            peak = next((s if name.startswith("fp32") else h for k, h, s in PEAK_TFLOPS if k.lower() in gpu), None)
            row["train"].update(achieved_tflops=achieved / 1e12, mfu=achieved / peak / 1e12 if peak else None)

def table(results: dict) -> list[str]:
    """A markdown table, one row per mode, then the failures."""
    cuda, failures = results["settings"]["device"] == "cuda", []
    rows = [["mode", "train img/s min/med/max", "+data img/s med", "eval img/s min/med/max", "peak GiB train / eval",
             "train TFLOP/s (MFU)" if cuda else "train GFLOP/s"], ["---"] * 6]
    for name, row in results["modes"].items():
        failures += [f"{name} {part}: {error}" for part, error in row.get("errors", {"all": row["status"]}).items()]
        train = row.get("train") or {}
        rates = [" / ".join(f"{v:.2f}" for v in row[p]["images_per_s"].values()) if row.get(p) else "-"
                 for p in ("train", "eval")]
        flops = "-" if "achieved_tflops" not in train else f"{1000 * train['achieved_tflops']:.1f}" if not cuda else \
            f"{train['achieved_tflops']:.1f} ({'n/a' if train['mfu'] is None else format(train['mfu'], '.1%')})"
        memory = [f"{row['peak_bytes'][p] / 2 ** 30:.2f}" if p in row.get("peak_bytes", {}) else "-"
                  for p in ("train", "eval")]
        data = f"{median(row, 'train_with_data'):.2f}" if row.get("train_with_data") else "-"
        rows.append([name, rates[0], data, rates[1], " / ".join(memory), flops])
    return [f"| {' | '.join(row)} |" for row in rows] + failures

def report(results: dict) -> str:
    """Environment and settings, FLOPs, the table, auto vs the fastest mode, parity, DataLoader."""
    env, opts, flops, parity = results["environment"], results["settings"], results.get("flops"), results.get("parity")
    cpu, gpu, loader = env["cpu"], env["gpu"] or {}, results.get("data_loader") or {}
    lines = [f"torch {env['torch']} on {env['host']}; CPU {cpu['model']} ({cpu['physical_cores']} cores, "
             f"{cpu['available_cpus']} CPUs available; avx512_bf16 {cpu['avx512_bf16']}, amx_bf16 {cpu['amx_bf16']}); "
             f"{opts['threads']} threads; malloc tuning {env['malloc_tuning']}; GPU {gpu.get('name', 'none')}"
             + (f" (cudnn TF32 {gpu['cudnn_allow_tf32']})" if gpu else ""),
             f"{opts['config']}; ResNet-{opts['backbone']}; crop {opts['crop']}, batch {opts['batch']}, "
             f"{opts['warmup']} warm-up + {opts['steps']} timed steps; eval {opts['eval_images']} x "
             f"{'x'.join(map(str, opts['eval_size']))}, batch {opts['eval_batch']}; auto: {opts['auto_mode']} "
             f"({opts['auto_reason']})"]
    lines += [f"DataLoader data: {opts['data_config']}"] if opts["data_config"] != opts["config"] else []
    lines += [f"note: {results['note']}"] if results["note"] else []
    lines += [f"FLOPs of a training step (forward + backward, counted in {flops['mode']}): "
              f"{flops['train_step'] / 1e9:.1f} G"] if flops else []
    lines += ["", *table(results)] if results["modes"] else []
    for part in ("train", "eval"):   # information, not a target
        rates = {name: median(row, part) for name, row in results["modes"].items() if median(row, part)}
        lines += [f"auto {part}: {rates[opts['auto_mode']] / max(rates.values()):.1%} of the fastest mode "
                  f"({max(rates, key=rates.get)})"] if opts["auto_mode"] in rates else []
    if parity and "pixels" in parity:
        lines += [f"parity: loss after {parity['steps']} steps fp32 {parity['losses_fp32'][-1]:.5f}, {parity['fast']} "
                  f"{parity['losses_fast'][-1]:.5f} (relative difference {100 * parity['loss_rel_diff']:.3f}%); "
                  f"evaluation {parity['fast']} batch {parity['eval_batch']} vs fp32 batch 1: "
                  f"{100 * parity['identical_fraction']:.4f}% of {parity['pixels']:,} pixels identical"]
    lines += [f"parity: {parity['status']}"] if parity and "status" in parity else []
    lines += [f"data loader: {r['workers']} worker(s): {r['images_per_s']:.1f} images/s ({r['per_worker']:.1f} per "
              f"worker; batch {loader['batch']}, crop {loader['crop']})" for r in loader.get("results", [])]
    return "\n".join(lines + ([f"data loader: {loader['status']}"] if "status" in loader else []))

def run(args: argparse.Namespace) -> int:
    opts, settings, problem = resolve(args)
    torch.set_num_threads(opts["threads"])
    env, skip = environment(torch.device(opts["device"])), set(opts["skip"])
    results: dict = {"created": datetime.now().isoformat(timespec="seconds"), "command": sys.argv, "environment": env,
                     "settings": opts, "config": settings.config, "note": problem.note, "modes": {},
                     "peak_memory": "cuda max_memory_allocated" if env["gpu"] else "RSS high-water mark (VmHWM)"}
    if "data" not in skip:
        results["data_loader"] = run_task("data", opts)
    for name in opts["modes"] if not {"train", "eval"} <= skip else []:
        row = run_task("mode", opts, {"mode": name, "count_flops": not results.get("flops") and "compile" not in name,
                                      "with_data": name in opts["data_modes"] and not {"train", "data"} & skip})
        results["flops"] = row.pop("flops", None) or results.get("flops")
        results["modes"][name] = row
    if "parity" not in skip:
        results["parity"] = run_task("parity", opts)
    derive(results)
    print(report(results), flush=True)
    stamp, host = datetime.now().strftime("%Y%m%d-%H%M%S"), "".join(c if c.isalnum() else "_" for c in env["host"])
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"{host}-{opts['device']}-{stamp}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nJSON: {path}", flush=True)
    return 0

def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)

if __name__ == "__main__":
    sys.exit(main())
