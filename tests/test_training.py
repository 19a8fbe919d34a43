"""End-to-end command-line runs on tiny synthetic data (CPU)."""
import json
import pickle
import re

import pytest
import torch

from tests.tiny import read_metrics, write_tiny_config
from trainer.cli import main


class Payload:
    """An arbitrary object: a pickle holding it is not a weights-only checkpoint."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic_cache")


def _run(*argv):
    return main(default_config=None, argv=[*map(str, argv), "-d", "cpu"])


@pytest.fixture(scope="module")
def trained(trained_tiny):
    return trained_tiny.tmp, trained_tiny.run_dir


def test_training_writes_run_directory_and_loss_decreases(trained):
    _, run = trained
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "train.log", "metrics.jsonl", "model_best.pth", "checkpoint-epoch1.pth",
            "checkpoint-epoch3.pth", "tensorboard"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    log = (run / "train.log").read_text()
    losses = [float(x) for x in re.findall(r"epoch \d+/3  loss ([0-9.]+)", log)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "unseen: red checker, green vstripe" in log and "effective batch size: 4" in log
    assert "model selection: 6 images carved from 'train' (seed 0; not trained on) by max mIoU_harmonic; " \
           "reported split: 'val'" in log
    assert len((run / "selection.txt").read_text().split()) == 6
    assert json.loads((run / "config.json").read_text())["resolved"]["protocol"]["reported"] == "val"
    records = read_metrics(run)
    assert [r["split"] for r in records] == ["selection", "selection", "selection", "test"]
    last = records[-1]
    for key in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic", "pixel_acc_overall", "class_acc_seen"):
        assert 0.0 <= last[key] <= 100.0
    assert last["sigma"] == 0.5 and len(last["iou_by_class"]) == 10
    checkpoint = torch.load(run / "model_best.pth", weights_only=True)
    assert {"visual_encoder", "semantic_encoder", "optimizer", "optimizer_gen", "lr_scheduler", "epoch",
            "monitor_best", "config", "class_split", "rng"} <= set(checkpoint)
    assert checkpoint["class_split"]["unseen"] == [3, 5]


def test_test_mode_reproduces_final_evaluation(trained, capsys):
    tmp, run = trained
    assert _run("-r", run / "model_best.pth", "--test", "--run_id", "t1") == 0
    out = capsys.readouterr().out.strip().splitlines()
    test_run = tmp / "saved" / "tiny" / "test_t1"
    assert out[-1] == f"metrics: {test_run / 'metrics.jsonl'}"
    assert read_metrics(test_run)[0] == read_metrics(run)[-1]


def test_resume_equals_straight_training(tmp_path, cache):
    config = write_tiny_config(tmp_path, cache)
    assert _run("-c", config, "--run_id", "straight") == 0
    runs = tmp_path / "saved" / "tiny"
    assert _run("-r", runs / "straight" / "checkpoint-epoch1.pth", "--run_id", "resumed") == 0
    a = torch.load(runs / "straight" / "checkpoint-epoch2.pth", weights_only=True)
    b = torch.load(runs / "resumed" / "checkpoint-epoch2.pth", weights_only=True)
    assert b["epoch"] == 2 and not (runs / "resumed" / "checkpoint-epoch1.pth").exists()
    for part in ("visual_encoder", "semantic_encoder"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    straight, resumed = read_metrics(runs / "straight"), read_metrics(runs / "resumed")
    assert resumed[0]["epoch"] == 2 and resumed[0]["split"] == "selection"
    # the final test evaluates the best checkpoint, also when it was saved by the resumed run
    assert straight[1] == resumed[0] and straight[-1] == resumed[-1]


def test_resume_with_more_epochs_rebases_the_poly_schedule(tmp_path, cache):
    config = write_tiny_config(tmp_path, cache, trainer__epochs=1, trainer__test_after_train=False)
    assert _run("-c", config, "--run_id", "one") == 0
    runs = tmp_path / "saved" / "tiny"
    assert _run("-r", runs / "one" / "checkpoint-epoch1.pth", "--epochs", "2", "--run_id", "more") == 0
    checkpoint = torch.load(runs / "more" / "checkpoint-epoch2.pth", weights_only=True)
    assert checkpoint["epoch"] == 2
    # epoch 2 of 2 ran at 1e-3 * (1 - 1/2) ** 0.9, not at the exhausted 1-epoch schedule's 0
    assert "lr backbone=0.000536" in (runs / "more" / "train.log").read_text()


def test_bad_checkpoints_give_clear_errors(trained, tmp_path, capsys):
    tmp, run = trained
    good = run / "model_best.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert _run("-r", truncated, "--test") == 2
    assert "corrupted or truncated checkpoint" in capsys.readouterr().err
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"config": Payload()}))
    assert _run("-r", evil, "--test") == 2
    assert "refused: not a weights-only checkpoint" in capsys.readouterr().err

    other_split = write_tiny_config(tmp_path, tmp / "unused", data__unseen_classes=["blue solid"])
    before = good.read_bytes()
    assert _run("-r", good, "-c", other_split, "--test") == 2
    err = capsys.readouterr().err
    assert "trained with unseen classes ['red checker', 'green vstripe']" in err and "['blue solid']" in err
    assert good.read_bytes() == before
    other_arch = write_tiny_config(tmp_path, tmp / "unused", model__args__backbone=34)
    assert _run("-r", good, "-c", other_arch, "--test") == 2
    assert "model.backbone is 18 in the checkpoint, 34 in the config" in capsys.readouterr().err
    assert _run("-r", tmp_path / "missing.pth", "--test") == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_sigma_sweep_in_one_pass_writes_table_plot_and_ausuc(trained, capsys):
    tmp, run = trained
    assert _run("-r", run / "model_best.pth", "--test", "--sigma", "0.3,0.5,1.0", "--run_id", "sweep") == 0
    out = capsys.readouterr().out
    sweep_run = tmp / "saved" / "tiny" / "test_sweep"
    summary = json.loads((sweep_run / "sweep_test.json").read_text())
    assert [row["sigma"] for row in summary["rows"]] == [0.3, 0.5, 1.0]
    assert 0.0 <= summary["ausuc"] <= 1.0 and "AUSUC" in out
    assert summary["best"]["mIoU_harmonic"] == max(r["mIoU_harmonic"] for r in summary["rows"])
    assert summary["ends"]["seen_only"]["mIoU_unseen"] == 0.0
    assert summary["ends"]["unseen_only"]["mIoU_seen"] == 0.0
    assert (sweep_run / "sweep_test.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep_run / "sweep_test.csv").read_text().splitlines()[0] == "sigma,mIoU_seen,mIoU_unseen,mIoU_harmonic"
    single = read_metrics(run)[-1]  # the sigma-0.5 evaluation of the same checkpoint
    row = next(r for r in summary["rows"] if r["sigma"] == 0.5)
    assert row["mIoU_harmonic"] == single["mIoU_harmonic"] and row["mIoU_unseen"] == single["mIoU_unseen"]
    records = read_metrics(sweep_run)
    assert len(records) == 3 and sum("ausuc" in r for r in records) == 1
    # the reported split never picks its own sweep's best: the checkpoint chose no sigma, so the first listed
    headline = next(r for r in records if "ausuc" in r)
    assert headline["sigma"] == 0.3 and "best_sigma" not in headline


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache, monkeypatch, capsys):
    import trainer.step as step_module
    real_loss, calls = step_module.joem_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        losses = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 8:  # epoch 2 (epoch 1 has 7 steps)
            losses["ce"] = losses["ce"] * float("nan")
            losses["total"] = losses["total"] + losses["ce"]
        return losses
    monkeypatch.setattr(step_module, "joem_loss", poisoned)
    config = write_tiny_config(tmp_path, cache, trainer__epochs=3)
    assert _run("-c", config, "--run_id", "nan") == 3
    run = tmp_path / "saved" / "tiny" / "nan"
    log = (run / "train.log").read_text()
    assert "loss (ce=nan" in log and "is not finite at epoch 2 (step 9 of the run)" in log
    assert f"the last good checkpoint is {run}" in log
    assert sorted(p.name for p in run.glob("*.pth")) == ["checkpoint-epoch1.pth", "model_best.pth"]
    assert torch.load(run / "checkpoint-epoch1.pth", weights_only=True)["epoch"] == 1


def test_figure_of_predictions(trained, tmp_path):
    from PIL import Image

    from trainer.figures import main as figures_main
    _, run = trained
    out = tmp_path / "fig.png"
    assert figures_main(["-r", str(run / "model_best.pth"), "--count", "2", "--out", str(out)]) == 0
    width, height = Image.open(out).size
    assert width > 500 and height > 300


def test_the_official_protocol_tests_the_final_weights_without_selection(tmp_path, cache, capsys):
    """No selection split, ``monitor: off`` (the paper configs): nothing is evaluated during
    training, the final weights are saved whatever save_period says, tested once, and ``-r RUN
    --test`` evaluates them again."""
    config = write_tiny_config(tmp_path, cache, trainer__epochs=3, trainer__save_period=2, trainer__monitor="off",
                               data__selection_split=None)
    assert _run("-c", config, "--run_id", "off") == 0
    run = tmp_path / "saved" / "tiny" / "off"
    assert sorted(p.name for p in run.glob("*.pth")) == ["checkpoint-epoch2.pth", "checkpoint-epoch3.pth"]
    assert [(r["split"], r["epoch"]) for r in read_metrics(run)] == [("test", 3)]
    out = capsys.readouterr().out
    assert "model selection: none (the final weights are tested); reported split: 'val'" in out
    assert "final test with the weights of epoch 3 (no checkpoint selection)" in out
    assert _run("-r", run, "--test", "--run_id", "again") == 0
    out = capsys.readouterr()
    assert f"evaluating {run / 'checkpoint-epoch3.pth'} (the run's final weights (epoch 3))" in out.out + out.err
    assert read_metrics(tmp_path / "saved" / "tiny" / "test_again")[-1] == read_metrics(run)[-1]


def test_a_run_chose_its_checkpoint_on_its_own_selection_split(trained, capsys):
    tmp, run = trained
    assert _run("-r", run, "--test", "--run_id", "again") == 0
    out = capsys.readouterr()
    assert f"evaluating {run / 'model_best.pth'} (the run's checkpoint chosen on its selection split)" \
        in out.out + out.err


@pytest.mark.parametrize("override,message", [
    ({"trainer__monitor": "max mIoU_harmonic", "data__selection_split": None},
     "trainer.monitor: 'max mIoU_harmonic' chooses a checkpoint, which needs data.selection_split"),
    ({"data__selection_split": "val"}, "data.selection_split: 'val' is the reported split (data.val_split)"),
    ({"data__selection_split": "ImageSets/Segmentation/val.txt"},
     "data.selection_split: 'ImageSets/Segmentation/val.txt' lists the same images as the reported split 'val'"),
    ({"data__selection_split": {"holdout": 0}}, "data.selection_split: expected {\"holdout\": N, \"seed\": S}"),
    ({"data__selection_split": {"holdout": 40}}, "data.selection_split: holdout 40 leaves no training image of 40"),
])
def test_selection_never_uses_the_reported_split(tmp_path, cache, capsys, override, message):
    config = write_tiny_config(tmp_path, cache, **override)
    assert _run("-c", config, "--run_id", "bad") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "saved" / "tiny" / "bad").exists()


def test_a_hand_edited_config_json_is_not_applied_silently_on_resume(tmp_path, cache, capsys):
    """``-r RUN_DIR`` continues with the checkpoint's config; a config.json edited by hand is named
    in a warning (and kept as config.previous-1.json) instead of being replaced without a word."""
    config = write_tiny_config(tmp_path, cache, trainer__epochs=2, trainer__test_after_train=False)
    assert _run("-c", config, "--run_id", "edited", "--epochs", "1") == 0
    run = tmp_path / "saved" / "tiny" / "edited"
    (run / "run.json").write_text(json.dumps({"status": "interrupted"}))   # as a preempted job leaves it
    recorded = json.loads((run / "config.json").read_text())
    recorded["loss"]["alpha"] = 0.5
    (run / "config.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    assert _run("-r", run, "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert (f"{run / 'config.json'} differs from the checkpoint's config (loss.alpha): the run continues with the "
            f"checkpoint's config; to apply the edit, pass it: -r {run} -c {run / 'config.json'}") in out
    assert json.loads((run / "config.previous-1.json").read_text())["loss"]["alpha"] == 0.5
    assert json.loads((run / "config.json").read_text())["loss"]["alpha"] == 0.1


def test_the_process_group_is_destroyed_after_the_model_that_uses_it(tmp_path, monkeypatch):
    """A DistributedDataParallel left in a reference cycle is freed before the group goes (left to
    interpreter exit, gloo aborted 2 of 52 two-process runs)."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from utils import distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    gc.disable()   # only an explicit collection frees the cycle
    try:
        model = DistributedDataParallel(torch.nn.Linear(2, 2))
        cycle: list = [model]
        cycle.append(cycle)
        alive = weakref.ref(model)
        del model, cycle
        freed, destroy = [], dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group", lambda: (freed.append(alive() is None), destroy()))
        distributed.cleanup()
    finally:
        gc.enable()
    assert freed == [True] and not dist.is_initialized()
