"""Multi-seed aggregates: one row per seed folder, mean ± sample std (ddof=1), side-by-side comparisons;
``python -m trainer.aggregate [recompute] GROUP_FOLDER | compare A.json B.json [--labels A,B] [--out FILE.md]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from utils.cli import ArgParser, run_command
from utils.errors import ConfigError
from utils.run_dir import AGGREGATE_NAME, CONFIG_NAME, FINISHED, METRICS_NAME, SEED_FOLDER, read_status, sweep_name
from utils.schema import InferenceSettings
from utils.util import read_json, write_json, write_text

# (key, column label, format): the per-seed values averaged over seeds. No "best sigma" column: a sweep's
# best is chosen on the split it reports, so it is no result (the sweep files keep it for reading).
METRICS = [("mIoU_seen", "seen", ".2f"), ("mIoU_unseen", "unseen", ".2f"), ("mIoU_harmonic", "harmonic", ".2f"),
           ("ausuc", "AUSUC", ".4f"), ("wall_s", "wall (s)", ".1f")]
STD_NOTE = "std is the sample standard deviation (ddof=1); n/a for a single seed"
HARMONIC_NOTE = "harmonic: mean of the per-seed harmonic mIoU (not the harmonic mean of the mean seen and unseen mIoU)"
NA = "n/a"


def headline_test_record(records: Sequence[dict], sigma: float | None) -> dict | None:
    """The last test record with ``ausuc`` (a sweep's headline), else the last at ``sigma``, else the only one."""
    tests = [r for r in records if r.get("split") == "test"]
    for candidates in ([r for r in tests if "ausuc" in r], [r for r in tests if r.get("sigma") == sigma]):
        if candidates:
            return candidates[-1]
    return tests[0] if len(tests) == 1 else None


def read_run(run_dir: str | Path, wall_s: float | None = None) -> dict:
    """One seed's row: seed, headline test mIoU at the configured sigma, the sweep's AUSUC, wall time (or None)."""
    run_dir, metrics = Path(run_dir), Path(run_dir) / METRICS_NAME
    config = read_json(run_dir / CONFIG_NAME)
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    try:
        records = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"{metrics}: invalid JSON line ({err.msg})") from None
    inference = config.get("inference") or {}
    sigma = InferenceSettings.from_config(inference).sigma if "sigma" in inference else None
    record = headline_test_record(records, sigma) or {}
    sweep_path = run_dir / f"{sweep_name('test')}.json"
    sweep = read_json(sweep_path) if sweep_path.is_file() else {}
    return {"seed": config.get("seed"), "run_dir": str(run_dir), "sigma": record.get("sigma"),
            **{key: record.get(key) for key in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic")},
            "ausuc": sweep.get("ausuc"), "wall_s": wall_s}


def seed_run_folders(folder: str | Path) -> dict[int, Path]:
    """A group's seed run folders (``seedN``) or its test-only evaluation's (``test_seedN``), by seed."""
    paths = Path(folder).iterdir() if Path(folder).is_dir() else []
    found = {int(match.group(1)): path for path in paths if (match := SEED_FOLDER.fullmatch(path.name))}
    return {seed: found[seed] for seed in sorted(found) if found[seed].is_dir()}


def is_finished(run_dir: str | Path) -> bool:
    """Whether a run folder's ``run.json`` says finished."""
    return read_status(Path(run_dir)).get("status") == FINISHED


def update_aggregate(folder: str | Path, outcomes: Sequence[dict] = (), **info: Any) -> dict | None:
    """Aggregate ``folder``'s finished seed folders into aggregate.md/.json (printed), the others and failed
    ``outcomes`` listed as failed; wall times and ``info`` default to the earlier aggregate's. None: none finished."""
    path = Path(folder) / f"{AGGREGATE_NAME}.json"
    earlier = read_json(path) if path.is_file() else {}
    walls = {**{row.get("run_dir"): row.get("wall_s") for row in earlier.get("rows", [])},
             **{o["run_dir"]: o["wall_s"] for o in outcomes if not o["exit_code"]}}
    failures = {o["seed"]: {k: o[k] for k in ("seed", "exit_code", "reason") if k in o} for o in outcomes
                if o["exit_code"]}
    rows = {}
    for seed, run in seed_run_folders(folder).items():
        if is_finished(run):
            rows[seed] = read_run(run, walls.get(str(run)))
        else:
            reason = f"run.json status {read_status(run).get('status', 'missing')}"
            failures.setdefault(seed, {"seed": seed, "exit_code": None, "reason": reason})
    if not rows:
        return None
    info = {key: info.get(key) or earlier.get(key) for key in ("command", "config", "mode", "title")}
    failures = [failures[seed] for seed in sorted(failures) if seed not in rows]
    doc = {**aggregate(list(rows.values()), failures, **info), "folder": str(folder)}
    write_json(doc, path)
    write_text(aggregate_markdown(doc), path.with_suffix(".md"))
    print(f"{aggregate_markdown(doc)}aggregate: {path}")
    return doc


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std with ddof=1, count) of the values that are not None; std None for one value."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None, len(present)


def aggregate(rows: Sequence[dict], failed: Sequence[dict] = (), **info: Any) -> dict:
    """Means, sample stds (ddof=1) and counts over the per-seed ``rows``; ``failed``: the seeds left out."""
    stats = {key: mean_std([row.get(key) for row in rows]) for key, _, _ in METRICS}
    sigmas, n = {row.get("sigma") for row in rows}, len(rows)
    note = f"n = {n} seed{'s' if n != 1 else ''}"
    if failed:
        lost = ", ".join(f"seed {f['seed']} ({f.get('reason') or 'exit ' + str(f['exit_code'])})" for f in failed)
        note += f": the aggregate covers the {n} of {n + len(failed)} seeds that succeeded; failed: {lost}"
    return {"n": n, "seeds": [row.get("seed") for row in rows], "rows": list(rows),
            "sigma": sigmas.pop() if len(sigmas) == 1 else None, "means": {k: s[0] for k, s in stats.items()},
            "stds": {k: s[1] for k, s in stats.items()}, "counts": {k: s[2] for k, s in stats.items()},
            "std": STD_NOTE, "harmonic": HARMONIC_NOTE, "failed": list(failed), "note": note, **info}


def _fmt(value: Any, spec: str) -> str:
    return NA if value is None else format(value, spec)


def format_mean_std(mean: float | None, std: float | None, count: int, n: int, spec: str) -> str:
    """'12.34 ± 0.56'; 'n/a' without values; std 'n/a' for one value; '(n=k)' when some seeds lack it."""
    text = NA if mean is None else f"{_fmt(mean, spec)} ± {_fmt(std, spec)}"
    return text if mean is None or count == n else f"{text} (n={count})"


def _markdown(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    table = [f"| {' | '.join(row)} |" for row in (header, ["---"] * len(header), *rows)]
    return "\n".join([f"## {title}", "", *table, "", *notes]) + "\n"


def aggregate_markdown(doc: dict) -> str:
    """Markdown: per-seed rows, the ``mean ± std`` row, then notes (n, failures, ddof=1, command)."""
    at = "the configured sigma" if doc.get("sigma") is None else f"sigma {doc['sigma']:g}"
    rows = [[_fmt(row.get("seed"), ""), *(_fmt(row.get(key), spec) for key, _, spec in METRICS)] for row in doc["rows"]]
    rows.append(["mean ± std", *(format_mean_std(doc["means"][key], doc["stds"][key], doc["counts"][key], doc["n"],
                                                 spec) for key, _, spec in METRICS)])
    notes = [f"{doc['note']}; seen/unseen/harmonic mIoU (%) of the test split at {at}; AUSUC: sigma-free "
             f"(sweep_test.json); n/a: not measured. Mean ± std over seeds; {STD_NOTE}. {HARMONIC_NOTE}."]
    notes += ["", f"Command: `{' '.join(doc['command'])}`"] if doc.get("command") else []
    return _markdown(doc.get("title") or "Multi-seed aggregate", ["seed", *(label for _, label, _ in METRICS)], rows,
                     notes)


def compare(a: dict, b: dict, labels: Sequence[str] = ("A", "B")) -> dict:
    """Two aggregates side by side: per metric each mean, std and count, and B - A (None when either is missing)."""
    metrics = []
    for key, label, _ in METRICS:
        sides = {name: {"mean": doc["means"].get(key), "std": doc["stds"].get(key), "count": doc["counts"].get(key, 0),
                        "n": doc["n"]} for name, doc in (("a", a), ("b", b))}
        ma, mb = sides["a"]["mean"], sides["b"]["mean"]
        metrics.append({"metric": key, "label": label, **sides, "difference": None if None in (ma, mb) else mb - ma})
    return {"labels": list(labels), "difference": f"{labels[1]} - {labels[0]} (difference of means)",
            "std": STD_NOTE, "n": [a["n"], b["n"]], "metrics": metrics}


def compare_markdown(doc: dict) -> str:
    """Markdown: metric | A mean ± std | B mean ± std | B - A."""
    (la, lb), (na, nb), specs, rows = doc["labels"], doc["n"], {key: spec for key, _, spec in METRICS}, []
    for entry in doc["metrics"]:
        spec = specs.get(entry["metric"], ".4g")
        cells = [format_mean_std(s["mean"], s["std"], s["count"], s["n"], spec) for s in (entry["a"], entry["b"])]
        rows.append([entry["label"], *cells, _fmt(entry["difference"], "+" + spec)])
    return _markdown(f"{la} vs {lb}", ["metric", f"{la} (n={na})", f"{lb} (n={nb})", f"{lb} − {la}"], rows,
                     [f"Mean ± std over seeds; {STD_NOTE}. Last column: difference of means."])


def _compare_command(args: argparse.Namespace) -> None:
    labels = [part.strip() for part in args.labels.split(",")] if args.labels else ["A", "B"]
    if len(labels) != 2 or not all(labels):
        raise ConfigError(f"--labels expects two names like JoEm,CE-only, got {args.labels!r}")
    docs = [read_json(path) for path in (args.a, args.b)]
    for path, doc in zip((args.a, args.b), docs):
        if not isinstance(doc, dict) or not {"means", "stds", "counts", "n"} <= set(doc):
            raise ConfigError(f"{path}: not an aggregate.json (no means/stds/counts/n)")
    result = compare(*docs, labels=labels)
    print(compare_markdown(result), end="")
    if args.out:
        write_text(compare_markdown(result), Path(args.out))
        write_json(result, Path(args.out).with_suffix(".json"))


def _recompute_command(args: argparse.Namespace) -> None:
    if not Path(args.folder).is_dir():
        raise ConfigError(f"{args.folder}: not a folder")
    if update_aggregate(args.folder) is None:
        raise ConfigError(f"{args.folder}: no seed folder (seedN or test_seedN) whose run.json says {FINISHED}")


def build_parser() -> ArgParser:
    """``[recompute] GROUP_FOLDER`` and ``compare A.json B.json [--labels A,B] [--out FILE.md]``."""
    parser = ArgParser(prog="python -m trainer.aggregate", description="multi-seed aggregates (mean ± std, ddof=1)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgParser)
    recompute = commands.add_parser("recompute",
                                    help="a group's aggregate from its seed folders (the word may be left out)")
    recompute.add_argument("folder", help="the group folder (or its --from evaluation folder)")
    recompute.set_defaults(run=_recompute_command)
    cmp = commands.add_parser("compare", help="two aggregate.json side by side")
    cmp.add_argument("a", help="aggregate.json of the first group (A)")
    cmp.add_argument("b", help="aggregate.json of the second group (B)")
    cmp.add_argument("--labels", default=None, help="names of A and B, e.g. JoEm,CE-only")
    cmp.add_argument("--out", default=None, help="also write this Markdown file (and the .json beside it)")
    cmp.set_defaults(run=_compare_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``GROUP_FOLDER`` (recompute) or ``compare A.json B.json ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] not in ("compare", "recompute", "-h", "--help"):
        argv = ["recompute", *argv]
    return run_command(build_parser(), lambda args: args.run(args), argv)


if __name__ == "__main__":
    sys.exit(main())
