"""Multi-seed aggregates: one row per run folder, mean ± sample std (ddof=1), side-by-side comparisons.

Command lines: ``python -m trainer.aggregate GROUP_FOLDER`` (recompute a group's aggregate from
what is on disk) and ``python -m trainer.aggregate compare A.json B.json [--labels A,B] [--out FILE.md]``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from utils.cli import ArgParser, error_exit
from utils.errors import ConfigError
from utils.run_dir import (AGGREGATE_NAME, CONFIG_NAME, FINISHED, GROUP_LOCK_NAME, METRICS_NAME, RunLock, read_status,
                           sweep_name)
from utils.schema import InferenceSettings
from utils.util import read_json, write_json, write_text

# (key, column label, format): the per-seed values that are averaged over seeds.
METRICS: list[tuple[str, str, str]] = [
    ("mIoU_seen", "seen", ".2f"),
    ("mIoU_unseen", "unseen", ".2f"),
    ("mIoU_harmonic", "harmonic", ".2f"),
    ("best_sigma", "best σ", ".4g"),
    ("best_mIoU_seen", "seen @best", ".2f"),
    ("best_mIoU_unseen", "unseen @best", ".2f"),
    ("best_mIoU_harmonic", "harmonic @best", ".2f"),
    ("ausuc", "AUSUC", ".4f"),
    ("wall_s", "wall (s)", ".1f"),
]
STD_NOTE = "std is the sample standard deviation (ddof=1); n/a for a single seed"
HARMONIC_NOTE = ("harmonic: mean of the per-seed harmonic mIoU (not the harmonic mean of the mean seen "
                 "and unseen mIoU)")
NA = "n/a"


# --- one run folder -----------------------------------------------------------------------
def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (blank lines skipped)."""
    path = Path(run_dir) / METRICS_NAME
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.extend([json.loads(line)] if line.strip() else [])
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON on line {number}: {err.msg}") from None
    return records


def configured_sigma(config: dict) -> float | None:
    """The single ``inference.sigma`` of a run's recorded config; None when it is a sweep or absent."""
    section = config.get("inference") or {}
    return InferenceSettings.from_config(section).sigma if "sigma" in section else None


def headline_test_record(records: Sequence[dict], sigma: float | None) -> dict | None:
    """The last test record carrying ``ausuc`` (a sweep's headline); else the last test record at
    ``sigma``; else the only test record; else None."""
    tests = [r for r in records if r.get("split") == "test"]
    for candidates in ([r for r in tests if "ausuc" in r], [r for r in tests if r.get("sigma") == sigma]):
        if candidates:
            return candidates[-1]
    return tests[0] if len(tests) == 1 else None


def _number(value: Any) -> float | None:
    """A finite float, else None (n/a)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_run(run_dir: str | Path, wall_s: float | None = None) -> dict:
    """One per-seed row from a run folder: seed, headline seen/unseen/harmonic mIoU (percent) at the
    configured sigma, the sweep's best sigma and its mIoU, AUSUC (``sweep_test.json``) and wall time.
    Values that the run does not have (no sweep, no test) are None."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG_NAME)
    record = headline_test_record(read_metrics(run_dir), configured_sigma(config)) or {}
    sweep_path = run_dir / f"{sweep_name('test')}.json"
    sweep = read_json(sweep_path) if sweep_path.is_file() else {}
    best = sweep.get("best", {})
    row = {"seed": config.get("seed"), "run_dir": str(run_dir), "sigma": _number(record.get("sigma"))}
    for key in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic"):
        row[key] = _number(record.get(key))
        row[f"best_{key}"] = _number(best.get(key))
    row["best_sigma"] = _number(best.get("sigma"))
    row["ausuc"] = _number(sweep.get("ausuc"))
    row["wall_s"] = _number(wall_s)
    return row


# --- a group folder on disk ----------------------------------------------------------------------
SEED_FOLDER = re.compile(r"(?:test_)?seed(-?\d+)")


def seed_run_folders(folder: str | Path) -> dict[int, Path]:
    """The seed run folders of a group (``seedN``) or of its test-only evaluation (``test_seedN``)."""
    found = {}
    for path in Path(folder).iterdir() if Path(folder).is_dir() else []:
        match = SEED_FOLDER.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def aggregate_folder(folder: str | Path, command: Sequence[str] | None = None, config: str | None = None,
                     failed: Sequence[dict] = (), walls: dict[str, float] | None = None) -> dict | None:
    """The aggregate of every seed folder of ``folder`` whose ``run.json`` says finished (so it
    never misses a finished seed, whichever process ran it); seed folders that did not finish are
    listed as failed with their status, as are the ``failed`` seeds of this command that have no
    finished run. ``walls``: wall times by run folder (else the earlier aggregate's). Command,
    config, title, mode and runs default to the earlier ``aggregate.json``'s. None: no seed finished."""
    folder = Path(folder)
    earlier_path = folder / f"{AGGREGATE_NAME}.json"
    earlier = read_json(earlier_path) if earlier_path.is_file() else {}
    walls = {**{row.get("run_dir"): row.get("wall_s") for row in earlier.get("rows", [])}, **(walls or {})}
    rows, unfinished = [], []
    for seed, run in seed_run_folders(folder).items():
        status = read_status(run).get("status")
        if status == FINISHED:
            rows.append(read_run(run, walls.get(str(run))))
        else:
            unfinished.append({"seed": seed, "exit_code": None, "reason": f"run.json status {status or 'missing'}"})
    if not rows:
        return None
    done = {row["seed"] for row in rows} | {Path(row["run_dir"]).name for row in rows}
    failures = [f for f in failed if f.get("seed") not in done]
    failures += [f for f in unfinished if f["seed"] not in {g.get("seed") for g in failures}]
    doc = aggregate(rows, command or earlier.get("command"), config or earlier.get("config"), failures)
    doc.update(title=earlier.get("title") or f"{folder.name}: training", mode=earlier.get("mode") or "train",
               folder=str(folder), runs=earlier.get("runs", []))
    return doc


# --- statistics over seeds ----------------------------------------------------------------------
def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof=1) of the values that are not None; (None, None, 0) when none,
    std None for a single value. Returns (mean, std, count)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def aggregate(rows: Sequence[dict], command: Sequence[str] | None = None, config: str | None = None,
              failed: Sequence[dict] = ()) -> dict:
    """Means, sample stds (ddof=1) and counts of every metric over the per-seed ``rows``.
    ``failed``: ``{"seed", "exit_code"}`` of seeds left out (reported in the document)."""
    means, stds, counts = {}, {}, {}
    for key, _, _ in METRICS:
        means[key], stds[key], counts[key] = mean_std([row.get(key) for row in rows])
    sigmas = {row.get("sigma") for row in rows}
    doc = {"n": len(rows), "seeds": [row.get("seed") for row in rows], "rows": list(rows),
           "sigma": sigmas.pop() if len(sigmas) == 1 else None, "means": means, "stds": stds, "counts": counts,
           "std": STD_NOTE, "harmonic": HARMONIC_NOTE, "command": list(command) if command else None,
           "config": config, "failed": list(failed)}
    doc["note"] = coverage_note(doc)
    return doc


def coverage_note(doc: dict) -> str:
    """'n = 3 seeds' or, with failures, which seeds the aggregate leaves out and why
    (``failed`` entries: seed, exit_code and optionally a reason)."""
    note = f"n = {doc['n']} seed{'s' if doc['n'] != 1 else ''}"
    failed = doc.get("failed") or []
    if failed:
        total = doc["n"] + len(failed)
        lost = ", ".join(f"seed {f.get('seed')} ({f.get('reason') or 'exit ' + str(f.get('exit_code'))})"
                         for f in failed)
        note += f": the aggregate covers the {doc['n']} of {total} seeds that succeeded; failed: {lost}"
    return note


# --- formatting -----------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return NA if value is None else format(value, spec)


def format_mean_std(mean: float | None, std: float | None, count: int, n: int, spec: str) -> str:
    """'12.34 ± 0.56'; 'n/a' without values; std 'n/a' for one value; '(n=k)' when some seeds lack it."""
    if mean is None:
        return NA
    text = f"{_fmt(mean, spec)} ± {_fmt(std, spec)}"
    return text if count == n else f"{text} (n={count})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _seed_cells(row: dict) -> list[str]:
    seed = NA if row.get("seed") is None else str(row["seed"])
    return [seed, *(_fmt(row.get(key), spec) for key, _, spec in METRICS)]


def _mean_cells(doc: dict) -> list[str]:
    return ["mean ± std", *(format_mean_std(doc["means"][key], doc["stds"][key], doc["counts"][key], doc["n"], spec)
                            for key, _, spec in METRICS)]


def aggregate_markdown(doc: dict) -> str:
    """Markdown: per-seed rows, then the ``mean ± std`` row, then notes (n, ddof=1, failures)."""
    sigma = doc.get("sigma")
    at = "the configured sigma" if sigma is None else f"sigma {sigma:g}"
    header = ["seed", *(label for _, label, _ in METRICS)]
    table = _table(header, [*map(_seed_cells, doc["rows"]), _mean_cells(doc)])
    lines = [f"## {doc.get('title') or 'Multi-seed aggregate'}", "",
             f"{doc['note']}; seen/unseen/harmonic mIoU (%) of the test split at {at}; '@best': at the sweep's "
             "best sigma (sweep_test.json); n/a: not measured (no sweep or no test).", "",
             *table, "", f"Mean ± std over seeds; {STD_NOTE}. {HARMONIC_NOTE}."]
    if doc.get("command"):
        lines += ["", f"Command: `{' '.join(doc['command'])}`"]
    return "\n".join(lines) + "\n"


def write_aggregate(doc: dict, folder: str | Path) -> tuple[Path, Path]:
    """Write ``aggregate.md`` and ``aggregate.json`` into ``folder``; returns their paths."""
    folder = Path(folder)
    md, js = folder / f"{AGGREGATE_NAME}.md", folder / f"{AGGREGATE_NAME}.json"
    write_json(doc, js)
    write_text(aggregate_markdown(doc), md)
    return md, js


# --- comparing two aggregates ---------------------------------------------------------------------
def compare(a: dict, b: dict, labels: Sequence[str] = ("A", "B")) -> dict:
    """Two aggregate documents side by side: per metric each mean, std and count, and the
    difference of means (B - A; None when either is missing)."""
    metrics = []
    for key, label, _ in METRICS:
        entry = {"metric": key, "label": label}
        for name, doc in zip(("a", "b"), (a, b)):
            entry[name] = {"mean": doc["means"].get(key), "std": doc["stds"].get(key),
                           "count": doc["counts"].get(key, 0), "n": doc["n"]}
        ma, mb = entry["a"]["mean"], entry["b"]["mean"]
        entry["difference"] = None if ma is None or mb is None else mb - ma
        metrics.append(entry)
    return {"labels": list(labels), "difference": f"{labels[1]} - {labels[0]} (difference of means)",
            "std": STD_NOTE, "n": [a["n"], b["n"]], "metrics": metrics}


def compare_markdown(doc: dict) -> str:
    """Markdown: metric | A mean ± std | B mean ± std | B - A."""
    la, lb = doc["labels"]
    na, nb = doc["n"]
    spec = {key: fmt for key, _, fmt in METRICS}
    rows = []
    for entry in doc["metrics"]:
        fmt = spec.get(entry["metric"], ".4g")
        cells = [format_mean_std(side["mean"], side["std"], side["count"], side["n"], fmt)
                 for side in (entry["a"], entry["b"])]
        diff = entry["difference"]
        rows.append([entry["label"], *cells, NA if diff is None else format(diff, "+" + fmt)])
    lines = [f"## {la} vs {lb}", "", *_table(["metric", f"{la} (n={na})", f"{lb} (n={nb})", f"{lb} − {la}"], rows),
             "", f"Mean ± std over seeds; {STD_NOTE}. Last column: difference of means."]
    return "\n".join(lines) + "\n"


# --- command line -----------------------------------------------------------------------------
def _compare_command(args: argparse.Namespace) -> int:
    labels = [part.strip() for part in args.labels.split(",")] if args.labels else ["A", "B"]
    if len(labels) != 2 or not all(labels):
        raise ConfigError(f"--labels expects two names like JoEm,CE-only, got {args.labels!r}")
    docs = [read_json(path) for path in (args.a, args.b)]
    for path, doc in zip((args.a, args.b), docs):
        if not {"means", "stds", "counts", "n"} <= set(doc):
            raise ConfigError(f"{path}: not an aggregate.json (no means/stds/counts/n)")
    result = compare(*docs, labels=labels)
    text = compare_markdown(result)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        write_text(text, out)
        write_json(result, out.with_suffix(".json"))
    return 0


def _group_command(folder: str) -> int:
    """Recompute ``folder``'s aggregate from its seed folders (the group is locked meanwhile)."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a folder")
    lock = RunLock(path, GROUP_LOCK_NAME, "group folder", "--group")
    lock.acquire()
    try:
        doc = aggregate_folder(path)
        if doc is None:
            raise ConfigError(f"{path}: no seed folder (seedN or test_seedN) whose run.json says finished")
        _, json_path = write_aggregate(doc, path)
    finally:
        lock.release()
    print(aggregate_markdown(doc), end="")
    print(f"aggregate: {json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``GROUP_FOLDER`` or ``compare A.json B.json [--labels A,B] [--out FILE.md]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0] not in ("compare", "-h", "--help"):
        try:
            return _group_command(argv[0])
        except ConfigError as err:
            return error_exit(err)
    parser = ArgParser(prog="python -m trainer.aggregate", description="aggregates of multi-seed runs; "
                       "python -m trainer.aggregate GROUP_FOLDER recomputes a group's aggregate from disk")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgParser)
    cmp = commands.add_parser("compare", help="two aggregate.json side by side")
    cmp.add_argument("a", help="aggregate.json of the first group (A)")
    cmp.add_argument("b", help="aggregate.json of the second group (B)")
    cmp.add_argument("--labels", default=None, help="names of A and B, e.g. JoEm,CE-only")
    cmp.add_argument("--out", default=None, help="also write this Markdown file (and the .json beside it)")
    try:
        args = parser.parse_args(argv)
        return _compare_command(args)
    except ConfigError as err:
        return error_exit(err)


if __name__ == "__main__":
    sys.exit(main())
