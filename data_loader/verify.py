"""Check a configured dataset before a long run: ``python -m data_loader.verify -c CONFIG``.

Reads every image and label of each split and the class embeddings; prints per split the counts
(listed, bad, with unseen pixels, used), the raw label values found and the images holding each
class. Exits 1 on a bad file or a count other than ``data.expected_counts``, 2 on a config error.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping, TextIO

from data_loader.build import DataSource, count, resolve
from data_loader.dataset import value_ranges
from data_loader.layouts import split_label
from data_loader.scan import SampleCheck, scan
from utils.cli import ArgParser, run_command
from utils.parse_config import load_config
from utils.schema import DataSection


def verify(data: DataSection | Mapping, source: str = "config", out: TextIO | None = None,
           progress: bool = True) -> list[str]:
    """Walk the configured splits, print the count table to ``out`` (stdout); return the problems found."""
    out = out or sys.stdout
    ds = resolve(data, source, progress)
    data = ds.data
    embeddings = ds.embeddings()
    print(f"{data.type} at {ds.root}: {ds.split.num_classes} classes, embeddings "
          f"{tuple(embeddings.shape)}, unseen: {', '.join(ds.split.unseen_names) or 'none'}", file=out)
    print(f"{'split':<12}{'listed':>8}{'bad':>6}{'with unseen':>13}{'used':>8}{'expected':>10}", file=out)
    problems: list[str] = []
    checked: dict[str, list[SampleCheck]] = {}
    splits = {"train_split": data.train_split, "val_split": data.val_split}
    if data.selection_split is not None and data.holdout is None:
        splits["selection_split"] = data.selection_split
    for key, spec in splits.items():
        if spec is None:
            continue
        name, is_train = split_label(spec), key == "train_split"
        dataset = ds.dataset(spec, key, train=False)
        checked[name] = scan(dataset, read_image=True, desc=f"checking {name}" if progress else None)
        counts = count(checked[name], ds.split.unseen, data.remove_unseen_images and is_train)
        want = data.expected_counts.get(name)
        print(f"{name:<12}{counts.total:>8}{len(counts.bad):>6}{counts.with_unseen:>13}{len(counts.kept):>8}"
              f"{'-' if want is None else want:>10}", file=out)
        problems += counts.bad
        if want is not None and want != counts.total:
            problems.append(f"data.{key} {name!r}: {counts.total} images listed, expected {want} "
                            f"(data.expected_counts in {source})")
    if checked:
        print_class_tables(ds, checked, out)
    return problems


def print_class_tables(ds: DataSource, checked: dict[str, list[SampleCheck]], out: TextIO) -> None:
    """The raw label values found per split, then per class the images containing it per split."""
    names = ds.label_names
    ignored = ", ".join(f"{v} {names[v]}" if v < len(names) else str(v) for v in ds.ignored_values)
    print(f"label values found (as stored; ignored: {ignored + ', ' if ignored else ''}255):", file=out)
    width = max(12, *(len(name) + 2 for name in checked))
    for name, checks in checked.items():
        values = set().union(*(check.values for check in checks))
        print(f"  {name:<{width}}{value_ranges(values) or '-'}", file=out)
    unseen = set(ds.split.unseen)
    labels = [f"{c}{' *' if i in unseen else ''}" for i, c in enumerate(ds.split.names)]
    first = max(12, *(len(label) + 2 for label in labels))
    columns = [max(8, len(name) + 2) for name in checked]
    print(f"images containing each class{' (* = unseen)' if unseen else ''}:", file=out)
    print(f"{'class':<{first}}" + "".join(f"{name:>{w}}" for name, w in zip(checked, columns)), file=out)
    for index, label in enumerate(labels):
        cells = [sum(index in check.present for check in checks if check.error is None) for checks in checked.values()]
        print(f"{label:<{first}}" + "".join(f"{n:>{w}}" for n, w in zip(cells, columns)), file=out)


def build_parser() -> ArgParser:
    parser = ArgParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="config JSON file with a 'data' section")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    problems = verify(load_config(args.config).get("data"), args.config, progress=not args.quiet)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{len(problems)} problem(s) found" if problems else "data OK", file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
