"""Run the training command line with faults injected (for tests/test_reliability.py).

    python tests/fault_driver.py <trainer.cli arguments>

``JOEM_FAULTS`` (JSON) says what to inject; ``JOEM_FAULT_MARKERS`` is a folder where the driver
writes a marker file when it reaches a pause, so the test knows when to send its signal:

- ``{"pause_after_step": N}``: after the N-th training step (``paused`` marker), sleep 3 s.
- ``{"pause_in_save": K}``: inside the K-th checkpoint write, after its first megabyte.
- ``{"pause_in_validation": K}``: at the first batch of the K-th validation.
- ``{"pause_after_validation": K}``: when the K-th validation has been reported.
- ``{"file_size_limit_after_saves": [N, BYTES]}``: after N checkpoints, ``RLIMIT_FSIZE`` = BYTES
  (a real kernel limit: writes beyond it fail with EFBIG, as on a full disk); BYTES
  ``"events"``: one byte more than the largest TensorBoard event file so far (its next write fails).
- ``{"deny_writes": [N, "EROFS" | "EACCES", FOLDER]}``: after N checkpoints, every file or
  folder creation under FOLDER fails with that error (a read-only or forbidden folder).
- ``{"pause_at_end": true}``: once the run has returned (finished, ``metrics:`` printed).
- ``{"cpu_ranks": true}``: ``-d 0,1`` starts the project's own launcher with one CPU (gloo)
  process per id instead of one per GPU (this machine has none).

Under DDP every process pauses; a marker ``NAME-rankR`` holds process R's pid (``NAME`` is
rank 0's). Run as a command, the driver writes its exit status into ``exit-rankR``.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAULTS = json.loads(os.environ.get("JOEM_FAULTS", "{}"))
MARKERS = Path(os.environ.get("JOEM_FAULT_MARKERS", "."))
PAUSE_S = 3.0
state = {"steps": 0, "saves": 0, "validations": 0, "pause_write": False}


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def pause(name: str) -> None:
    (MARKERS / f"{name}-rank{rank()}").write_text(str(os.getpid()))
    if rank() == 0:
        (MARKERS / name).write_text(str(os.getpid()))
    time.sleep(PAUSE_S)


def deny(code: str, folder: str) -> None:
    """From now on, creating files or folders under ``folder`` fails with ``code``."""
    number, root = getattr(errno, code), os.path.realpath(folder)

    def blocked(path) -> bool:
        return os.path.realpath(os.fsdecode(path)).startswith(root)

    def refuse(path):
        raise OSError(number, os.strerror(number), os.fsdecode(path))
    real_open, real_mkdir, real_builtin_open = os.open, os.mkdir, builtins.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if blocked(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def builtin_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and blocked(file):
            refuse(file)
        return real_builtin_open(file, mode, *args, **kwargs)
    os.open, os.mkdir, builtins.open, io.open = os_open, mkdir, builtin_open, builtin_open


def install() -> None:
    import model.predictor
    import trainer.trainer
    import utils.checkpoint
    import utils.util

    real_step = trainer.trainer.train_step

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        state["steps"] += 1
        if state["steps"] == FAULTS.get("pause_after_step"):
            pause("paused")
        return result
    trainer.trainer.train_step = step

    real_save = utils.checkpoint.atomic_torch_save

    def save(obj, path):
        state["saves"] += 1
        state["pause_write"] = state["saves"] == FAULTS.get("pause_in_save")
        real_save(obj, path)
        done = state["saves"]
        limit = FAULTS.get("file_size_limit_after_saves")
        if limit and done == limit[0]:
            size = limit[1] if limit[1] != "events" else 1 + max(p.stat().st_size for p in Path.cwd().rglob(
                "events.out.tfevents.*"))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        denied = FAULTS.get("deny_writes")
        if denied and done == denied[0]:
            deny(denied[1], denied[2])
    utils.checkpoint.atomic_torch_save = save

    real_write = utils.util._WriteRecorder.write

    def write(self, data):
        written = real_write(self, data)
        self.total = getattr(self, "total", 0) + len(data)
        if state["pause_write"] and self.total > 1 << 20:
            state["pause_write"] = False
            pause("paused")
        return written
    utils.util._WriteRecorder.write = write

    real_validate = trainer.trainer.validate
    real_encode = model.predictor.encode

    def validate(*args, **kwargs):
        state["validations"] += 1
        state["pause_eval"] = state["validations"] == FAULTS.get("pause_in_validation")
        record = real_validate(*args, **kwargs)
        if state["validations"] == FAULTS.get("pause_after_validation"):
            pause("paused")
        return record

    def encode(*args, **kwargs):
        if state.pop("pause_eval", False):
            pause("paused")
        return real_encode(*args, **kwargs)
    trainer.trainer.validate = validate
    model.predictor.encode = encode

    denied = FAULTS.get("deny_writes")
    if denied and denied[0] == 0:
        deny(denied[1], denied[2])
    if FAULTS.get("pause_at_end"):
        import trainer.session
        real_run = trainer.session.run

        def run(*args, **kwargs):
            record = real_run(*args, **kwargs)
            pause("paused")
            return record
        trainer.session.run = run
    if FAULTS.get("cpu_ranks"):
        cpu_ranks()


def cpu_ranks() -> None:
    """``-d 0,1``: the project's launcher with one CPU process per id."""
    import utils.distributed
    real_init = utils.distributed.init_process

    def parse_devices(spec):
        return None if spec in (None, "cpu") else [int(part) for part in str(spec).split(",")]

    def init_process(devices, rank=None, world_size=None):
        return real_init(None, rank, world_size)
    utils.distributed.parse_devices, utils.distributed.init_process = parse_devices, init_process


if __name__ in ("__main__", "__mp_main__"):   # the processes the own launcher spawns re-import this file
    install()

if __name__ == "__main__":
    from trainer.cli import main
    code = main()
    (MARKERS / f"exit-rank{rank()}").write_text(str(code))
    sys.exit(code)
