"""Multi-seed runs end to end on the tiny synthetic config (2 seeds x 1 epoch, CPU), test-only
ablations over their checkpoints, and the argument checks."""
import contextlib
import io
import json
import shutil
import statistics

import pytest

from tests.tiny import read_metrics, write_tiny_config
from trainer import aggregate as agg
from trainer.multiseed import Job, Outcome, Runner, device_slots, main, metrics_path, train_jobs
from trainer.multiseed import test_jobs as evaluation_jobs


def _main(*argv):
    """Run ``trainer.multiseed.main``; returns (exit status, stdout lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*map(str, argv), "-d", "cpu"])
    return code, out.getvalue().splitlines()


def _headline(run_dir):
    """The test record that carries the sweep's AUSUC, read straight from metrics.jsonl."""
    return next(r for r in read_metrics(run_dir) if r["split"] == "test" and "ausuc" in r)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_seed():
    """The seeds' subprocesses use one thread each: no spinning against other jobs on a small machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiseed")
    config = write_tiny_config(tmp, tmp / "cache", trainer__epochs=1, trainer__test_after_train=True,
                               data__synthetic__num_train=12)
    code, lines = _main("-c", config, "--seeds", "1,2", "--group", "grp", "--sweep", "0.1:10:5")
    return tmp, code, lines, tmp / "saved" / "tiny" / "grp"


def _check_aggregate(folder, run_dirs):
    doc = json.loads((folder / "aggregate.json").read_text())
    assert doc["n"] == 2 and doc["seeds"] == [1, 2] and doc["failed"] == [] and "ddof=1" in doc["std"]
    assert [row["run_dir"] for row in doc["rows"]] == [str(run) for run in run_dirs]
    for key in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic", "ausuc"):
        values = [_headline(run)[key] for run in run_dirs]
        assert doc["means"][key] == pytest.approx(statistics.fmean(values))
        assert doc["stds"][key] == pytest.approx(statistics.stdev(values))
    best = [json.loads((run / "sweep_test.json").read_text())["best"] for run in run_dirs]
    assert doc["means"]["best_mIoU_harmonic"] == pytest.approx(statistics.fmean(b["mIoU_harmonic"] for b in best))
    assert all(row["wall_s"] > 0 for row in doc["rows"])
    table = (folder / "aggregate.md").read_text()
    assert "| mean ± std |" in table and "ddof=1" in table
    return doc


@pytest.mark.slow   # seeds run as subprocesses
def test_training_group_folders_and_aggregate(group):
    _, code, lines, folder = group
    assert code == 0
    seeds = [folder / "seed1", folder / "seed2"]
    for run in seeds:
        assert {"config.json", "train.log", "metrics.jsonl", "model_best.pth", "sweep_test.json"} <= {
            p.name for p in run.iterdir()}
    assert [json.loads((run / "config.json").read_text())["seed"] for run in seeds] == [1, 2]
    assert (folder / "logs" / "seed1.log").read_text().rstrip().endswith(f"metrics: {seeds[0] / 'metrics.jsonl'}")
    doc = _check_aggregate(folder, seeds)
    assert doc["mode"] == "train" and doc["command"][-2:] == ["-d", "cpu"]
    assert lines[-1] == f"aggregate: {folder / 'aggregate.json'}"
    assert "| mean ± std |" in "\n".join(lines)


@pytest.mark.slow   # seeds run as subprocesses
def test_test_only_ablation_over_the_group(group):
    tmp, _, _, folder = group
    code, lines = _main("--from", folder, "--test", "--name", "all", "--calibration", "all", "--sweep", "0.1:10:3")
    assert code == 0
    runs = [folder / "all" / f"test_seed{s}" for s in (1, 2)]
    doc = _check_aggregate(folder / "all", runs)
    assert doc["mode"] == "test" and lines[-1] == f"aggregate: {folder / 'all' / 'aggregate.json'}"
    assert [json.loads((run / "config.json").read_text())["inference"]["calibration"] for run in runs] == ["all"] * 2
    out = tmp / "compare.md"
    with contextlib.redirect_stdout(io.StringIO()):
        assert agg.main(["compare", str(folder / "aggregate.json"), str(folder / "all" / "aggregate.json"),
                         "--labels", "top2,all", "--out", str(out)]) == 0
    assert "| metric | top2 (n=2) | all (n=2) | all − top2 |" in out.read_text()


@pytest.mark.slow   # seeds run as subprocesses
def test_a_failed_seed_is_reported_and_left_out(group, capsys):
    tmp, _, _, folder = group
    broken = tmp / "broken"
    (broken / "seed9").mkdir(parents=True)
    shutil.copytree(folder / "seed1", broken / "seed1")
    (broken / "seed9" / "model_best.pth").write_bytes(b"not a checkpoint")
    code, lines = _main("--from", broken, "--test", "--name", "t")
    assert code == 1
    doc = json.loads((broken / "t" / "aggregate.json").read_text())
    assert doc["n"] == 1 and doc["seeds"] == [1] and doc["stds"]["mIoU_seen"] is None
    assert doc["failed"][0]["seed"] == 9 and doc["failed"][0]["exit_code"] != 0
    assert "1 of 2 seeds" in doc["note"] and "seed 9 (exit" in (broken / "t" / "aggregate.md").read_text()
    assert "seed 9 failed: exit" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1,x"], "--seeds expects integers"),
    (["--seeds", "1,1"], "distinct"),
    ([], "--seeds is required"),
    (["--seeds", "1", "--seed", "4"], "--seed is set for every seed"),
    (["--seeds", "1", "--run_id=x"], "--run_id is set for every seed"),
    (["--seeds", "1", "--test"], "add --from"),
    (["--seeds", "1", "--group", "../up"], "--group"),
    (["--from", "MISSING", "--test"], "not a folder"),
    (["--from", "TMP"], "add --test"),
    (["--from", "TMP", "--test"], "no seed*/model_best.pth nor any other seed*/*.pth checkpoint"),
    (["--from", "TMP", "--test", "-r", "x.pth"], "-r is set for every seed"),
])
def test_argument_errors(tmp_path, capsys, argv, message):
    config = tmp_path / "c.json"
    config.write_text("{}")
    argv = [{"MISSING": str(tmp_path / "missing"), "TMP": str(tmp_path)}.get(a, a) for a in argv]
    if "--from" not in argv:
        argv = ["-c", str(config), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_no_config_is_an_error_unless_a_default_is_given(capsys):
    assert main(["--seeds", "1"]) == 2
    assert "no config given" in capsys.readouterr().err


def test_train_jobs_command_line():
    jobs = train_jobs([1, 5], "g/h", ["-c", "c.json", "--epochs", "1"])
    assert [job.argv for job in jobs] == [["-c", "c.json", "--epochs", "1", "--seed", "1", "--run_id", "g/h/seed1"],
                                          ["-c", "c.json", "--epochs", "1", "--seed", "5", "--run_id", "g/h/seed5"]]


def test_device_slots():
    assert device_slots(None) == [None] and device_slots("cpu") == ["cpu"] and device_slots("1") == ["1"]
    assert device_slots("0,1,2") == ["0", "1", "2"]
    with pytest.raises(ValueError):
        device_slots("0,0")


def test_several_gpus_run_one_seed_per_gpu_at_a_time():
    class FakeRunner(Runner):
        def run_job(self, job, device):
            return Outcome(job, ["-d", device], 0, 0.0, [f"metrics: {job.label}/metrics.jsonl"])

    jobs = [Job(seed, f"seed{seed}", []) for seed in (1, 2, 3)]
    outcomes = FakeRunner().run_all(jobs, ["0", "1"])
    assert [o.job.seed for o in outcomes] == [1, 2, 3]
    assert {o.command[-1] for o in outcomes} <= {"0", "1"}
    assert [str(o.metrics) for o in outcomes] == ["seed1/metrics.jsonl", "seed2/metrics.jsonl", "seed3/metrics.jsonl"]


def test_metrics_path_is_the_last_metrics_line():
    assert metrics_path(["metrics: a/metrics.jsonl", "x", "metrics: b/metrics.jsonl", "done"]).as_posix() == \
        "b/metrics.jsonl"
    assert metrics_path(["nothing here"]) is None


@pytest.mark.slow   # seeds run as subprocesses
def test_all_seeds_failing_returns_their_exit_code(tmp_path, capsys):
    config = write_tiny_config(tmp_path, tmp_path / "cache")
    code, lines = _main("-c", config, "--seeds", "3", "--group", "bad", "--epochs", "x")
    assert code == 2 and any(line.startswith("[seed3] ") and "--epochs" in line for line in lines)
    assert "error: all 1 seed(s) failed" in capsys.readouterr().err
    assert not (tmp_path / "saved" / "tiny" / "bad").exists()   # the group folder it locked is removed


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
    (ok, out, _), (refused, refused_out, err) = results
    assert ok == 0 and refused == 2, results
    assert err.count("\n") == 1 and err.startswith(f"error: {folder}: group folder in use by pid ")
    assert "[seed" not in refused_out   # it trained nothing
    doc = json.loads((folder / "aggregate.json").read_text())
    assert doc["n"] == 2 and doc["seeds"] == [1, 2] and doc["failed"] == [] and doc["note"] == "n = 2 seeds"
    assert not (folder / "group.lock").exists()
    # the aggregate is what is on disk: recomputed from the seed folders alone
    for name in ("aggregate.json", "aggregate.md"):
        (folder / name).unlink()
    (folder / "seed3").mkdir()
    (folder / "seed3" / "run.json").write_text(json.dumps({"status": "interrupted"}))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert agg.main([str(folder)]) == 0
    again = json.loads((folder / "aggregate.json").read_text())
    assert again["seeds"] == [1, 2] and again["n"] == 2 and again["means"]["mIoU_harmonic"] == doc["means"]["mIoU_harmonic"]
    assert again["failed"] == [{"seed": 3, "exit_code": None, "reason": "run.json status interrupted"}]
    assert out.getvalue().rstrip().endswith(f"aggregate: {folder / 'aggregate.json'}")


def test_test_jobs_use_the_best_checkpoint_else_the_newest_and_say_which(tmp_path, capsys):
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "checkpoint-epoch2.pth").write_bytes(b"")
    (tmp_path / "seed1" / "model_best.pth").write_bytes(b"")
    (tmp_path / "seed2").mkdir()
    (tmp_path / "seed2" / "checkpoint-epoch20.pth").write_bytes(b"")   # monitor: off, no best kept
    (tmp_path / "seed3").mkdir()                                        # nothing to evaluate: left out
    jobs = evaluation_jobs(tmp_path, "again", None, ["--calibration", "all"])
    assert [job.argv[:3] for job in jobs] == [["-r", str(tmp_path / "seed1" / "model_best.pth"), "--test"],
                                              ["-r", str(tmp_path / "seed2" / "checkpoint-epoch20.pth"), "--test"]]
    err = capsys.readouterr().err
    assert f"seed 2: {tmp_path / 'seed2' / 'checkpoint-epoch20.pth'} (the run's newest checkpoint: it has no " \
           "model_best.pth)" in err and "seed 1:" in err and "(the run's best checkpoint)" in err
