"""Build a class-embedding file from word-vector files and a list of class names.

    python build_embeddings.py --vectors GoogleNews-vectors-negative300.bin.gz \\
        [--vectors wiki-news-300d-1M.vec] --classes classes.txt --out embeddings.npy \\
        [--normalize none|l2|max_norm] [--format auto|word2vec-bin|word2vec-text|glove|fasttext]

Writes ``embeddings.npy`` (float32, one row per class, in class order; several
``--vectors`` are concatenated) and ``embeddings.classes.txt`` naming the rows. See
docs/build_embeddings.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from data_loader.classes import load_class_names
from data_loader.word_vectors import (
    FORMATS,
    READERS,
    SourceReport,
    check_output_path,
    resolve_class_embeddings,
    save_class_embeddings,
)
from utils.cli import ArgParser, run_command


def build_parser() -> ArgParser:
    parser = ArgParser(description="Build a class-embedding file (.npy) from word vectors.")
    parser.add_argument("--vectors", action="append", required=True, metavar="FILE",
                        help="word2vec .bin/.txt, GloVe .txt or fastText .vec (.gz ok); repeat to concatenate")
    parser.add_argument("--classes", required=True, metavar="FILE|LIST",
                        help="a file (one class name a line, or a JSON list), a built-in list (voc, context, "
                             "context-png) or 'background,aeroplane,potted plant'")
    parser.add_argument("--out", required=True, metavar="OUT.npy", help="output .npy (or .pt)")
    parser.add_argument("--normalize", choices=("none", "l2", "max_norm"), default="none",
                        help="per vector file, before concatenation (default: none)")
    parser.add_argument("--format", choices=FORMATS, default="auto", dest="fmt",
                        help="vector file format (default: auto, from the content)")
    parser.add_argument("--reader", choices=READERS, default="auto",
                        help="auto: gensim when installed, else the built-in streaming reader")
    return parser


def summary(reports: Sequence[SourceReport]) -> list[str]:
    """One line per vector file, then one per class that needed a phrase, alias, case or mean."""
    lines = []
    for report in reports:
        lines.append(f"  {report.path}: {report.fmt}, {report.dim}-d, {report.reader} reader")
        plain = 0
        for match in report.matches:
            how = list(match.notes) + ([f"mean of {len(match.keys)} words"] if len(match.keys) > 1 else [])
            if not how:
                plain += 1
                continue
            lines.append(f"    {match.name!r} <- {' + '.join(match.keys)} ({', '.join(how)})")
        lines.append(f"    {plain} classes found as written")
    return lines


def build(args: argparse.Namespace) -> int:
    out = check_output_path(args.out)
    names = load_class_names(args.classes, "--classes", None)
    array, reports = resolve_class_embeddings(args.vectors, names, args.normalize, args.fmt, args.reader)
    sidecar = save_class_embeddings(array, names, out)
    print(f"wrote {out}: {array.shape[0]} classes x {array.shape[1]} dims (float32, normalization "
          f"{args.normalize}), row names in {sidecar}")
    print("\n".join(summary(reports)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
