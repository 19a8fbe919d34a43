"""Word-vector files (word2vec binary/text, GloVe, fastText ``.vec``) to class embeddings.

``read_word_vectors`` reads the vectors of some words from a word-vector file;
``resolve_class_embeddings`` turns class names ("potted plant", "tvmonitor") into one row
each: multi-word names average their words, a phrase token ("potted_plant") is preferred
when the vocabulary has one, case variants and the project's alias spellings
(``data_loader.classes``: "pottedplant" -> "potted plant", "airplane" -> "aeroplane", ...)
are tried, and every missing word of every class is reported in one ``ConfigError``.

Reader choice: gensim's ``KeyedVectors.load_word2vec_format`` is the well-kept reader for
these formats and is used when gensim is importable. It is an optional dependency only
(gensim pulls in scipy and compiled extensions, far too heavy for reading a few hundred
vectors) and it loads the whole file (3.6 GB of RAM for GoogleNews). Without it, a small
built-in streaming reader is used: it reads one entry at a time and keeps only the
requested words, so memory stays at a few MB whatever the file size.
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


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    return Path(name[:-3] if name.endswith(".gz") else name).suffix


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


def _trailing_floats(line: bytes) -> int:
    """How many whitespace-separated numbers end the line (the word itself is never counted)."""
    parts = line.split()
    count = 0
    for part in reversed(parts[1:]):
        try:
            float(part)
        except ValueError:
            break
        count += 1
    return count


def _glove_dim(first: bytes, second: bytes) -> int:
    """Vector length of a header-less file: the smaller count of trailing numbers of its first
    two lines, so a word with spaces ("potted plant 0.1 ...") or a numeric word ("2009 0.1 ...")
    on one of them does not change it."""
    counts = [_trailing_floats(line) for line in (first, second) if line.strip()]
    return min(counts) if counts else 0


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
            is_text = count == 0 or _text_entry(second, dim) is not None
            fmt = ("fasttext" if _base_suffix(path) == ".vec" else "word2vec-text") if is_text else "word2vec-bin"
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


def _iter_text(handle: BinaryIO, layout: Layout) -> Iterator[tuple[int, bytes, bytes]]:
    """(line number, first space-separated token, whole line) per data line."""
    for number, line in enumerate(handle, start=1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
            if layout.header:
                continue
        space = line.find(b" ")
        if space > 0:
            yield number, line[:space], line


def _read_builtin(path: Path, layout: Layout, words: set[str] | None) -> dict[str, np.ndarray]:
    wanted = None if words is None else {w.encode("utf-8"): w for w in words}
    found: dict[str, np.ndarray] = {}

    def keep(raw: bytes) -> str | None:
        if wanted is None:
            key = raw.decode("utf-8", errors="replace")
            return None if key in found else key
        key = wanted.get(raw)
        return None if key is None or key in found else key  # first occurrence wins

    with _open(path) as handle:
        if layout.binary:
            handle.readline(_SNIFF_LIMIT)  # the header
            for raw, data in _iter_binary(handle, layout.count or 0, layout.dim or 0):
                if (key := keep(raw)) is not None:
                    found[key] = np.frombuffer(data, dtype="<f4").astype(np.float32)
            return found
        for number, raw, line in _iter_text(handle, layout):
            if wanted is not None and (raw not in wanted or wanted[raw] in found):
                continue  # cheap skip: most lines of a big file are not wanted
            entry = _text_entry(line, layout.dim)
            word = entry[0] if entry else b""
            if entry is None or (word != raw and _parse_floats(word.split()[1:]) is not None):
                raise ConfigError(f"{path}: line {number}: expected a word and {layout.dim} values")
            if wanted is not None and word != raw:
                continue  # a token with spaces ("potted plant 0.1 ..."), not the word asked for
            vector = entry[1]
            if (key := keep(word)) is not None:
                found[key] = vector
    return found


def _read_gensim(path: Path, layout: Layout, words: set[str] | None) -> dict[str, np.ndarray]:
    from gensim.models import KeyedVectors  # optional dependency, see the module docstring

    try:
        vectors = KeyedVectors.load_word2vec_format(
            str(path), binary=layout.binary, no_header=not layout.header, unicode_errors="replace")
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise ConfigError(f"{path}: gensim cannot read it ({type(err).__name__}: {err})") from None
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
    """Vectors (float32, 1-D) of ``words`` found in ``path`` (all words when ``words`` is None).

    ``fmt``: one of ``FORMATS`` (``auto`` looks at the content); ``.gz`` files work.
    ``reader``: ``auto`` (gensim if importable, else built-in), ``builtin`` or ``gensim``.
    Words absent from the file are simply absent from the result.
    """
    path = Path(path)
    layout = detect_layout(path, fmt)
    read = _read_gensim if _pick_reader(reader) == "gensim" else _read_builtin
    try:
        return read(path, layout, words)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
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
    variants = [token, token.lower(), token[:1].upper() + token[1:].lower(), token.upper()]
    return list(dict.fromkeys(variants))


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
    """Find a class name in ``vocab`` (anything supporting ``in``): (match, missing words).

    When the name itself has a missing word, the other spellings of its alias group
    (``data_loader.classes.alias_spellings``) are tried in order; the missing words
    reported are those of the name as written.
    """
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


class _Recorder:
    """A vocabulary that has nothing and remembers every lookup: the words to read."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __contains__(self, key: str) -> bool:
        self.asked.add(key)
        return False


def lookup_words(class_names: Iterable[str]) -> set[str]:
    """Every vocabulary key that matching these class names may ask for."""
    recorder = _Recorder()
    for name in class_names:
        match_class(name, recorder)
    return recorder.asked


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class SourceReport:
    """One vector file's part of the embedding."""

    path: Path
    fmt: str
    reader: str
    dim: int
    matches: tuple[ClassMatch, ...]


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(name).strip() for name in class_names]
    if not names:
        raise ConfigError("no class names given")
    seen: set[str] = set()
    for name in names:
        if not name_tokens(name):
            raise ConfigError(f"empty class name in {list(class_names)!r}")
        if name in seen:
            raise ConfigError(f"class {name!r} is listed twice")
        seen.add(name)
    return names


def _embed_source(path: Path, names: list[str], needed: set[str], fmt: str,
                  reader: str) -> tuple[np.ndarray | None, SourceReport | None, str | None]:
    """(rows, report, None) or (None, None, one error fragment listing the missing words)."""
    layout = detect_layout(path, fmt)
    vectors = read_word_vectors(path, needed, layout.fmt, reader)
    rows, matches, missing = [], [], []
    for name in names:
        match, absent = match_class(name, vectors)
        missing += [f"{word!r} (class {name!r})" for word in absent]
        if match is not None:
            rows.append(np.mean([vectors[key] for key in match.keys], axis=0))
            matches.append(match)
    if missing:
        return None, None, f"{path}: no vector for {', '.join(missing)}"
    dims = {row.shape[0] for row in rows}
    if len(dims) != 1:
        raise ConfigError(f"{path}: vectors of different lengths {sorted(dims)}")
    array = np.stack(rows).astype(np.float32)
    if not np.isfinite(array).all():
        bad = [name for name, row in zip(names, array) if not np.isfinite(row).all()]
        raise ConfigError(f"{path}: NaN or Inf in the vectors of {', '.join(map(repr, bad))}")
    report = SourceReport(path, layout.fmt, _pick_reader(reader), array.shape[1], tuple(matches))
    return array, report, None


def resolve_class_embeddings(vector_paths: PathLike | Sequence[PathLike], class_names: Sequence[str],
                             normalize: str | None = None, fmt: str = "auto",
                             reader: str = "auto") -> tuple[np.ndarray, list[SourceReport]]:
    """float32 ``len(class_names) x sum(dims)`` array (rows in class order) and, per vector file, how
    each class name was found. One embedding per vector file, each normalised (``none``/``l2``/
    ``max_norm``, as ``data_loader.embeddings.normalize_embeddings``) before they are concatenated
    (300+300 = 600-d, as CaGNet). Raises one ``ConfigError`` listing every missing word of every file."""
    paths = [Path(vector_paths)] if isinstance(vector_paths, (str, os.PathLike)) else list(map(Path, vector_paths))
    if not paths:
        raise ConfigError("no word-vector file given")
    if normalize not in (None, *NORMALIZATIONS):
        raise ConfigError(f"unknown normalization {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    _pick_reader(reader)
    names = _check_class_names(class_names)
    needed = lookup_words(names)
    parts, reports, errors = [], [], []
    for path in paths:
        array, report, error = _embed_source(path, names, needed, fmt, reader)
        if error:
            errors.append(error)
            continue
        parts.append(normalize_embeddings(torch.from_numpy(array), normalize).numpy())
        reports.append(report)
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
