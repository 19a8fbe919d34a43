"""Fault injection on real training subprocesses (tiny config, CPU): signals at any moment,
exact resume, requeue, one run per folder, divergence, storage faults, settings checked at start.

Faults are caused for real: signals are sent to the training process when it reports (through
tests/fault_driver.py) that it is inside a step, a validation or a checkpoint write; a full
disk is the kernel's file-size limit (RLIMIT_FSIZE); a read-only or forbidden folder is
simulated by failing every file creation under it with EROFS/EACCES (chmod does not stop root).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.tiny import read_metrics, write_tiny_config
from trainer.cli import main as cli_main
from trainer.step import norms_finite
from utils.run_dir import new_run_id
from utils.util import atomic_write

pytestmark = pytest.mark.slow   # real training subprocesses: run with `pytest -m slow tests`
ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
FAST = {"data__synthetic__num_train": 30, "data__synthetic__num_val": 3, "data_loader__val_batch_size": 1,
        "trainer__epochs": 2,
        "trainer__save_period": 2, "trainer__test_after_train": False,
        "optimizer": {"type": "SGD", "args": {"lr": 0.01, "momentum": 0.9}, "head_lr_mult": 1}}


class Run:
    """A training subprocess under the fault driver."""

    def __init__(self, tmp: Path, argv: list, faults: dict | None = None, umask: int | None = None,
                 cwd: Path | None = None):
        self.markers = tmp / f"markers-{time.monotonic_ns()}"
        self.markers.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "JOEM_FAULTS": json.dumps(faults or {}), "JOEM_FAULT_MARKERS": str(self.markers)}
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), *map(str, argv), "-d", "cpu"], cwd=cwd or tmp,
                                     env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=None if umask is None else (lambda: os.umask(umask)))

    def wait_for(self, marker: str = "paused", timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not (self.markers / marker).exists():
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {self.proc.communicate()}"
            assert time.monotonic() < deadline, "the driver never reached its pause"
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.wait_for()
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def run_to_end(tmp: Path, *argv, **kwargs) -> tuple[int, str, str]:
    return Run(tmp, list(argv), **kwargs).finish()


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny config and an uninterrupted run of it (the reference)."""
    tmp = tmp_path_factory.mktemp("reliability")
    config = write_tiny_config(tmp, tmp / "cache", **FAST)
    code, out, err = run_to_end(tmp, "-c", config, "--run_id", "straight")
    assert code == 0, err
    return tmp, config, tmp / "saved" / "tiny"


def assert_same_training(a: Path, b: Path) -> None:
    """Weights, optimizer states, schedule and metrics of two runs' epoch-2 checkpoints are equal."""
    first = torch.load(a / "checkpoint-epoch2.pth", weights_only=True)
    second = torch.load(b / "checkpoint-epoch2.pth", weights_only=True)
    for part in ("visual_encoder", "semantic_encoder"):
        assert first[part].keys() == second[part].keys()
        for key in first[part]:
            assert torch.equal(first[part][key], second[part][key]), (part, key)
    for part in ("optimizer", "optimizer_gen"):
        assert first[part]["param_groups"] == second[part]["param_groups"]
        for index, state in first[part]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, second[part]["state"][index][key]), (part, index, key)
    assert first["lr_scheduler"] == second["lr_scheduler"] and first["global_step"] == second["global_step"]
    assert read_metrics(a) == read_metrics(b)
    losses = [dict(re.findall(r"epoch (\d)/2  (loss [0-9.]+ \(ce [0-9.]+)", (run / "train.log").read_text()))
              for run in (a, b)]   # the last line of each epoch (an attempt killed before a checkpoint may log more)
    assert losses[0] == losses[1] and len(losses[0]) == 2


def interrupt_and_resume(setup, name: str, faults: dict, signum: int, where: str) -> Path:
    tmp, config, runs = setup
    run = Run(tmp, ["-c", config, "--run_id", name], faults)
    run.signal(signum)
    code, out, err = run.finish()
    folder = runs / name
    assert code == 128 + signum, err
    assert "Traceback" not in out + err
    message = last_line(out)
    assert f"stopped at {where}: saved {folder / 'checkpoint-interrupted.pth'}; resume with -r {folder}" in message
    saved = torch.load(folder / "checkpoint-interrupted.pth", weights_only=True)
    assert norms_finite(list(saved["visual_encoder"].values()))
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
    assert not list(folder.glob(".*.tmp")) and not (folder / "run.lock").exists()
    code, out, err = run_to_end(tmp, "-r", folder)
    assert code == 0, err
    assert_same_training(runs / "straight", folder)
    return folder


def test_sigterm_mid_epoch_resumes_exactly(setup):
    folder = interrupt_and_resume(setup, "term", {"pause_after_step": 2}, signal.SIGTERM, "epoch 1, step 2/4")
    log = (folder / "train.log").read_text()
    assert "resumed at epoch 1, step 2/4" in log and "SIGTERM" not in log.split("resumed at")[1]


def test_sigint_during_validation_resumes_exactly(setup):
    interrupt_and_resume(setup, "val", {"pause_in_validation": 1}, signal.SIGINT,
                         "epoch 1's validation (it reruns on resume)")


def test_sigint_between_epochs_resumes_exactly(setup):
    interrupt_and_resume(setup, "between", {"pause_after_validation": 1}, signal.SIGINT, "the end of epoch 1")


def test_signal_during_a_checkpoint_write_lets_it_complete(setup):
    tmp, config, runs = setup
    run = Run(tmp, ["-c", config, "--run_id", "write"], {"pause_in_save": 1})   # the first: model_best.pth
    run.signal(signal.SIGINT)
    code, out, err = run.finish()
    assert code == 130 and "Traceback" not in out + err
    best = torch.load(runs / "write" / "model_best.pth", weights_only=True)        # the write completed
    assert best["epoch"] == 1 and "stopped at the end of epoch 1" in last_line(out)
    assert torch.equal(best["visual_encoder"]["decoder.pred_conv.weight"], torch.load(
        runs / "write" / "checkpoint-interrupted.pth", weights_only=True)["visual_encoder"]["decoder.pred_conv.weight"])
    code, out, err = run_to_end(tmp, "-r", runs / "write")
    assert code == 0, err
    assert_same_training(runs / "straight", runs / "write")


def test_requeue_reruns_its_own_command_and_cleans_a_killed_write(setup):
    tmp, config, runs = setup
    command = ["-c", config, "--run_id", "requeue", "-r", "auto"]
    run = Run(tmp, command, {"pause_in_save": 1})   # killed -9 inside its first checkpoint write
    run.wait_for()
    run.proc.kill()
    run.finish()
    folder = runs / "requeue"
    assert list(folder.glob(".model_best.pth.*.tmp"))              # what a killed writer leaves
    run = Run(tmp, command, {"pause_after_step": 3}, umask=0o027)  # requeued: starts over (no checkpoint)
    run.signal(signal.SIGTERM)
    code, out, err = run.finish()
    assert code == 143 and not list(folder.glob(".*.tmp"))
    for name in ("run.json", "checkpoint-interrupted.pth"):
        assert (folder / name).stat().st_mode & 0o777 == 0o640, name   # files follow the umask
    code, out, err = run_to_end(tmp, *command)                     # requeued again: continues in place
    assert code == 0, err
    assert_same_training(runs / "straight", folder)
    code, out, err = run_to_end(tmp, *command)
    assert code == 0 and "already finished" in out


def test_one_live_run_per_folder(setup):
    tmp, config, runs = setup
    first = Run(tmp, ["-c", config, "--run_id", "twice"], {"pause_after_step": 1})
    first.wait_for()
    code, out, err = run_to_end(tmp, "-c", config, "--run_id", "twice")
    assert code == 2 and err.count("\n") == 1
    assert f"run folder in use by pid {first.proc.pid} on host" in err
    assert first.finish()[0] == 0
    code, out, err = run_to_end(tmp, "-c", config, "--run_id", "twice")
    assert code == 2 and "run folder exists (earlier run, status finished)" in err
    assert json.loads((runs / "twice" / "config.json").read_text())["seed"] == 0
    ids = {new_run_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(re.fullmatch(r"\d{8}_\d{6}_\d{6}_[0-9a-f]{4}", i) for i in ids)


def test_divergence_never_saves_non_finite_weights(setup):
    tmp, config, runs = setup
    code, out, err = run_to_end(tmp, "-c", config, "--run_id", "diverge", "--lr", "1e30", "--bs", "16",
                                "--epochs", "4", "-o", "trainer.save_period=1")
    folder = runs / "diverge"
    assert code == 3, err
    message = last_line(out)
    assert message.startswith("error: ") and "not finite" in message
    saved = sorted(folder.glob("*.pth"))
    for path in saved:
        checkpoint = torch.load(path, weights_only=True)
        assert norms_finite([*checkpoint["visual_encoder"].values(), *checkpoint["semantic_encoder"].values()]), path
    if saved:
        named = re.search(r"the last good checkpoint is (\S+)", message).group(1)
        assert Path(named).is_file() and Path(named).parent == folder
    else:
        assert "no checkpoint was written yet" in message
    assert json.loads((folder / "run.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("fault,reason", [
    ({"file_size_limit_after_saves": [1, 1 << 20]}, "File too large"),           # the disk fills up
    ({"deny_writes": [1, "EACCES", "RUN"]}, "Permission denied"),                 # the folder turns forbidden
])
def test_storage_faults_at_a_checkpoint_keep_earlier_ones(setup, fault, reason):
    tmp, config, runs = setup
    name = "full" if "file_size_limit_after_saves" in fault else "denied"
    folder = runs / name
    if "deny_writes" in fault:
        fault = {"deny_writes": [1, "EACCES", str(folder)]}
    code, out, err = run_to_end(tmp, "-c", config, "--run_id", name, "-o", "trainer.save_period=1", faults=fault)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write {folder / 'checkpoint-epoch1.pth'}: ")
    assert reason in err and "Traceback" not in out + err and not list(folder.glob(".*.tmp"))
    assert torch.load(folder / "model_best.pth", weights_only=True)["epoch"] == 1   # the earlier one is intact
    assert json.loads((folder / "run.json").read_text())["status"] in ("running", "failed")


def test_read_only_save_dir_leaves_nothing(setup):
    tmp, config, runs = setup
    readonly = tmp / "readonly"
    readonly.mkdir()
    code, out, err = run_to_end(tmp, "-c", config, "--save_dir", readonly,
                                faults={"deny_writes": [0, "EROFS", str(readonly)]})
    assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err
    assert not any(readonly.iterdir())


@pytest.mark.parametrize("override,key", [
    (["--bs", "0"], "data_loader.batch_size: must be >= 1, got 0"),
    (["-o", "data_loader.batch_size=-2"], "data_loader.batch_size: must be >= 1, got -2"),
    (["-o", "data_loader.val_batch_size=0"], "data_loader.val_batch_size: must be >= 1"),
    (["-o", "data_loader.num_workers=-1"], "data_loader.num_workers: must be >= 0"),
    (["-o", "trainer.save_period=0"], "trainer.save_period: must be >= 1"),
    (["--epochs", "0"], "trainer.epochs: must be >= 1, got 0"),
    (["-o", "trainer.epochs=\"ten\""], "trainer.epochs: invalid value 'ten'"),
])
def test_settings_are_checked_before_any_work(tmp_path, capsys, override, key):
    config = write_tiny_config(tmp_path, tmp_path / "cache")
    assert cli_main(argv=["-c", str(config), "-d", "cpu", *override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err
    assert not (tmp_path / "saved").exists() and not (tmp_path / "cache").exists()   # no data made, no folder


def test_bad_validation_files_are_found_at_start(tmp_path, capsys):
    from PIL import Image

    from tests.test_data_helpers import standard_voc, voc_cfg, write_label
    root, emb = standard_voc(tmp_path)
    write_label(root / "SegmentationClass" / "v0.png", torch.full((20, 32), 50, dtype=torch.uint8).numpy())
    jpeg = (root / "JPEGImages" / "v1.jpg").read_bytes()
    (root / "JPEGImages" / "v1.jpg").write_bytes(jpeg[: len(jpeg) // 2])     # truncated
    Image.new("L", (7, 7)).save(root / "SegmentationClass" / "v2.png")       # size mismatch
    config = json.loads(write_tiny_config(tmp_path, tmp_path / "cache").read_text())
    config["data"], config["trainer"]["monitor"] = voc_cfg(root, emb), "off"   # the reported split, read at start
    path = tmp_path / "voc.json"
    path.write_text(json.dumps(config))
    assert cli_main(argv=["-c", str(path), "-d", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "v0.png" in err
    assert "(and 2 more; list them with python -m data_loader.verify)" in err
    assert not (tmp_path / "saved").exists()


def test_overrides_when_resuming_are_applied_or_refused(setup, capsys):
    tmp, config, runs = setup
    checkpoint = runs / "straight" / "checkpoint-epoch2.pth"
    assert cli_main(argv=["-r", str(checkpoint), "--epochs", "3", "--lr", "0.5", "--run_id", "more", "-d", "cpu",
                          "--save_dir", str(tmp / "saved")]) == 0
    log = (runs / "more" / "train.log").read_text()
    assert "resuming with a changed setting: optimizer.args.lr 0.01 -> 0.5 (applied)" in log
    assert "epoch 3/3" in log and f"lr backbone={0.5 * (1 - 2 / 3) ** 0.9:.3g}" in log
    assert cli_main(argv=["-r", str(checkpoint), "-o", "optimizer.type=Adam", "-d", "cpu",
                          "--save_dir", str(tmp / "saved")]) == 2
    err = capsys.readouterr().err
    assert "optimizer.type: cannot change from 'SGD' to 'Adam' when resuming" in err and err.count("\n") == 1


def test_atomic_writes_follow_the_umask_and_keep_the_old_file(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_write(tmp_path / "a.txt", lambda handle: handle.write(b"one"))
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "a.txt", lambda handle: (handle.write(b"two"), 1 / 0))
    assert (tmp_path / "a.txt").read_bytes() == b"one" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_run_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path):
    from utils.errors import RunFolderBusy
    from utils.run_dir import RunLock
    first = RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()} on host"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / "run.lock").exists()
    (tmp_path / "run" / "run.lock").write_text("pid 1 on host gone since 2020-01-01 00:00:00\n")  # left by a killed run
    second = RunLock(tmp_path / "run")
    second.acquire()
    assert f"pid {os.getpid()}" in (tmp_path / "run" / "run.lock").read_text()
    second.release()


def test_a_lock_taken_a_moment_ago_is_refused_naming_its_holder(tmp_path):
    """The race CI met: the holder has the flock but has not yet written its line."""
    import fcntl
    import threading

    from utils.errors import RunFolderBusy
    from utils.run_dir import RunLock
    with open(tmp_path / "run.lock", "a+") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        writer = threading.Timer(0.3, lambda: (holder.write("pid 4242 on host h since t\n"), holder.flush()))
        writer.start()
        with pytest.raises(RunFolderBusy, match="in use by pid 4242 on host h since t; wait for it to end"):
            RunLock(tmp_path).acquire()
        writer.join()


@pytest.mark.slow
def test_a_signal_after_the_run_finished_is_ignored(setup):
    tmp, config, runs = setup
    run = Run(tmp, ["-c", config, "--run_id", "late", "--epochs", "1"], {"pause_at_end": True})
    run.signal(signal.SIGTERM)    # metrics: was printed and run.json says finished
    code, out, err = run.finish()
    assert code == 0 and last_line(out) == f"metrics: {runs / 'late' / 'metrics.jsonl'}", err
    assert json.loads((runs / "late" / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_metrics_write_failure_is_one_line_and_loses_nothing(setup):
    tmp, config, runs = setup
    folder = runs / "metrics"
    metrics = folder / "metrics.jsonl"   # read-only once epoch 1's model_best.pth is written
    code, out, err = run_to_end(tmp, "-c", config, "--run_id", "metrics",
                                faults={"deny_writes": [1, "EROFS", str(metrics)]})
    assert code == 2 and err == f"error: cannot write {metrics}: Read-only file system\n", err
    assert {record["epoch"] for record in read_metrics(folder)} == {1}   # epoch 1's lines intact, no partial line
    assert torch.load(folder / "model_best.pth", weights_only=True)["epoch"] == 1
    assert json.loads((folder / "run.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_tensorboard_write_failure_is_one_line(setup):
    tmp, config, runs = setup
    board = runs / "board" / "tensorboard"
    code, out, err = run_to_end(tmp, "-c", config, "--run_id", "board", "-o", "trainer.tensorboard=true",
                                faults={"deny_writes": [0, "EROFS", str(board)]})
    assert code == 2 and err == f"error: cannot create folder {board}: Read-only file system\n", err


@pytest.mark.slow
def test_tensorboard_failure_mid_run_and_at_resume_is_one_line(setup):
    """A full disk under TensorBoard's writer thread in epoch 2 (RLIMIT_FSIZE), and a read-only
    tensorboard/ folder that exists when the run is resumed: one line each, no thread traceback."""
    tmp, config, runs = setup
    board = runs / "board_mid" / "tensorboard"
    code, out, err = run_to_end(tmp, "-c", config, "--run_id", "board_mid", "-o", "trainer.tensorboard=true",
                                faults={"file_size_limit_after_saves": [1, "events"]})
    assert code == 2 and err == f"error: cannot write into {board}: File too large\n", err
    assert torch.load(runs / "board_mid" / "model_best.pth", weights_only=True)["epoch"] == 1   # intact
    code, out, err = run_to_end(tmp, "-r", runs / "board_mid", faults={"deny_writes": [0, "EROFS", str(board)]})
    assert code == 2 and err == f"error: cannot write into {board}: Read-only file system\n", err


@pytest.mark.slow
def test_a_read_only_working_directory_is_one_line_for_the_demo_cache(tmp_path):
    """The demo's relative cache_dir in a folder where nothing can be written."""
    config = write_tiny_config(tmp_path, tmp_path / "unused", data__synthetic__cache_dir=".cache/synthetic")
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run_to_end(tmp_path, "-c", config, faults={"deny_writes": [0, "EROFS", str(work)]}, cwd=work)
    assert code == 2 and "Traceback" not in out + err
    assert err == ("error: cannot create folder .cache/synthetic: Read-only file system\n"), err


# --- several processes (DDP, gloo on CPU) ------------------------------------------------------
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


class DdpRun(Run):
    """A 2-process training under torchrun (``launcher="torchrun"``) or the project's own launcher
    (``"own"``: ``-d 0,1`` with CPU processes), every process under the fault driver."""

    def __init__(self, tmp: Path, argv: list, faults: dict | None = None, launcher: str = "torchrun"):
        self.markers = tmp / f"markers-{time.monotonic_ns()}"
        self.markers.mkdir()
        faults = {**(faults or {}), **({"cpu_ranks": True} if launcher == "own" else {})}
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "JOEM_FAULTS": json.dumps(faults), "JOEM_FAULT_MARKERS": str(self.markers)}
        prefix = TORCHRUN if launcher == "torchrun" else [sys.executable]
        device = ["-d", "cpu"] if launcher == "torchrun" else ["-d", "0,1"]
        self.proc = subprocess.Popen([*prefix, str(DRIVER), *map(str, argv), *device], cwd=tmp, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pid(self, rank: int) -> int:
        self.wait_for(f"paused-rank{rank}")
        return int((self.markers / f"paused-rank{rank}").read_text())

    def rank_exits(self) -> list[int | None]:
        """Each rank's exit status as its driver recorded it (torchrun does not report them)."""
        return [int(path.read_text()) if path.is_file() else None
                for path in (self.markers / f"exit-rank{rank}" for rank in range(2))]


def assert_same_state(a: Path, b: Path) -> None:
    """Every tensor of both encoders and both optimizers, the LR schedule and the scaler of two
    final checkpoints are equal."""
    first, second = (torch.load(run / "checkpoint-epoch2.pth", weights_only=True) for run in (a, b))
    for part in ("visual_encoder", "semantic_encoder"):
        assert first[part].keys() == second[part].keys()
        different = [key for key in first[part] if not torch.equal(first[part][key], second[part][key])]
        assert not different, (part, len(different), different[:3])
    for part in ("optimizer", "optimizer_gen"):
        assert first[part]["param_groups"] == second[part]["param_groups"]
        for index, state in first[part]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, second[part]["state"][index][key]), (part, index, key)
    for key in ("lr_scheduler", "scaler", "global_step", "monitor_best"):
        assert first[key] == second[key], key
    assert read_metrics(a) == read_metrics(b)


DDP = FAST


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """The tiny config and an uninterrupted 2-process torchrun run of it (the reference)."""
    tmp = tmp_path_factory.mktemp("ddp")
    config = write_tiny_config(tmp, tmp / "cache", **DDP)
    code, out, err = DdpRun(tmp, ["-c", config, "--run_id", "straight"]).finish()
    assert code == 0, err[-3000:]
    return tmp, config, tmp / "saved" / "tiny"


def stop_ddp(ddp, name: str, faults: dict, target, launcher: str = "torchrun") -> tuple[Path, int, str, str]:
    """Start a 2-process run, send SIGTERM to ``target`` ("launcher" or a rank) at the pause;
    returns the run folder, the launcher's status and output."""
    tmp, config, runs = ddp
    run = DdpRun(tmp, ["-c", config, "--run_id", name], faults, launcher)
    pid = run.proc.pid if target == "launcher" else run.pid(target)
    run.wait_for()
    os.kill(pid, signal.SIGTERM)
    code, out, err = run.finish()
    folder = runs / name
    assert run.rank_exits() == [143, 143] or launcher == "own", (run.rank_exits(), err[-3000:])
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
    assert (folder / "checkpoint-interrupted.pth").is_file() and not list(folder.glob(".*.tmp"))
    return folder, code, out, err


def resume_ddp(ddp, folder: Path) -> None:
    tmp, config, runs = ddp
    code, out, err = DdpRun(tmp, ["-r", folder]).finish()
    assert code == 0, err[-3000:]
    assert not (folder / "checkpoint-interrupted.pth").exists()    # superseded by the newer checkpoints
    assert_same_state(runs / "straight", folder)


@pytest.mark.slow
def test_ddp_sigterm_to_torchrun_mid_epoch_resumes_exactly(ddp):
    tmp, config, runs = ddp
    folder, code, out, err = stop_ddp(ddp, "launcher", {"pause_after_step": 6}, "launcher")   # epoch 2, step 2/4
    assert code == 1 and "SignalException" in err   # torchrun's own status (docs/reliability.md: check run.json)
    stopped = [line for line in (out + err).splitlines() if "stopped at" in line]
    assert stopped == [f"stopped at epoch 2, step 2/4: saved {folder / 'checkpoint-interrupted.pth'}; "
                       f"resume with -r {folder}"], out + err
    copy = runs / "launcher-1proc"   # the same checkpoint, resumed by one process below
    copy.mkdir()
    for path in folder.iterdir():
        if path.suffix in (".pth", ".json", ".jsonl"):
            (copy / path.name).write_bytes(path.read_bytes())
    resume_ddp(ddp, folder)
    code, out, err = run_to_end(tmp, "-r", copy)
    assert code == 0, err
    assert ("resuming with 1 process(es) a run saved with 2: it continues from sample 8 of epoch 2 (step 2), "
            "but is not bit-exact") in (copy / "train.log").read_text()
    assert "epoch 2/2" in (copy / "train.log").read_text()


@pytest.mark.slow
def test_ddp_sigterm_to_one_rank_during_validation_resumes_exactly(ddp):
    folder, code, out, err = stop_ddp(ddp, "rank1", {"pause_in_validation": 1}, 1)
    assert code == 1 and "exitcode  : 143" in err, err[-3000:]   # torchrun reports the ranks' 143
    assert "stopped at epoch 1's validation (it reruns on resume)" in out + err
    assert "Traceback" not in out
    resume_ddp(ddp, folder)


@pytest.mark.slow
def test_own_launcher_exits_143_whichever_process_gets_the_signal(ddp):
    for name, target in (("own-launcher", "launcher"), ("own-rank0", 0)):
        folder, code, out, err = stop_ddp(ddp, name, {"pause_after_step": 6}, target, launcher="own")
        assert code == 143 and "Traceback" not in out + err, (code, err[-3000:])
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines[-1] == (f"stopped at epoch 2, step 2/4: saved {folder / 'checkpoint-interrupted.pth'}; "
                             f"resume with -r {folder}"), out[-2000:]
    resume_ddp(ddp, folder)
