"""GPU acceptance in one command (about 8 minutes on one GPU), one PASS/FAIL line per part: 1. what
"amp": "auto" resolves to; 2. benchmarks.run, ResNet-101, crop 512, batch 16 (images/s, MFU); 3. one
demo epoch under torchrun (NCCL, one process per GPU); 4. SIGTERM in a demo run, -r RUN to the end, and
every tensor of both encoders compared with an uninterrupted run's. Logs and runs go under --out."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.amp import resolve_precision
from utils.cli import ArgParser, run_command
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train_pascal_zs3setting.py")

def start(args: list[str], log: Path) -> subprocess.Popen:
    """``python ARGS`` in the repository, its output into ``log``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)

def demo(out: Path, run_id: str, epochs: int = 2, devices: str = "0") -> list[str]:
    return [TRAIN, "-c", str(ROOT / "configs" / "config_synthetic_zs3setting.json"), "-d", devices, "--run_id",
            run_id, "--save_dir", str(out), "--epochs", str(epochs), "-o", "trainer.test_after_train=false",
            "-o", "trainer.val_period=100", "-o", "trainer.save_period=1"]

def benchmark(out: Path) -> tuple[bool, str]:
    result = out / "benchmark.json"
    code = start(["-m", "benchmarks.run", "--device", "cuda", "--backbone", "101", "--crop", "512", "--batch", "16",
                  "--modes", "fp32,auto", "--steps", "10", "--warmup", "3", "--eval-images", "8", "--skip",
                  "data,parity", "--json", str(result)], out / "benchmark.log").wait(timeout=600)
    rows = json.loads(result.read_text())["modes"] if code == 0 and result.is_file() else {}
    mfu = {name: (row.get("train") or {}).get("mfu") for name, row in rows.items()}
    text = "; ".join(f"{name}: {row['train']['images_per_s']['median']:.1f} img/s, MFU "
                     f"{'n/a' if mfu[name] is None else format(mfu[name], '.1%')}" if row.get("train") else
                     f"{name}: {row['status']}" for name, row in rows.items())
    return bool(rows) and all(row.get("train") for row in rows.values()), text or f"exit {code}, see benchmark.log"

def ddp(out: Path) -> tuple[bool, str]:
    gpus = max(1, torch.cuda.device_count())
    code = start(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                  *demo(out, "ddp", 1, ",".join(map(str, range(gpus))))], out / "ddp.log").wait(timeout=300)
    return code == 0, f"torchrun with {gpus} NCCL process(es): exit {code}"

def resume(out: Path) -> tuple[bool, str]:
    if start(demo(out, "straight"), out / "straight.log").wait(timeout=300) != 0:
        return False, "the uninterrupted run failed (see straight.log)"
    log, deadline = out / "interrupted.log", time.time() + 300
    proc = start(demo(out, "resumed"), log)
    while "epoch 1/" not in log.read_text() and proc.poll() is None and time.time() < deadline:   # then epoch 2
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stopped, run = proc.wait(timeout=300), out / "synthetic_zs3"
    resumed = start([TRAIN, "-r", str(run / "resumed"), "-d", "0"], out / "resumed.log").wait(timeout=300)
    a, b = (torch.load(run / name / "checkpoint-epoch2.pth", map_location="cpu", weights_only=True)
            for name in ("straight", "resumed"))
    differ = [f"{part}.{key}" for part in ("visual_encoder", "semantic_encoder")
              for key, value in a[part].items() if not torch.equal(value, b[part][key])]
    return stopped == 143 and resumed == 0 and not differ, (f"SIGTERM exit {stopped}, resume exit {resumed}, "
                                                            f"{len(differ)} tensors differ (first: {differ[:1]})")

def build_parser() -> ArgParser:
    parser = ArgParser(prog="python -m benchmarks.gpu_acceptance", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="saved/gpu_acceptance", help="folder for logs, runs and the JSON report")
    return parser

def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise ConfigError("no CUDA device is available; this acceptance check is for a GPU machine")
    out, report = Path(args.out).resolve(), {}
    out.mkdir(parents=True, exist_ok=True)
    auto = lambda out: (True, resolve_precision("auto", torch.device("cuda", 0)).describe())  # noqa: E731
    for name, part in (("auto", auto), ("benchmark", benchmark), ("ddp", ddp), ("resume", resume)):
        started = time.perf_counter()
        try:
            ok, text = part(out)
        except Exception as err:  # noqa: BLE001 - every part is reported, whatever fails
            ok, text = False, f"{type(err).__name__}: {err}"
        report[name] = {"ok": ok, "text": text, "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name}: {'PASS' if ok else 'FAIL'}  {text} ({report[name]['seconds']} s)", flush=True)
    (out / "gpu_acceptance.json").write_text(json.dumps(report, indent=2))
    return 0 if all(r["ok"] for r in report.values()) else 1

def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)

if __name__ == "__main__":
    raise SystemExit(main())
