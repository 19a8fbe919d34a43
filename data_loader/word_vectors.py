"""Word-vector files (word2vec binary/text, GloVe, fastText ``.vec``; ``.gz`` too) to class embeddings.

``resolve_class_embeddings`` gives each class name one row: multi-word names average their words, a
phrase token ("potted_plant") is preferred when present, case variants and the alias spellings of
``data_loader.classes`` are tried, and every missing word is reported in one ``ConfigError``.
gensim reads the files when installed (optional: heavy, and it loads the whole file, 3.6 GB for
GoogleNews); else a built-in streaming reader keeps only the requested words (a few MB).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np
import torch

from data_loader.classes import NAME_SEPARATORS, alias_spellings
from data_loader.embeddings import classes_sidecar, normalize_embeddings
from utils.errors import ConfigError
from utils.schema import NORMALIZATIONS
from utils.util import atomic_torch_save, atomic_write, write_text

FORMATS = ("auto", "word2vec-bin", "word2vec-text", "glove", "fasttext")
READERS = ("auto", "builtin", "gensim")
OUTPUT_SUFFIXES = (".npy", ".pt", ".pth")

_HEADER = re.compile(rb"^\s*(\d+)\s+(\d+)\s*$")
_FASTTEXT_BIN_MAGIC = struct.pack("<i", 793712314)
_SNIFF_LIMIT = 1 << 16
_CHUNK = 1 << 20

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Layout:
    """What a vector file looks like: resolved format, binary or text, header values."""

    fmt: str
    binary: bool
    header: bool
    count: int | None = None
    dim: int | None = None


def _open(path: Path) -> BinaryIO:
    """Open for binary reading, transparently decompressing gzip (detected by content)."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _parse_floats(values: Sequence[bytes]) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in values], dtype=np.float32)
    except ValueError:
        return None


def _text_entry(line: bytes, dim: int | None) -> tuple[bytes, np.ndarray] | None:
    """``word v1 .. vD`` (the word may contain spaces) or None when the line is not that."""
    parts = line.split() if dim is None else line.rsplit(None, dim)
    if len(parts) < 2 or (dim is not None and len(parts) != dim + 1):
        return None
    vector = _parse_floats(parts[1:])
    return None if vector is None else (parts[0].strip(), vector)


def _glove_dim(first: bytes, second: bytes) -> int:
    """Vector length of a header-less file: the fewer numbers ending its first two lines, so a word
    with spaces ("potted plant 0.1 ...") or a numeric word ("2009 0.1 ...") does not change it."""
    counts = []
    for line in filter(bytes.strip, (first, second)):
        numbers = line.split()[1:]   # the word itself is never counted
        counts.append(next((i for i, n in enumerate(reversed(numbers)) if _parse_floats([n]) is None), len(numbers)))
    return min(counts, default=0)


def detect_layout(path: PathLike, fmt: str = "auto") -> Layout:
    """Tell binary from text and header from no header by reading the first two lines."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ConfigError(f"{path}: unknown vector format {fmt!r}; valid: {', '.join(FORMATS)}")
    try:
        with _open(path) as handle:
            first = handle.readline(_SNIFF_LIMIT).removeprefix(b"\xef\xbb\xbf")
            second = handle.readline(_SNIFF_LIMIT)
    except FileNotFoundError:
        raise ConfigError(f"{path}: word-vector file not found") from None
    except (OSError, EOFError) as err:
        raise ConfigError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    if not first.strip():
        raise ConfigError(f"{path}: empty word-vector file")
    header = _HEADER.match(first)
    if fmt == "glove":
        if header:
            raise ConfigError(f"{path}: has a 'count dim' header line: use format word2vec-text")
        return Layout("glove", binary=False, header=False, dim=_glove_dim(first, second))
    if header:
        count, dim = int(header.group(1)), int(header.group(2))
        if fmt == "auto":
            vec = path.name.lower().removesuffix(".gz").endswith(".vec")
            is_text = count == 0 or _text_entry(second, dim) is not None
            fmt = ("fasttext" if vec else "word2vec-text") if is_text else "word2vec-bin"
        return Layout(fmt, binary=fmt == "word2vec-bin", header=True, count=count, dim=dim)
    if fmt != "auto":
        raise ConfigError(f"{path}: format {fmt} needs a 'count dim' header line, got {first[:40]!r}")
    if first.startswith(_FASTTEXT_BIN_MAGIC):
        raise ConfigError(f"{path}: this is a fastText .bin model, not word vectors: use its .vec file")
    dim = _glove_dim(first, second)
    if not dim or _text_entry(first, dim) is None:
        raise ConfigError(f"{path}: not a word-vector file (no 'count dim' header and the first "
                          "line is not 'word v1 v2 ...')")
    return Layout("glove", binary=False, header=False, dim=dim)


def _iter_binary(handle: BinaryIO, count: int, dim: int) -> Iterator[tuple[bytes, bytes]]:
    """(word, raw float32 bytes) per entry of a word2vec binary file, read in 1 MB chunks."""
    size = 4 * dim
    buffer, pos = b"", 0
    for _ in range(count):
        while True:
            space = buffer.find(b" ", pos)
            if space != -1 and len(buffer) - space - 1 >= size:
                break
            if space == -1 and len(buffer) - pos > _SNIFF_LIMIT:
                raise ConfigError("word2vec binary: no word separator found (not a binary file?)")
            chunk = handle.read(_CHUNK)
            if not chunk:
                raise ConfigError(f"word2vec binary: file ends early (header says {count} words)")
            buffer, pos = buffer[pos:] + chunk, 0
        # the optional newline that ends the previous entry sits before the word
        yield buffer[pos:space].lstrip(b"\r\n"), buffer[space + 1:space + 1 + size]
        pos = space + 1 + size


def _read_builtin(path: Path, layout: Layout, words: set[str] | None) -> dict[str, np.ndarray]:
    wanted = None if words is None else {w.encode("utf-8"): w for w in words}
    found: dict[str, np.ndarray] = {}

    def keep(raw: bytes) -> str | None:
        """The word ``raw`` stands for, unless it is not wanted or already found (first occurrence wins)."""
        key = raw.decode("utf-8", errors="replace") if wanted is None else wanted.get(raw)
        return None if key in found else key

    with _open(path) as handle:
        if layout.binary:
            handle.readline(_SNIFF_LIMIT)  # the header
            for raw, data in _iter_binary(handle, layout.count or 0, layout.dim or 0):
                if (key := keep(raw)) is not None:
                    found[key] = np.frombuffer(data, dtype="<f4").astype(np.float32)
            return found
        for number, line in enumerate(handle, start=1):
            if number == 1 and layout.header:
                continue
            line = line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line
            raw = line[:max(line.find(b" "), 0)]   # the first token: the word, unless it has spaces
            if not raw or (wanted is not None and keep(raw) is None):
                continue  # cheap skip: most lines of a big file are not wanted
            entry = _text_entry(line, layout.dim)
            word = entry[0] if entry else b""
            if entry is None or (word != raw and _parse_floats(word.split()[1:]) is not None):
                raise ConfigError(f"line {number}: expected a word and {layout.dim} values")
            if wanted is not None and word != raw:
                continue  # a token with spaces ("potted plant 0.1 ..."), not the word asked for
            if (key := keep(word)) is not None:
                found[key] = entry[1]
    return found


def _read_gensim(path: Path, layout: Layout, words: set[str] | None) -> dict[str, np.ndarray]:
    from gensim.models import KeyedVectors  # optional dependency, see the module docstring

    try:
        vectors = KeyedVectors.load_word2vec_format(
            str(path), binary=layout.binary, no_header=not layout.header, unicode_errors="replace")
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise ConfigError(f"gensim cannot read it ({type(err).__name__}: {err})") from None
    keys = vectors.index_to_key if words is None else [w for w in words if w in vectors.key_to_index]
    return {key: np.asarray(vectors[key], dtype=np.float32) for key in keys}


def gensim_available() -> bool:
    """Whether the optional gensim reader can be used."""
    return importlib.util.find_spec("gensim") is not None


def _pick_reader(reader: str) -> str:
    if reader not in READERS:
        raise ConfigError(f"unknown reader {reader!r}; valid: {', '.join(READERS)}")
    if reader == "auto":
        return "gensim" if gensim_available() else "builtin"
    if reader == "gensim" and not gensim_available():
        raise ConfigError("reader gensim: gensim is not installed (pip install gensim), use reader builtin")
    return reader


def read_word_vectors(path: PathLike, words: set[str] | None = None, fmt: str = "auto",
                      reader: str = "auto") -> dict[str, np.ndarray]:
    """Vectors (float32, 1-D) of those ``words`` that ``path`` has (all when None); ``fmt`` one of
    ``FORMATS``, ``reader`` one of ``READERS``."""
    path = Path(path)
    layout = detect_layout(path, fmt)
    read = _read_gensim if _pick_reader(reader) == "gensim" else _read_builtin
    try:
        return read(path, layout, words)
    except ConfigError as err:   # the readers' errors, without the file
        raise ConfigError(f"{path}: {err}") from None
    except (OSError, EOFError) as err:
        raise ConfigError(f"{path}: cannot read ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------- class names


@dataclass(frozen=True)
class ClassMatch:
    """How one class name was found: the vocabulary keys averaged and what was needed."""

    name: str
    keys: tuple[str, ...]
    notes: tuple[str, ...]  # "phrase", "alias 'potted plant'", "case 'TV'"


def name_tokens(name: str) -> list[str]:
    """Words of a class name: split on spaces, underscores and hyphens."""
    return [token for token in NAME_SEPARATORS.split(name.strip()) if token]


def case_variants(token: str) -> list[str]:
    """As written, lower-case, Title-case, upper-case (GoogleNews is case-sensitive)."""
    return list(dict.fromkeys([token, token.lower(), token[:1].upper() + token[1:].lower(), token.upper()]))


def phrase_variants(name: str, tokens: Sequence[str]) -> list[str]:
    """Whole-name tokens: as written ("t-shirt"), then ``_``-joined in several cases."""
    written = [] if re.search(r"\s", name.strip()) else case_variants(name.strip())
    joined = ["_".join(tokens), "_".join(tokens).lower(), "_".join(t.capitalize() for t in tokens),
              "_".join(tokens).capitalize(), "_".join(tokens).upper()]
    return list(dict.fromkeys(written + joined))


def _match_words(name: str, tokens: list[str], vocab) -> tuple[list[str], list[str], list[str]]:
    """(keys, notes, missing words) for one spelling of a class name."""
    if len(tokens) > 1:
        for phrase in phrase_variants(name, tokens):
            if phrase in vocab:
                return [phrase], ["phrase"], []
    keys, notes, missing = [], [], []
    for token in tokens:
        hit = next((variant for variant in case_variants(token) if variant in vocab), None)
        if hit is None:
            missing.append(token)
            continue
        keys.append(hit)
        if hit != token:
            notes.append(f"case {hit!r}")
    return keys, notes, missing


def match_class(name: str, vocab) -> tuple[ClassMatch | None, list[str]]:
    """(match, missing words of the name as written) of a class name in ``vocab`` (anything supporting
    ``in``); the other spellings of its alias group are tried when the name itself lacks a word."""
    tokens = name_tokens(name)
    if not tokens:
        raise ConfigError(f"empty class name {name!r}")
    keys, notes, missing = _match_words(name, tokens, vocab)
    for alias in alias_spellings(name) if missing else ():
        alias_keys, alias_notes, alias_missing = _match_words(alias, name_tokens(alias), vocab)
        if not alias_missing:
            keys, notes, missing = alias_keys, [f"alias {alias!r}", *alias_notes], []
            break
    if missing:
        return None, missing
    return ClassMatch(name, tuple(keys), tuple(notes)), []


class _Recorder(set):
    """A vocabulary that has nothing and remembers every lookup: the words to read."""

    def __contains__(self, key: object) -> bool:
        self.add(key)
        return False


def lookup_words(class_names: Iterable[str]) -> set[str]:
    """Every vocabulary key that matching these class names may ask for."""
    recorder = _Recorder()
    for name in class_names:
        match_class(name, recorder)
    return set(recorder)


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class SourceReport:
    """One vector file's part of the embedding."""

    path: Path
    fmt: str
    reader: str
    dim: int
    matches: tuple[ClassMatch, ...]


def resolve_class_embeddings(vector_paths: PathLike | Sequence[PathLike], class_names: Sequence[str],
                             normalize: str | None = None, fmt: str = "auto",
                             reader: str = "auto") -> tuple[np.ndarray, list[SourceReport]]:
    """float32 ``len(class_names) x sum(dims)`` array (rows in class order) and, per vector file, how
    each class name was found. One embedding per vector file, each normalised (``none``/``l2``/
    ``max_norm``, as ``data_loader.embeddings.normalize_embeddings``) before they are concatenated
    (300+300 = 600-d, as CaGNet). Raises one ``ConfigError`` listing every missing word of every file."""
    paths = [Path(vector_paths)] if isinstance(vector_paths, (str, os.PathLike)) else list(map(Path, vector_paths))
    names = [str(name).strip() for name in class_names]
    if not paths or not names:
        raise ConfigError("no word-vector file given" if not paths else "no class names given")
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise ConfigError(f"class {twice!r} is listed twice")
    if normalize not in (None, *NORMALIZATIONS):
        raise ConfigError(f"unknown normalization {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    reader, needed = _pick_reader(reader), lookup_words(names)
    parts, reports, errors = [], [], []
    for path in paths:
        layout = detect_layout(path, fmt)
        vectors = read_word_vectors(path, needed, layout.fmt, reader)
        found = [(name, *match_class(name, vectors)) for name in names]
        missing = [f"{word!r} (class {name!r})" for name, _, absent in found for word in absent]
        if missing:
            errors.append(f"{path}: no vector for {', '.join(missing)}")
            continue
        array = np.stack([np.mean([vectors[key] for key in match.keys], axis=0) for _, match, _ in found])
        bad = [name for name, row in zip(names, array) if not np.isfinite(row).all()]
        if bad:
            raise ConfigError(f"{path}: NaN or Inf in the vectors of {', '.join(map(repr, bad))}")
        parts.append(normalize_embeddings(torch.from_numpy(array.astype(np.float32)), normalize).numpy())
        reports.append(SourceReport(path, layout.fmt, reader, array.shape[1], tuple(m for _, m, _ in found)))
    if errors:
        raise ConfigError("; ".join(errors))
    return np.concatenate(parts, axis=1).astype(np.float32), reports


# ----------------------------------------------------------------------------- output


def check_output_path(path: PathLike) -> Path:
    """Refuse an output suffix that ``load_class_embeddings`` would not read as intended."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"{path}: output must end in {', '.join(OUTPUT_SUFFIXES)}")
    return path


def save_class_embeddings(array: np.ndarray, class_names: Sequence[str], path: PathLike) -> Path:
    """Write ``.npy`` (or ``.pt``) atomically plus the ``.classes.txt`` sidecar; returns the sidecar."""
    path = check_output_path(path)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if path.suffix.lower() == ".npy":
        atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))
    else:
        atomic_torch_save(torch.from_numpy(array), path)
    sidecar = classes_sidecar(path)
    write_text("".join(f"{name}\n" for name in class_names), sidecar)
    return sidecar
