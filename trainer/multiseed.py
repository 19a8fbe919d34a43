"""One training per seed (or a test-only evaluation of each seed's checkpoint), then their aggregate.

Every seed is one run of the single-run code path (what ``trainer.cli.main(default_config, [*args, "--seed",
N, "--run_id", GROUP/seedN])`` runs), in this process one after another (several GPU ids: one process per GPU)."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Callable

from trainer import session
from trainer.aggregate import is_finished, seed_run_folders, update_aggregate
from trainer.options import build_arg_parser, overrides_of
from utils.checkpoint import run_checkpoint
from utils.cli import ArgParser, error_exit
from utils.distributed import device_ids, parse_devices
from utils.errors import ConfigError, Interrupted, first_line
from utils.parse_config import load_config
from utils.run_dir import GROUP_LOCK_NAME, RunLock, check_folder_name, new_run_id, run_path, seed_name, test_run_id
from utils.settings import Settings
from utils.signals import StopSignals

PROG = "python -m trainer.multiseed"
Job = tuple[int, Path, list[str]]   # a seed, its run folder and its trainer.cli arguments


def build_parser() -> ArgParser:
    """This command's own options; every other argument goes to each seed's run."""
    parser = ArgParser(prog=PROG, description="one training per seed (or --from GROUP --test: evaluate each seed's "
                       "checkpoint), then mean ± sample std (ddof=1) over seeds in aggregate.md/.json")
    parser.add_argument("-c", "--config", default=None, help="training config JSON")
    parser.add_argument("--seeds", default=None, help="distinct seeds >= 0, e.g. 1,2,3 (with --from: which ones)")
    parser.add_argument("-d", "--device", default=None,
                        help="cpu or one GPU id: seeds one after another; several GPU ids: one seed per GPU at a time")
    parser.add_argument("--group", default=None, help="the group folder's name (default: a timestamp)")
    parser.add_argument("--from", dest="source", default=None, help="the group folder of a multi-seed training")
    parser.add_argument("--test", action="store_true", help="with --from: evaluate each finished seed's checkpoint")
    parser.add_argument("--name", default=None, help="with --from: this evaluation's folder in the group")
    own = {*parser._option_string_actions, "-r", "--resume", "--run_id", "--seed"}   # and those it sets per seed
    runs = ", ".join(flag for action in build_arg_parser(None)._actions for flag in action.option_strings
                     if flag not in own)
    parser.epilog = ("exit status: 0 every seed succeeded; 1 some failed (the aggregate covers the others); all "
                     "failed: their common exit code, else 1; 2 bad arguments (nothing runs); 130/143 stopped. "
                     f"Options of every run (python -m trainer.cli -h): {runs}")
    return parser


def parse_seeds(spec: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]: distinct integers >= 0, else a ConfigError."""
    try:
        seeds = [int(part) for part in spec.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct integers >= 0 like 1,2,3, got {spec!r}")
    return seeds


def plan(args: argparse.Namespace, passthrough: list[str], default_config: str | None) -> tuple[Path, list[Job]]:
    """Check every argument and seed (before anything runs); the output folder and the seeds' jobs."""
    base = [*(["-c", args.config] if args.config else []), *passthrough]
    run = build_arg_parser(default_config).parse_args(base)   # what every seed's run is given
    for flag, value in (("--seed", run.seed), ("--run_id", run.run_id), ("-r/--resume", run.resume)):
        if value is not None:
            raise ConfigError(f"{flag}: {PROG} sets every seed's seed, run folder and checkpoint; remove it")
    for option, value in (("--group", args.group), ("--name", args.name)):
        if value is not None and Path(check_folder_name(value, option)).is_absolute():
            raise ConfigError(f"{option}: expected a folder name, not an absolute path, got {value!r}")
    for wrong, message in ((args.source and not args.test, "--from evaluates a group's checkpoints: add --test"),
                           (args.source and args.group, "--group names a new training group; with --from use --name"),
                           (not args.source and (args.test or args.name), "--test and --name: add --from GROUP")):
        if wrong:
            raise ConfigError(message)
    parse_devices(args.device)   # the GPUs exist
    config = run.config or (None if args.source else default_config)
    settings = config and Settings.from_config(load_config(config), config, overrides_of(run))
    if args.source is not None:
        return test_jobs(args, base)
    if args.seeds is None or settings is None:
        raise ConfigError("--seeds is required, e.g. --seeds 1,2,3" if settings else "no config given: add -c CONFIG")
    group, seeds = args.group or new_run_id(), parse_seeds(args.seeds)
    folder = run_path(settings.trainer.save_dir, settings.name, group)
    return folder, [(seed, folder / seed_name(seed), [*base, "--seed", str(seed), "--run_id",
                                                      f"{group}/{seed_name(seed)}"]) for seed in seeds]


def test_jobs(args: argparse.Namespace, base: list[str]) -> tuple[Path, list[Job]]:
    """``GROUP/NAME`` and per seed (``--seeds``, else every finished one) ``-r <its run_checkpoint> --test``."""
    source = Path(args.source)
    if not source.is_dir():
        raise ConfigError(f"--from {source}: not a folder")
    found = {seed: source / seed_name(seed) for seed in seed_run_folders(source) if (source / seed_name(seed)).is_dir()}
    finished = [seed for seed, path in found.items() if is_finished(path)]
    seeds = finished if args.seeds is None else parse_seeds(args.seeds)
    if not seeds or set(seeds) - set(found):
        raise ConfigError(f"--from {source}: no seed folder for seed(s) {sorted(set(seeds) - set(found))}" if seeds
                          else f"--from {source}: no seed folder (seedN) whose run.json says finished")
    name, jobs = args.name or new_run_id(), []
    for seed in seeds:
        checkpoint, note = run_checkpoint(found[seed])
        print(f"seed {seed}: {checkpoint} ({note})", file=sys.stderr)
        run_id = source.resolve() / name / seed_name(seed)
        jobs.append((seed, source / name / test_run_id(seed_name(seed)),
                     [*base, "-r", str(checkpoint), "--test", "--run_id", str(run_id)]))
    return source / name, jobs


def device_queues(jobs: list[Job], device: str | None) -> list[list[Job]]:
    """One queue (``-d`` as given); several GPU ids: one per GPU, the seeds dealt in turn, run with ``-d <id>``."""
    ids = device_ids(device) or []
    if len(ids) <= 1:
        return [[(seed, folder, [*argv, *(["-d", device] if device else [])]) for seed, folder, argv in jobs]]
    return [[(seed, folder, [*argv, "-d", str(gpu)]) for seed, folder, argv in jobs[index::len(ids)]]
            for index, gpu in enumerate(ids[:len(jobs)])]


def run_seed(seed: int, folder: Path, argv: list[str], default_config: str | None) -> dict:
    """One seed's run in this process: its seed, run folder, exit code and wall time."""
    print(f"seed {seed}: trainer.cli {' '.join(argv)}", flush=True)
    start, outcome = time.perf_counter(), {"seed": seed, "run_dir": str(folder)}
    try:
        outcome["exit_code"] = session.launch(default_config, argv)
    except Interrupted:
        raise
    except Exception as err:   # a bug in one seed: reported, the other seeds go on
        outcome.update(exit_code=1, reason=first_line(err, 300))
    outcome["wall_s"] = time.perf_counter() - start
    if outcome["exit_code"]:
        what = "stopped by a signal" if outcome["exit_code"] > 128 else "failed"
        print(f"seed {seed} {what}: {outcome.get('reason') or 'exit ' + str(outcome['exit_code'])}", file=sys.stderr)
    return outcome


def run_queue(jobs: list[Job], default_config: str | None, report: Callable[[dict], None]) -> None:
    """Run the seeds one after another, reporting each outcome; stop after one stopped by a signal."""
    for job in jobs:
        outcome = run_seed(*job, default_config)
        report(outcome)
        if outcome["exit_code"] > 128:
            return


def run_queues(queues: list[list[Job]], default_config: str | None) -> list[dict]:
    """One queue: in this process; several: one worker process each (a signal is passed on to them)."""
    outcomes: list[dict] = []
    if len(queues) == 1:
        run_queue(queues[0], default_config, outcomes.append)
        return outcomes
    context = multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    workers = [context.Process(target=run_queue, args=(queue, default_config, results.put)) for queue in queues]
    for worker in workers:
        worker.start()
    try:
        while any(worker.is_alive() for worker in workers) or not results.empty():
            if results.empty():
                time.sleep(0.1)
            else:
                outcomes.append(results.get())
    except Interrupted as err:   # passed on: each worker stops its run at a safe point
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, err.signum)
        for worker in workers:
            worker.join()
        raise
    done = {outcome["seed"] for outcome in outcomes}
    return outcomes + [{"seed": seed, "run_dir": str(folder), "exit_code": 1, "reason": "its worker process died"}
                       for queue in queues for seed, folder, _ in queue if seed not in done]


def _run(argv: list[str], default_config: str | None) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    folder, jobs = plan(args, passthrough, default_config)
    mode, hint, what = ("test", "--name", "test-only evaluation") if args.source else ("train", "--group", "training")
    created, lock = not folder.exists(), RunLock(folder, GROUP_LOCK_NAME, "group folder", hint)
    lock.acquire()   # a second command on the same folder is refused here, before any seed runs
    try:
        taken = [str(seed) for seed in seed_run_folders(folder) if seed in {job[0] for job in jobs}]
        if taken:
            raise ConfigError(f"{folder}: seed(s) {', '.join(taken)} have a run folder here; choose another {hint}")
        outcomes = run_queues(device_queues(jobs, args.device), default_config)
        codes = [outcome["exit_code"] for outcome in outcomes]
        if max(codes) > 128:
            print("stopped by a signal: no aggregate written", file=sys.stderr)
            return max(codes)
        config = args.config or (None if args.source else default_config)
        doc = update_aggregate(folder, outcomes, command=[PROG, *argv], config=config, mode=mode,
                               title=f"{folder.name}: {what}")
        if doc is None:
            print(f"error: no seed folder of {folder} says finished; no aggregate written", file=sys.stderr)
        if all(codes) and len(set(codes)) == 1:
            return codes[0]   # every seed failed alike (2: a config error, 3: diverged, ...)
        return 0 if doc is not None and not any(codes) else 1
    finally:
        lock.release()
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def main(argv: list[str] | None = None, default_config: str | None = None) -> int:
    """Check everything, run every seed, aggregate; returns the exit status (see ``-h``)."""
    try:
        with StopSignals():   # a signal between seeds stops the group (each run handles its own)
            return _run(list(sys.argv[1:] if argv is None else argv), default_config)
    except ConfigError as err:
        return error_exit(err)
    except Interrupted as err:
        print(f"{err}: the group stopped", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: the group stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
