"""Run one training per seed (or evaluate each seed's checkpoint) and aggregate the results.

    python -m trainer.multiseed -c CONFIG --seeds 1,2,3 [-d cpu | -d 0,1,2] [--group NAME] [training args]
    python -m trainer.multiseed --from GROUP_FOLDER --test [--name NAME] [--seeds 1,2] [test args]

Each seed runs ``python -m trainer.cli`` as a subprocess. The output folder (the group folder,
or ``GROUP_FOLDER/<name>`` in test mode) is locked for the command's life (``group.lock``: a
second command on it is refused before it trains anything). ``aggregate.md`` /
``aggregate.json`` (mean ± sample std, ddof=1) are computed from what is on disk: every seed
folder whose ``run.json`` says finished (``python -m trainer.aggregate FOLDER`` recomputes them).
Exit status: 0 when every seed succeeded; 1 when some failed (the aggregate covers the others);
when all failed, their common exit code (e.g. 2 for a config error) or 1; 2 for argument errors;
130 when interrupted.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.aggregate import aggregate_folder, aggregate_markdown, write_aggregate
from trainer.options import build_arg_parser, option_strings
from utils.checkpoint import run_checkpoint
from utils.distributed import device_ids
from utils.cli import ArgParser, error_exit
from utils.errors import ConfigError
from utils.parse_config import load_config, parse_assignment
from utils.run_dir import GROUP_LOCK_NAME, GROUP_LOGS_NAME, RunLock, new_run_id, run_path
from utils.settings import Settings
from utils.util import write_text

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m trainer.multiseed"
RESERVED = {"train": ("--seed", "--run_id"), "test": ("--seed", "--run_id", "-r", "--resume")}


@dataclass
class Job:
    """One seed: its label (folder name), seed number and ``trainer.cli`` arguments (without -d)."""

    seed: int
    label: str
    argv: list[str]


@dataclass
class Outcome:
    """What a seed's subprocess did."""

    job: Job
    command: list[str]
    exit_code: int
    wall_s: float
    lines: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> Path | None:
        return metrics_path(self.lines)


# --- arguments ---------------------------------------------------------------------------------
def build_parser() -> ArgParser:
    run_options = [flag for flag in option_strings(build_arg_parser(None))
                   if flag not in ("-h", "--help", "--seeds", "--group", "--from", "--name")]
    parser = ArgParser(prog=PROG, allow_abbrev=False,
                       description="one training per seed (or --from GROUP --test: evaluate each seed's "
                                   "checkpoint), then mean ± sample std (ddof=1) over seeds; other "
                                   "arguments go to every run (python -m trainer.cli)",
                       epilog="options of every run (see python -m trainer.cli -h): " + ", ".join(run_options))
    parser.add_argument("-c", "--config", default=None, help="training config JSON")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 1,2,3")
    parser.add_argument("-d", "--device", default=None,
                        help="cpu or one GPU id: seeds one after another; several GPU ids: one seed per GPU at once")
    parser.add_argument("--group", default=None, help="group folder name (default: a timestamp and a random suffix)")
    parser.add_argument("--from", dest="source", default=None, help="group folder of a multi-seed training")
    parser.add_argument("--test", action="store_true", help="with --from: evaluate GROUP/seed*/model_best.pth (a seed without one: its newest "
                             "checkpoint, and says so)")
    parser.add_argument("--name", default=None, help="with --from: name of this evaluation (a folder in GROUP)")
    return parser


def parse_seeds(spec: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3] (distinct integers)."""
    try:
        seeds = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects integers like 1,2,3, got {spec!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct integers like 1,2,3, got {spec!r}")
    return seeds


def device_slots(device: str | None) -> list[str | None]:
    """Where seeds run: ``-d`` as given (cpu, one GPU or unset) runs them one after another;
    several GPU ids give one slot per GPU, each running one seed at a time."""
    ids = device_ids(device)
    return [device] if ids is None or len(ids) <= 1 else [str(index) for index in ids]


def _check_name(value: str, option: str) -> str:
    path = Path(value)
    if not value.strip() or path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"{option}: expected a relative folder name, got {value!r}")
    return value


def _check_passthrough(passthrough: list[str], mode: str) -> None:
    for token in passthrough:
        if token.split("=", 1)[0] in RESERVED[mode]:
            raise ConfigError(f"{token.split('=', 1)[0]} is set for every seed by {PROG}; remove it")


# --- jobs --------------------------------------------------------------------------------------
def train_jobs(seeds: list[int], group: str, passthrough: list[str]) -> list[Job]:
    """One training per seed: ``<passthrough> --seed N --run_id <group>/seedN``."""
    return [Job(seed, f"seed{seed}", [*passthrough, "--seed", str(seed), "--run_id", f"{group}/seed{seed}"])
            for seed in seeds]


def seed_checkpoints(folder: Path) -> dict[int, tuple[Path, str]]:
    """By seed number, the checkpoint each ``folder/seed<N>`` stands for (its ``model_best.pth``,
    else its newest checkpoint: the final weights of a run that kept no best) and a note saying which."""
    found = {}
    for seed_dir in folder.glob("seed*"):
        match = re.fullmatch(r"seed(-?\d+)", seed_dir.name)
        if match and seed_dir.is_dir() and any(seed_dir.glob("*.pth")):
            found[int(match.group(1))] = run_checkpoint(seed_dir)
    return dict(sorted(found.items()))


def test_jobs(folder: Path, name: str, seeds: list[int] | None, passthrough: list[str]) -> list[Job]:
    """One ``-r <ckpt> --test`` evaluation per seed folder; its run id is the absolute path
    ``<group folder>/<name>/seedN``, so the test folder is ``<group folder>/<name>/test_seedN``,
    beside the aggregate, wherever the group folder is and whatever the config's save_dir."""
    checkpoints = seed_checkpoints(folder)
    if not checkpoints:
        raise ConfigError(f"{folder}: no seed*/model_best.pth nor any other seed*/*.pth checkpoint")
    if seeds is not None:
        missing = [seed for seed in seeds if seed not in checkpoints]
        if missing:
            raise ConfigError(f"{folder}: no checkpoint for seed(s) {', '.join(map(str, missing))}")
        checkpoints = {seed: checkpoints[seed] for seed in seeds}
    for seed, (path, note) in checkpoints.items():
        print(f"seed {seed}: {path} ({note})", file=sys.stderr)
    return [Job(seed, f"seed{seed}", ["-r", str(path), "--test", *passthrough,
                                      "--run_id", str(folder.resolve() / name / f"seed{seed}")])
            for seed, (path, _) in checkpoints.items()]


# --- running -----------------------------------------------------------------------------------
def metrics_path(lines: list[str]) -> Path | None:
    """The path on the last ``metrics: <path>`` line of a run's output."""
    for line in reversed(lines):
        if line.startswith("metrics: "):
            return Path(line[len("metrics: "):].strip())
    return None


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Runner:
    """Runs jobs as ``trainer.cli`` subprocesses, streaming their output prefixed with the seed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen] = set()

    def run_job(self, job: Job, device: str | None) -> Outcome:
        """Run one job to completion on ``device`` (passed as ``-d``); output kept and streamed."""
        command = [sys.executable, "-m", "trainer.cli", *job.argv, *(["-d", device] if device else [])]
        self._say(f"[{job.label}] $ {' '.join(command)}")
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=_child_env())
        with self.lock:
            self.live.add(proc)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            self._say(f"[{job.label}] {lines[-1]}")
        code = proc.wait()
        with self.lock:
            self.live.discard(proc)
        wall = time.perf_counter() - start
        self._say(f"[{job.label}] exit {code} after {wall:.1f} s")
        return Outcome(job, command, code, wall, lines)

    def run_all(self, jobs: list[Job], slots: list[str | None]) -> list[Outcome]:
        """One slot: jobs one after another; several: one thread per slot pulling the next job."""
        if len(slots) == 1:
            return [self.run_job(job, slots[0]) for job in jobs]
        pending: queue.Queue[Job] = queue.Queue()
        for job in jobs:
            pending.put(job)
        done: dict[str, Outcome] = {}

        def work(device: str) -> None:
            while True:
                try:
                    job = pending.get_nowait()
                except queue.Empty:
                    return
                done[job.label] = self.run_job(job, device)

        threads = [threading.Thread(target=work, args=(slot,), daemon=True) for slot in slots[:len(jobs)]]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
        return [done[job.label] for job in jobs]

    def interrupt(self, grace_s: float = 5.0) -> None:
        """After an interrupt: give the subprocesses ``grace_s`` to stop (a Ctrl-C reaches them too),
        then pass it on to those still running, and wait for them."""
        with self.lock:
            procs = list(self.live)
        for proc in procs:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait()

    def _say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)


# --- aggregating -------------------------------------------------------------------------------
def _failure(outcome: Outcome) -> dict | None:
    if outcome.exit_code != 0:
        return {"seed": outcome.job.seed, "exit_code": outcome.exit_code}
    if outcome.metrics is None or not outcome.metrics.is_file():
        return {"seed": outcome.job.seed, "exit_code": 0, "reason": "no metrics file named on a 'metrics:' line"}
    return None


def group_folder(outcomes: list[Outcome]) -> Path:
    """The parent of the seed run folders (from the ``metrics:`` lines)."""
    parents = {outcome.metrics.parent.parent for outcome in outcomes}
    if len(parents) > 1:
        print(f"warning: seed folders under several parents: {', '.join(map(str, sorted(parents)))}",
              file=sys.stderr)
    return outcomes[0].metrics.parent.parent


def _describe(failure: dict) -> str:
    return failure.get("reason") or f"exit {failure['exit_code']}"


def _write_logs(outcomes: list[Outcome], folder: Path) -> None:
    """``folder/logs/seedN.log``: each seed's command line and console output."""
    for outcome in outcomes:
        write_text("\n".join([" ".join(outcome.command), *outcome.lines]) + "\n",
                   folder / GROUP_LOGS_NAME / f"{outcome.job.label}.log")


def finish_group(outcomes: list[Outcome], out_dir: Path | None, mode: str, command: list[str],
                 config: str | None) -> int:
    """Write the seeds' outputs, ``aggregate.md`` and ``aggregate.json``; print the table.
    ``out_dir`` None: the group folder of the seed runs. Returns the exit status."""
    failures = {outcome.job.label: _failure(outcome) for outcome in outcomes}
    failed = [failure for failure in failures.values() if failure is not None]
    for failure in failed:
        print(f"seed {failure['seed']} failed: {_describe(failure)}", file=sys.stderr)
    good = [outcome for outcome in outcomes if failures[outcome.job.label] is None]
    if not good:
        print(f"error: all {len(outcomes)} seed(s) failed; no aggregate written", file=sys.stderr)
        codes = {failure["exit_code"] for failure in failed}
        return codes.pop() if len(codes) == 1 and 0 not in codes else 1
    out_dir = group_folder(good) if out_dir is None else out_dir
    _write_logs(outcomes, out_dir)
    doc = aggregate_folder(out_dir, command, config, failed, {str(o.metrics.parent): o.wall_s for o in good})
    if doc is None:
        print(f"error: no seed folder of {out_dir} says finished; no aggregate written", file=sys.stderr)
        return 1
    doc.update(title=f"{out_dir.name}: {'training' if mode == 'train' else 'test-only evaluation'}",
               mode=mode, runs=[{"seed": o.job.seed, "exit_code": o.exit_code, "wall_s": o.wall_s,
                                 "command": o.command, "run_dir": str(o.metrics.parent) if o.metrics else None}
                                for o in outcomes])
    _, json_path = write_aggregate(doc, out_dir)
    print(aggregate_markdown(doc), end="")
    print(f"aggregate: {json_path}")
    return 1 if failed else 0


# --- command line ------------------------------------------------------------------------------
# mode, jobs, output folder (None: the seeds' group folder), config path
Plan = tuple[str, list[Job], Path | None, str | None]


def _plan_training(args, passthrough: list[str], default_config: str | None) -> Plan:
    if args.test or args.name:
        raise ConfigError("--test and --name evaluate existing checkpoints: add --from GROUP_FOLDER")
    if args.seeds is None:
        raise ConfigError("--seeds is required, e.g. --seeds 1,2,3")
    config = args.config or default_config
    if config is None:
        raise ConfigError("no config given: add -c config.json")
    _check_passthrough(passthrough, "train")
    group = _check_name(args.group or new_run_id(), "--group")
    jobs = train_jobs(parse_seeds(args.seeds), group, ["-c", config, *passthrough])
    return "train", jobs, group_folder_of(config, passthrough, group), config


def group_folder_of(config: str, passthrough: list[str], group: str) -> Path:
    """Where the seeds of ``group`` go: ``<trainer.save_dir>/<name>/<group>`` of the config with
    the command line's ``--save_dir`` and ``-o`` overrides of those two keys."""
    overrides, tokens = {}, iter(passthrough)
    for token in tokens:
        flag, _, value = token.partition("=")
        if flag in ("-o", "--override", "--save_dir"):
            value = value or next(tokens, "")
            key, value = ("trainer.save_dir", value) if flag == "--save_dir" else parse_assignment(value)
            if key in ("name", "trainer.save_dir"):
                overrides[key] = value
    settings = Settings.from_config(load_config(config), config, overrides)
    return run_path(settings.trainer.save_dir, settings.name, group)


def _plan_test(args, passthrough: list[str]) -> Plan:
    if not args.test:
        raise ConfigError("--from evaluates the group's checkpoints: add --test")
    if args.group:
        raise ConfigError("--group names a new training group; with --from use --name")
    folder = Path(args.source)
    if not folder.is_dir():
        raise ConfigError(f"--from {folder}: not a folder")
    _check_passthrough(passthrough, "test")
    name = _check_name(args.name or new_run_id(), "--name")
    extra = ["-c", args.config] if args.config else []
    seeds = parse_seeds(args.seeds) if args.seeds else None
    return "test", test_jobs(folder, name, seeds, [*extra, *passthrough]), folder / name, args.config


def main(argv: list[str] | None = None, default_config: str | None = None) -> int:
    """Parse the command line, run every seed, aggregate; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    runner = Runner()
    try:
        args, passthrough = build_parser().parse_known_args(argv)
        if args.source is None:
            mode, jobs, out_dir, config = _plan_training(args, passthrough, default_config)
        else:
            mode, jobs, out_dir, config = _plan_test(args, passthrough)
        slots = device_slots(args.device)
        created = not out_dir.exists()
        lock = RunLock(out_dir, GROUP_LOCK_NAME, "group folder", "--group" if mode == "train" else "--name")
        lock.acquire()   # a second command on the same folder is refused here, before any seed runs
        try:
            outcomes = runner.run_all(jobs, slots)
            return finish_group(outcomes, out_dir, mode, [PROG, *argv], config)
        finally:
            lock.release()
            if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
    except ConfigError as err:
        return error_exit(err)
    except KeyboardInterrupt:
        runner.interrupt()
        return 130


if __name__ == "__main__":
    sys.exit(main())
