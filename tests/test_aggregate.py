"""Multi-seed aggregates: per-run rows, mean ± sample std (ddof=1), n/a handling, comparisons."""
import json
import math

import pytest

from trainer.aggregate import (
    aggregate,
    aggregate_markdown,
    compare,
    compare_markdown,
    headline_test_record,
    main,
    mean_std,
    read_run,
    update_aggregate,
)
from utils.errors import ConfigError


def _record(split, sigma, seen, unseen, harmonic, **extra):
    return {"epoch": 1, "split": split, "sigma": sigma, "mIoU_seen": seen, "mIoU_unseen": unseen,
            "mIoU_harmonic": harmonic, "mIoU_overall": 1.0, "iou_by_class": {}, **extra}


def _run_dir(tmp_path, name, seed, records, sweep=None, sigma=0.5):
    run = tmp_path / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"name": "x", "seed": seed, "inference": {"sigma": sigma}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if sweep is not None:
        (run / "sweep_test.json").write_text(json.dumps(sweep))
    return run


def _row(seed, seen, unseen, harmonic, ausuc=None, wall=None):
    return {"seed": seed, "run_dir": f"r{seed}", "sigma": 0.5, "mIoU_seen": seen, "mIoU_unseen": unseen,
            "mIoU_harmonic": harmonic, "ausuc": ausuc, "wall_s": wall}


SWEEP = {"calibration": "top2", "rows": [], "ends": {}, "ausuc_curve": [], "ausuc": 0.4321,
         "best": {"sigma": 0.316228, "mIoU_seen": 70.0, "mIoU_unseen": 40.0, "mIoU_harmonic": 50.9091}}


def test_read_run_takes_headline_test_record_and_ausuc_not_the_sweeps_best(tmp_path):
    records = [_record("val", 0.5, 1, 2, 3, ausuc=0.1, best_sigma=0.1),
               _record("test", 0.5, 72.5, 35.0, 47.2, ausuc=0.4321, best_sigma=0.316228),
               _record("test", 0.316228, 70.0, 40.0, 50.9091), _record("test", 10.0, 80.0, 0.0, 0.0)]
    row = read_run(_run_dir(tmp_path, "run", 7, records, SWEEP), wall_s=12.5)
    assert row["seed"] == 7 and row["sigma"] == 0.5 and row["wall_s"] == 12.5
    assert (row["mIoU_seen"], row["mIoU_unseen"], row["mIoU_harmonic"]) == (72.5, 35.0, 47.2)
    assert row["ausuc"] == 0.4321
    assert not any(key.startswith("best") for key in row)   # chosen on the reported split: no result


def test_read_run_without_sweep_gives_none(tmp_path):
    records = [_record("val", 0.5, 1, 2, 3), _record("test", 0.5, 60.0, None, None)]
    row = read_run(_run_dir(tmp_path, "run", 3, records))
    assert row["mIoU_seen"] == 60.0 and row["mIoU_unseen"] is None and row["mIoU_harmonic"] is None
    assert row["ausuc"] is None and row["wall_s"] is None


def test_read_run_names_a_broken_metrics_line(tmp_path):
    run = _run_dir(tmp_path, "run", 1, [_record("test", 0.5, 1, 2, 3)])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "spl')
    with pytest.raises(ConfigError, match="metrics.jsonl: invalid JSON line"):
        read_run(run)


def test_headline_record_choice():
    val = _record("val", 0.5, 1, 1, 1, ausuc=0.9)
    at_sigma, other = _record("test", 0.5, 2, 2, 2), _record("test", 0.7, 3, 3, 3)
    with_ausuc = _record("test", 0.7, 4, 4, 4, ausuc=0.2)
    assert headline_test_record([val, other, at_sigma], 0.5) is at_sigma
    assert headline_test_record([val, at_sigma, with_ausuc], 0.5) is with_ausuc
    assert headline_test_record([val, other], None) is other  # the single test record
    assert headline_test_record([val], 0.5) is None


def test_mean_and_sample_std_by_hand():
    # seen 60, 62, 67: mean 63, deviations -3, -1, 4 -> sum of squares 26 / (n - 1 = 2) = 13
    mean, std, count = mean_std([60.0, 62.0, 67.0])
    assert mean == pytest.approx(63.0) and std == pytest.approx(math.sqrt(13.0)) and count == 3
    assert mean_std([5.0]) == (5.0, None, 1)
    assert mean_std([None, 4.0, 6.0]) == (5.0, pytest.approx(math.sqrt(2.0)), 2)
    assert mean_std([None, None]) == (None, None, 0)


def test_aggregate_means_stds_and_harmonic_passthrough():
    rows = [_row(1, 60.0, 20.0, 30.0, 0.30, 10.0), _row(2, 62.0, 40.0, 48.0, 0.40, 12.0),
            _row(3, 67.0, 60.0, 63.0, 0.50, 14.0)]
    doc = aggregate(rows, command=["python", "-m", "trainer.multiseed"], config="c.json")
    assert doc["n"] == 3 and doc["seeds"] == [1, 2, 3] and doc["sigma"] == 0.5
    assert doc["means"]["mIoU_seen"] == pytest.approx(63.0)
    assert doc["stds"]["mIoU_seen"] == pytest.approx(math.sqrt(13.0))
    assert doc["means"]["mIoU_unseen"] == pytest.approx(40.0) and doc["stds"]["mIoU_unseen"] == pytest.approx(20.0)
    # harmonic: the mean of the per-seed values (47), not the harmonic mean of 63 and 40 (48.93)
    assert doc["means"]["mIoU_harmonic"] == pytest.approx(47.0)
    assert doc["stds"]["mIoU_harmonic"] == pytest.approx(math.sqrt((17 ** 2 + 1 + 16 ** 2) / 2))
    assert doc["means"]["ausuc"] == pytest.approx(0.4) and doc["stds"]["ausuc"] == pytest.approx(0.1)
    assert doc["means"]["wall_s"] == pytest.approx(12.0)
    assert "ddof=1" in doc["std"] and doc["config"] == "c.json" and doc["failed"] == []
    table = aggregate_markdown(doc)
    assert "| mean ± std | 63.00 ± 3.61 | 40.00 ± 20.00 | 47.00 ± 16.52 |" in table
    assert "| 2 | 62.00 | 40.00 | 48.00 | 0.4000 | 12.0 |" in table and "ddof=1" in table


def test_single_seed_has_no_std():
    doc = aggregate([_row(4, 60.0, 20.0, 30.0)])
    assert doc["n"] == 1 and doc["means"]["mIoU_seen"] == 60.0 and doc["stds"]["mIoU_seen"] is None
    assert "| mean ± std | 60.00 ± n/a | 20.00 ± n/a | 30.00 ± n/a |" in aggregate_markdown(doc)


def test_missing_sweep_values_are_na():
    doc = aggregate([_row(1, 60.0, 20.0, 30.0), _row(2, 62.0, 40.0, 48.0, ausuc=0.5)])
    assert doc["means"]["wall_s"] is None and doc["counts"]["wall_s"] == 0
    assert doc["means"]["ausuc"] == 0.5 and doc["stds"]["ausuc"] is None and doc["counts"]["ausuc"] == 1
    table = aggregate_markdown(doc)
    assert "| 1 | 60.00 | 20.00 | 30.00 | n/a | n/a |" in table
    assert "0.5000 ± n/a (n=1)" in table


def test_failed_seeds_are_reported():
    doc = aggregate([_row(1, 60.0, 20.0, 30.0), _row(2, 62.0, 40.0, 48.0)], failed=[{"seed": 3, "exit_code": 3}])
    assert "2 of 3 seeds" in doc["note"] and "seed 3 (exit 3)" in doc["note"]
    assert doc["note"] in aggregate_markdown(doc)


def _finished_seed(folder, name, seed, seen, unseen, harmonic, status="finished"):
    run = _run_dir(folder, name, seed, [_record("test", 0.5, seen, unseen, harmonic)])
    (run / "run.json").write_text(json.dumps({"status": status}))
    return run


def test_update_aggregate_covers_the_finished_seed_folders_on_disk(tmp_path, capsys):
    group = tmp_path / "group"
    _finished_seed(group, "seed1", 1, 60.0, 20.0, 30.0)
    _finished_seed(group, "seed2", 2, 62.0, 40.0, 48.0)
    _finished_seed(group, "seed3", 3, 99.0, 99.0, 99.0, status="interrupted")
    (group / "notes").mkdir()
    outcomes = [{"seed": 2, "exit_code": 0, "run_dir": str(group / "seed2"), "wall_s": 7.5},
                {"seed": 4, "exit_code": 3, "run_dir": str(group / "seed4"), "wall_s": 1.0}]
    doc = update_aggregate(group, outcomes, command=["cmd"], mode="train", title="g: training")
    assert doc["seeds"] == [1, 2] and doc["means"]["mIoU_seen"] == pytest.approx(61.0)
    assert doc["stds"]["mIoU_unseen"] == pytest.approx(math.sqrt(200.0))   # (20, 40): ddof=1
    assert [row["wall_s"] for row in doc["rows"]] == [None, 7.5]
    assert doc["failed"] == [{"seed": 3, "exit_code": None, "reason": "run.json status interrupted"},
                             {"seed": 4, "exit_code": 3}]
    assert json.loads((group / "aggregate.json").read_text()) == json.loads(json.dumps(doc))
    assert (group / "aggregate.md").read_text() == aggregate_markdown(doc)
    assert capsys.readouterr().out == f"{aggregate_markdown(doc)}aggregate: {group / 'aggregate.json'}\n"
    # recomputed from disk: the earlier wall times, command and title are kept
    (group / "seed3" / "run.json").write_text(json.dumps({"status": "finished"}))
    assert main([str(group)]) == 0
    again = json.loads((group / "aggregate.json").read_text())
    assert again["seeds"] == [1, 2, 3] and again["failed"] == [] and again["command"] == ["cmd"]
    assert [row["wall_s"] for row in again["rows"]] == [None, 7.5, None] and again["title"] == "g: training"
    assert again["means"]["mIoU_seen"] == pytest.approx((60 + 62 + 99) / 3)


def test_recompute_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    _finished_seed(tmp_path, "seed1", 1, 60.0, 20.0, 30.0, status="running")
    assert main(["recompute", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {tmp_path / 'missing'}: not a folder",
                                f"error: {tmp_path}: no seed folder (seedN or test_seedN) whose run.json says finished"]
    assert not (tmp_path / "aggregate.json").exists()


def test_compare_differences():
    a = aggregate([_row(1, 60.0, 20.0, 30.0, 0.3), _row(2, 62.0, 40.0, 48.0, 0.5)])
    b = aggregate([_row(1, 50.0, 30.0, 40.0), _row(2, 56.0, 50.0, 52.0), _row(3, 50.0, 40.0, 46.0)])
    doc = compare(a, b, labels=("JoEm", "CE-only"))
    by = {entry["metric"]: entry for entry in doc["metrics"]}
    assert by["mIoU_seen"]["difference"] == pytest.approx(52.0 - 61.0)
    assert by["mIoU_unseen"]["difference"] == pytest.approx(40.0 - 30.0)
    assert by["mIoU_harmonic"]["difference"] == pytest.approx(46.0 - 39.0)
    assert by["ausuc"]["difference"] is None and by["ausuc"]["a"]["mean"] == pytest.approx(0.4)
    assert doc["n"] == [2, 3] and doc["labels"] == ["JoEm", "CE-only"]
    table = compare_markdown(doc)
    assert "| metric | JoEm (n=2) | CE-only (n=3) | CE-only − JoEm |" in table
    assert "| seen | 61.00 ± 1.41 | 52.00 ± 3.46 | -9.00 |" in table
    assert "| AUSUC | 0.4000 ± 0.1414 | n/a | n/a |" in table


def _write(doc, path):
    path.write_text(json.dumps(doc))
    return path


def test_compare_command_writes_markdown_and_json(tmp_path, capsys):
    a = _write(aggregate([_row(1, 60.0, 20.0, 30.0), _row(2, 62.0, 40.0, 48.0)]), tmp_path / "a.json")
    b = _write(aggregate([_row(1, 50.0, 30.0, 40.0)]), tmp_path / "b.json")
    out = tmp_path / "cmp" / "joem_vs_ce.md"
    assert main(["compare", str(a), str(b), "--labels", "JoEm,CE-only", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed and "| harmonic | 39.00 ± 12.73 | 40.00 ± n/a | +1.00 |" in printed
    assert json.loads(out.with_suffix(".json").read_text())["labels"] == ["JoEm", "CE-only"]


@pytest.mark.parametrize("argv", [[], ["compare", "a.json"], ["compare", "A", "B", "--labels", "one"],
                                  ["compare", "missing.json", "missing.json"], ["compare", "CFG", "CFG"]])
def test_compare_command_errors(tmp_path, capsys, argv):
    config = tmp_path / "config.json"
    config.write_text("{}")
    good = _write(aggregate([_row(1, 60.0, 20.0, 30.0)]), tmp_path / "aggregate.json")
    argv = [{"A": str(good), "B": str(good), "CFG": str(config)}.get(arg, arg) for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
