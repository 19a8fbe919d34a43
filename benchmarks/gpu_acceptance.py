"""GPU acceptance in one command (about 8 minutes on one GPU): ``python -m benchmarks.gpu_acceptance``.

1. what ``"amp": "auto"`` resolves to on this GPU (utils.amp's rule);
2. the R-101 training benchmark at crop 512, batch 16 (images/s and MFU, ``benchmarks.run``);
3. one short DDP run with NCCL (torchrun, one process per visible GPU, at least one);
4. SIGTERM in the middle of a training run, ``-r RUN`` resume, and a comparison of the final
   weights with an uninterrupted run of the same config (every tensor of both encoders).

Everything is written under ``--out`` (default ``saved/gpu_acceptance``); the last line says
PASS or FAIL per part. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "config_synthetic_zs3setting.json"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _train_cmd(out: Path, run_id: str, epochs: int, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, str(ROOT / "train_pascal_zs3setting.py"), "-c", str(DEMO), "-d", "0",
            "--run_id", run_id, "--save_dir", str(out), "--epochs", str(epochs),
            "-o", "trainer.test_after_train=false", "-o", "trainer.val_period=100", "-o", "trainer.save_period=1",
            *(extra or [])]


def _run(cmd: list[str], log: Path, timeout: float) -> int:
    with log.open("w") as handle:
        return subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=handle, stderr=subprocess.STDOUT,
                              timeout=timeout).returncode


def part_auto() -> dict:
    from utils.amp import resolve_precision
    precision = resolve_precision("auto", torch.device("cuda", 0))
    return {"ok": True, "text": precision.describe()}


def part_benchmark(out: Path) -> dict:
    result = out / "benchmark.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--backbone", "101", "--crop", "512",
           "--batch", "16", "--modes", "fp32,auto", "--steps", "10", "--warmup", "3", "--skip", "data,parity",
           "--eval-images", "8", "--json", str(result)]
    code = _run(cmd, out / "benchmark.log", 300)
    if code != 0 or not result.is_file():
        return {"ok": False, "text": f"benchmarks.run exited {code} (see {out / 'benchmark.log'})"}
    modes = json.loads(result.read_text())["modes"]
    parts = []
    for name, row in modes.items():
        train = row.get("train") or {}
        rate, mfu = (train.get("images_per_s") or {}).get("median"), train.get("mfu")
        parts.append(f"{name}: {rate:.1f} img/s" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
                     if rate else f"{name}: {row.get('status')}")
    return {"ok": True, "text": "; ".join(parts)}


def part_ddp(out: Path) -> dict:
    gpus = max(1, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           *(_train_cmd(out, "ddp", 1)[1:])]
    cmd[cmd.index("-d") + 1] = ",".join(map(str, range(gpus)))
    code = _run(cmd, out / "ddp.log", 240)
    return {"ok": code == 0, "text": f"torchrun with {gpus} NCCL process(es): exit {code}"}


def part_resume(out: Path) -> dict:
    epochs = 2
    code = _run(_train_cmd(out, "straight", epochs), out / "straight.log", 240)
    if code != 0:
        return {"ok": False, "text": f"uninterrupted run exited {code}"}
    log = out / "interrupted.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(_train_cmd(out, "resumed", epochs), cwd=ROOT, env=_env(), stdout=handle,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while "epoch 1/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        first = proc.wait(timeout=240)
    second = _run(_train_cmd(out, "resumed", epochs)[:2] + ["-r", str(out / "synthetic_zs3" / "resumed"), "-d", "0"],
                  out / "resumed.log", 240)
    a = torch.load(out / "synthetic_zs3" / "straight" / f"checkpoint-epoch{epochs}.pth", weights_only=True)
    b = torch.load(out / "synthetic_zs3" / "resumed" / f"checkpoint-epoch{epochs}.pth", weights_only=True)
    differ = [f"{part}.{key}" for part in ("visual_encoder", "semantic_encoder")
              for key, value in a[part].items() if not torch.equal(value, b[part][key])]
    return {"ok": first == 143 and second == 0 and not differ,
            "text": f"SIGTERM exit {first}, resume exit {second}, tensors differing from the uninterrupted run: "
                    f"{len(differ)}" + (f" (first: {differ[0]}; cuDNN kernels are not deterministic unless "
                                         "torch.use_deterministic_algorithms is on)" if differ else "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_acceptance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="saved/gpu_acceptance", help="folder for logs, runs and the JSON report")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device is available; this script is for a GPU machine", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, part in (("auto", part_auto), ("benchmark", lambda: part_benchmark(out)),
                       ("ddp", lambda: part_ddp(out)), ("resume", lambda: part_resume(out))):
        start = time.perf_counter()
        try:
            report[name] = part()
        except Exception as err:  # noqa: BLE001 - report every part, whatever fails
            report[name] = {"ok": False, "text": f"{type(err).__name__}: {err}"}
        report[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {'PASS' if report[name]['ok'] else 'FAIL'}  {report[name]['text']} "
              f"({report[name]['seconds']} s)", flush=True)
    (out / "gpu_acceptance.json").write_text(json.dumps(report, indent=2))
    return 0 if all(r["ok"] for r in report.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
