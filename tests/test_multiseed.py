"""Multi-seed runs on the tiny synthetic config (2 seeds x 1 epoch, CPU, in this process), test-only
evaluations of their checkpoints, failures, signals, the group lock and the argument checks."""
import contextlib
import io
import json
import shutil
import signal
import statistics

import pytest

from tests.tiny import read_metrics, write_tiny_config
from trainer import aggregate as agg
from trainer import session
from trainer.multiseed import build_parser, device_queues, main, run_queues
from utils.checkpoint import run_checkpoint
from utils.errors import Interrupted
from utils.run_dir import GROUP_LOCK_NAME, RunLock, read_status


def _main(*argv, default_config=None):
    """Run ``trainer.multiseed.main`` on CPU; returns (exit status, stdout lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*map(str, argv), "-d", "cpu"], default_config)
    return code, out.getvalue().splitlines()


def _headline(run_dir):
    """The test record that carries the sweep's AUSUC, read straight from metrics.jsonl."""
    return next(r for r in read_metrics(run_dir) if r["split"] == "test" and "ausuc" in r)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiseed")
    config = write_tiny_config(tmp, tmp / "cache", trainer__epochs=1, trainer__test_after_train=True,
                               data__synthetic__num_train=12)
    code, lines = _main("-c", config, "--seeds", "1,2", "--group", "grp", "--sweep", "0.1:10:3")
    return tmp, code, lines, tmp / "saved" / "tiny" / "grp"


@pytest.fixture
def fake_runs(monkeypatch):
    """Each seed's run (``trainer.session.launch``, what ``trainer.cli.main`` runs) replaced: records
    (default_config, argv); per seed: an exit code or an exception."""
    calls, results = [], {}

    def fake(default_config, argv):
        calls.append((default_config, argv))
        result = results.get(int(argv[argv.index("--seed") + 1]), 0)
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(session, "launch", fake)
    return calls, results


def _check_aggregate(folder, run_dirs):
    doc = json.loads((folder / "aggregate.json").read_text())
    assert doc["n"] == 2 and doc["seeds"] == [1, 2] and doc["failed"] == [] and "ddof=1" in doc["std"]
    assert [row["run_dir"] for row in doc["rows"]] == [str(run) for run in run_dirs]
    for key in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic", "ausuc"):
        values = [_headline(run)[key] for run in run_dirs]
        assert doc["means"][key] == pytest.approx(statistics.fmean(values))
        assert doc["stds"][key] == pytest.approx(statistics.stdev(values))
    assert not any(key.startswith("best") for key in doc["means"])   # chosen on the reported split: no result
    assert all(row["wall_s"] > 0 for row in doc["rows"])
    assert "| mean ± std |" in (folder / "aggregate.md").read_text()
    return doc


def test_each_seed_is_a_run_of_this_process_and_the_group_is_aggregated(group):
    _, code, lines, folder = group
    assert code == 0
    seeds = [folder / "seed1", folder / "seed2"]
    for run in seeds:
        assert {"config.json", "train.log", "metrics.jsonl", "model_best.pth", "sweep_test.json"} <= {
            p.name for p in run.iterdir()}
    assert [json.loads((run / "config.json").read_text())["seed"] for run in seeds] == [1, 2]
    assert sorted(p.name for p in folder.iterdir()) == ["aggregate.json", "aggregate.md", "seed1", "seed2"]
    assert any(line.startswith("seed 2: trainer.cli -c ") and line.endswith("--seed 2 --run_id grp/seed2 -d cpu")
               for line in lines)
    doc = _check_aggregate(folder, seeds)
    assert doc["mode"] == "train" and doc["command"][-2:] == ["-d", "cpu"]
    assert lines[-1] == f"aggregate: {folder / 'aggregate.json'}" and "| mean ± std |" in "\n".join(lines)


def test_test_mode_evaluates_each_seeds_run_checkpoint_and_says_which(group, capsys):
    tmp, _, _, folder = group
    capsys.readouterr()
    code, lines = _main("--from", folder, "--test", "--name", "all", "--calibration", "all", "--sweep", "0.1:10:3")
    assert code == 0
    err = capsys.readouterr().err
    for seed in (1, 2):
        path, note = run_checkpoint(folder / f"seed{seed}")
        assert path == folder / f"seed{seed}" / "model_best.pth"   # chosen on the tiny config's selection split
        assert f"seed {seed}: {path} ({note})" in err and "selection split" in note
    runs = [folder / "all" / f"test_seed{s}" for s in (1, 2)]
    doc = _check_aggregate(folder / "all", runs)
    assert doc["mode"] == "test" and lines[-1] == f"aggregate: {folder / 'all' / 'aggregate.json'}"
    assert [json.loads((run / "config.json").read_text())["inference"]["calibration"] for run in runs] == ["all"] * 2
    out = tmp / "compare.md"
    with contextlib.redirect_stdout(io.StringIO()):
        assert agg.main(["compare", str(folder / "aggregate.json"), str(folder / "all" / "aggregate.json"),
                         "--labels", "top2,all", "--out", str(out)]) == 0
    train, test = (json.loads((f / "aggregate.json").read_text()) for f in (folder, folder / "all"))
    difference = test["means"]["mIoU_seen"] - train["means"]["mIoU_seen"]
    assert "| metric | top2 (n=2) | all (n=2) | all − top2 |" in out.read_text()
    assert f"| {format(difference, '+.2f')} |" in next(line for line in out.read_text().splitlines()
                                                       if line.startswith("| seen |"))


def test_a_failed_seed_is_left_out_and_the_others_go_on(group, capsys):
    tmp, _, _, folder = group
    broken = tmp / "broken"
    shutil.copytree(folder / "seed1", broken / "seed1")
    (broken / "seed9").mkdir()
    (broken / "seed9" / "checkpoint-epoch3.pth").write_bytes(b"not a checkpoint")   # no config: final weights
    capsys.readouterr()
    code, _ = _main("--from", broken, "--test", "--name", "t", "--seeds", "9,1")
    assert code == 1
    err = capsys.readouterr().err
    assert f"seed 9: {broken / 'seed9' / 'checkpoint-epoch3.pth'} (the run's final weights (epoch 3))" in err
    assert "seed 9 failed: exit 2" in err
    doc = json.loads((broken / "t" / "aggregate.json").read_text())
    assert doc["n"] == 1 and doc["seeds"] == [1] and doc["stds"]["mIoU_seen"] is None
    assert doc["failed"] == [{"seed": 9, "exit_code": 2}]
    assert "1 of 2 seeds" in doc["note"] and "seed 9 (exit 2)" in (broken / "t" / "aggregate.md").read_text()


def test_all_seeds_failing_exit_with_their_common_code(tmp_path, capsys):
    for seed in (1, 2):
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "checkpoint-epoch1.pth").write_bytes(b"garbage")
    code, _ = _main("--from", tmp_path, "--test", "--name", "t", "--seeds", "1,2")
    assert code == 2
    assert "no aggregate written" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()   # the folder it created and locked is removed


def test_an_unexpected_exception_is_one_line_and_the_other_seeds_go_on(tmp_path, fake_runs, capsys):
    calls, results = fake_runs
    config = str(write_tiny_config(tmp_path, tmp_path / "cache"))
    results[1] = RuntimeError("boom\nsecond line")
    code, _ = _main("--seeds", "1,2", "--group", "g", "--epochs", "1", default_config=config)
    assert code == 1   # seed 2 "succeeded" but wrote no run folder: nothing to aggregate
    assert calls == [(config, ["--epochs", "1", "--seed", str(seed), "--run_id", f"g/seed{seed}", "-d", "cpu"])
                     for seed in (1, 2)]
    assert "seed 1 failed: RuntimeError: boom\n" in capsys.readouterr().err


@pytest.mark.parametrize("result, status", [(130, 130), (Interrupted(signal.SIGTERM), 143), (KeyboardInterrupt(), 130)])
def test_a_signal_stops_the_group(tmp_path, fake_runs, capsys, result, status):
    calls, results = fake_runs
    results[1] = result
    code, _ = _main("-c", write_tiny_config(tmp_path, tmp_path / "cache"), "--seeds", "1,2", "--group", "g")
    assert code == status and len(calls) == 1   # seed 2 never started
    assert not (tmp_path / "saved" / "tiny" / "g" / "aggregate.json").exists()


def test_a_locked_group_or_a_taken_seed_folder_is_refused_before_anything_runs(tmp_path, fake_runs, capsys):
    calls, _ = fake_runs
    config = write_tiny_config(tmp_path, tmp_path / "cache")
    folder = tmp_path / "saved" / "tiny" / "g"
    lock = RunLock(folder, GROUP_LOCK_NAME, "group folder", "--group")
    lock.acquire()
    try:
        assert _main("-c", config, "--seeds", "1,2", "--group", "g")[0] == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}: group folder in use by pid ") and err.count("\n") == 1
    (folder / "seed2").mkdir()
    assert _main("-c", config, "--seeds", "1,2", "--group", "g")[0] == 2
    assert capsys.readouterr().err == f"error: {folder}: seed(s) 2 have a run folder here; choose another --group\n"
    assert calls == [] and not (folder / GROUP_LOCK_NAME).exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1,-2"], "--seeds expects distinct integers >= 0 like 1,2,3, got '1,-2'"),
    (["--seeds", "1,x"], "--seeds expects distinct integers"),
    (["--seeds", "1,1"], "--seeds expects distinct integers"),
    ([], "--seeds is required"),
    (["--seeds", "1", "-r", "x.pth"], "-r/--resume: python -m trainer.multiseed sets every seed's"),
    (["--seeds", "1", "--seed", "4"], "--seed: python -m trainer.multiseed sets"),
    (["--seeds", "1", "--run_id=x"], "--run_id: python -m trainer.multiseed sets"),
    (["--seeds", "1", "--epochs", "x"], "argument --epochs: invalid int value"),
    (["--seeds", "1", "-o", "trainer.epochs=0"], "trainer.epochs: must be >= 1"),
    (["--seeds", "1", "--test"], "add --from"),
    (["--seeds", "1", "--group", "../up"], "--group: expected a folder name"),
    (["--seeds", "1", "--group", "/abs/g"], "--group: expected a folder name, not an absolute path"),
    (["--from", "MISSING", "--test"], "not a folder"),
    (["--from", "TMP"], "add --test"),
    (["--from", "TMP", "--test", "--group", "g"], "with --from use --name"),
    (["--from", "TMP", "--test"], "no seed folder (seedN) whose run.json says finished"),
    (["--from", "TMP", "--test", "--seeds", "5"], "no seed folder for seed(s) [5]"),
    (["--from", "TMP", "--test", "-r", "x.pth"], "-r/--resume"),
])
def test_argument_errors_are_one_line_before_any_seed_runs(tmp_path, fake_runs, capsys, argv, message):
    config = write_tiny_config(tmp_path, tmp_path / "cache")
    argv = [{"MISSING": str(tmp_path / "missing"), "TMP": str(tmp_path)}.get(a, a) for a in argv]
    assert _main(*([] if "--from" in argv else ["-c", config]), *argv)[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert fake_runs[0] == [] and not (tmp_path / "saved").exists()


def test_no_config_is_an_error(capsys):
    assert main(["--seeds", "1"]) == 2
    assert "no config given" in capsys.readouterr().err


def test_device_queues_one_seed_per_gpu_at_a_time():
    jobs = [(seed, f"seed{seed}", ["--seed", str(seed)]) for seed in (1, 2, 3)]
    assert device_queues(jobs, None) == [jobs]
    assert device_queues(jobs, "cpu") == [[(s, f, [*a, "-d", "cpu"]) for s, f, a in jobs]]
    queues = device_queues(jobs, "0,1")
    assert [[(s, a[-1]) for s, _, a in queue] for queue in queues] == [[(1, "0"), (3, "0")], [(2, "1")]]
    assert [[s for s, _, _ in queue] for queue in device_queues(jobs[:1], "0,1,2")] == [[1]]


def test_help_lists_its_options_and_every_runs():
    text = " ".join(build_parser().format_help().split())
    assert all(flag in text for flag in ("--seeds", "--group", "--from", "--name", "--test", "-d DEVICE"))
    epilog = text[text.index("Options of every run"):]
    assert all(flag in epilog for flag in ("--epochs", "--sweep", "--calibration", "-o")) and "--seeds" not in epilog


@pytest.mark.slow   # two worker processes
def test_worker_processes_run_their_queues(tmp_path):
    config = str(write_tiny_config(tmp_path, tmp_path / "cache", trainer__epochs=1, data__synthetic__num_train=12))
    folder = tmp_path / "saved" / "tiny" / "w"
    queues = [[(seed, folder / f"seed{seed}", ["-c", config, "--seed", str(seed), "--run_id", f"w/seed{seed}",
                                               "-d", "cpu", *extra])] for seed, extra in ((1, []), (2, ["--bs", "x"]))]
    with contextlib.redirect_stdout(io.StringIO()):
        outcomes = sorted(run_queues(queues, None), key=lambda outcome: outcome["seed"])
    assert [(o["seed"], o["exit_code"]) for o in outcomes] == [(1, 0), (2, 2)]
    assert agg.is_finished(folder / "seed1") and not (folder / "seed2").exists()


@pytest.mark.slow   # a real signal to a real command
def test_sigterm_stops_the_running_seed_at_a_safe_point_and_the_group(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path
    config = write_tiny_config(tmp_path, tmp_path / "cache", trainer__epochs=50, data__synthetic__num_train=12)
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "trainer.multiseed", "-c", str(config), "-d", "cpu", "--seeds", "1,2",
               "--group", "g"]
    proc = subprocess.Popen(command, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "saved" / "tiny" / "g"
    deadline = time.monotonic() + 120
    while not (folder / "seed1" / "checkpoint-epoch1.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert read_status(folder / "seed1")["status"] == "interrupted" and not (folder / "seed2").exists()
    assert "seed 2:" not in out and "no aggregate written" in err and not (folder / "aggregate.json").exists()


@pytest.mark.slow   # two real multi-seed commands at once
def test_two_groups_at_once_one_is_refused_and_the_aggregate_is_complete(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    config = write_tiny_config(tmp_path, tmp_path / "cache", trainer__epochs=1, data__synthetic__num_train=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    command = [sys.executable, str(root / "train_pascal_zs3setting.py"), "-c", str(config), "-d", "cpu",
               "--seeds", "1,2", "--group", "g"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = sorted((proc.wait(timeout=600), *proc.communicate()) for proc in procs)
    folder = tmp_path / "saved" / "tiny" / "g"
    (ok, _, _), (refused, refused_out, err) = results
    assert ok == 0 and refused == 2, results
    assert err.count("\n") == 1 and err.startswith(f"error: {folder}: group folder in use by pid ")
    assert refused_out == ""   # it trained nothing
    doc = json.loads((folder / "aggregate.json").read_text())
    assert doc["n"] == 2 and doc["seeds"] == [1, 2] and doc["failed"] == [] and doc["note"] == "n = 2 seeds"
    assert not (folder / "group.lock").exists()
    # the aggregate is what is on disk: recomputed from the seed folders alone
    for name in ("aggregate.json", "aggregate.md"):
        (folder / name).unlink()
    (folder / "seed3").mkdir()
    (folder / "seed3" / "run.json").write_text(json.dumps({"status": "interrupted"}))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert agg.main([str(folder)]) == 0
    again = json.loads((folder / "aggregate.json").read_text())
    assert again["seeds"] == [1, 2] and again["means"]["mIoU_harmonic"] == doc["means"]["mIoU_harmonic"]
    assert again["failed"] == [{"seed": 3, "exit_code": None, "reason": "run.json status interrupted"}]
    assert printed.getvalue().rstrip().endswith(f"aggregate: {folder / 'aggregate.json'}")
