"""Class embeddings (``data.embeddings``): files read as float tensors, their rows picked by class
name, several files concatenated. Formats: ``.npy`` (no pickles), ``.pt``/``.pth`` (``weights_only``)
and data-only ``.pkl`` pickles (latin-1, numpy arrays only); anything but a 2-D numeric array is
refused. ``X.npy`` may name its rows in ``X.classes.txt`` beside it (:func:`classes_sidecar`).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from data_loader.classes import BUILTIN_CLASS_LISTS, canonical_name, load_class_names, match_names, parse_aliases
from utils.errors import ConfigError
from utils.schema import NORMALIZATIONS, EmbeddingsSection
from utils.sections import parse_section


class _DataOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays (and nothing else); anything executable is refused."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # encode: protocol-2 bytes
                *((f"numpy.{core}.{module}", name) for core in ("core", "_core") for module, name in
                  (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")))}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a numeric array")


def load_class_embeddings(path: str | Path, normalize: str | None = None) -> torch.Tensor:
    """One embedding file as a float32 tensor ``rows x dim``, normalised as asked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: embedding file not found")
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            obj = np.load(io.BytesIO(raw), allow_pickle=False)
        elif raw[:2] == b"PK" or suffix in (".pt", ".pth"):
            # torch.save zip archive (also used by some files named .pkl)
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        else:
            obj = _DataOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise ConfigError(f"{path}: cannot read embeddings ({type(err).__name__}: {err})") from None
    if isinstance(obj, np.ndarray):
        if not np.issubdtype(obj.dtype, np.number):
            raise ConfigError(f"{path}: embeddings must be a numeric array, got dtype {obj.dtype}")
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if not isinstance(obj, torch.Tensor) or obj.dtype == torch.bool or obj.is_complex():
        raise ConfigError(f"{path}: embeddings must be a numeric array, got {type(obj).__name__}")
    if obj.dim() != 2:
        raise ConfigError(f"{path}: embeddings must be 2-D (classes x dims), got shape {tuple(obj.shape)}")
    obj = obj.to(torch.float32)
    if not torch.isfinite(obj).all():
        raise ConfigError(f"{path}: embeddings contain NaN or Inf")
    return normalize_embeddings(obj, normalize)


def classes_sidecar(path: str | Path) -> Path:
    """``X.npy`` -> ``X.classes.txt``: the file beside an embedding file naming its rows, one per line."""
    path = Path(path)
    return path.with_name(f"{path.stem}.classes.txt")


def normalize_embeddings(embeddings: torch.Tensor, mode: str | None) -> torch.Tensor:
    """``l2``: every row to unit norm; ``max_norm``: divide all rows by the largest row norm
    (what the official JoEm code does); ``None``/``"none"``: unchanged."""
    if mode in (None, "none"):
        return embeddings
    norms = embeddings.norm(dim=1, keepdim=True)
    if mode == "l2":
        return embeddings / norms.clamp_min(1e-12)
    if mode == "max_norm":
        return embeddings / norms.max().clamp_min(1e-12)
    raise ConfigError(f"unknown normalization {mode!r}; valid: {', '.join(NORMALIZATIONS)}")


def embedding_row_names(path: Path, spec: Any, source: str | None = "config",
                        key: str = "data.embeddings.names") -> tuple[tuple[str, ...] | None, str]:
    """The names of an embedding file's rows and where they come from: ``spec`` (a built-in
    list, a file, a list or a comma string), else the file's ``.classes.txt`` sidecar, else
    (None, "")."""
    if spec is not None:
        where = f"the built-in list {spec!r}" if isinstance(spec, str) and spec.lower() in BUILTIN_CLASS_LISTS \
            else str(spec) if isinstance(spec, str) else key
        return load_class_names(spec, key, source), where
    sidecar = classes_sidecar(path)
    if sidecar.is_file():
        return load_class_names(sidecar, f"{key}: row names of {path}", source), str(sidecar)
    return None, ""


def class_embeddings(spec: EmbeddingsSection | Mapping, class_names: Sequence[str],
                     source: str = "config") -> torch.Tensor:
    """The ``data.embeddings`` rows of ``class_names`` (``len(class_names) x dim`` float32): each file
    normalised whole, then its rows picked by name (:func:`embedding_row_names`, ``aliases``) or, with
    no row names, taken in class order; the files concatenated. Rows not found are one ConfigError."""
    if spec is None:
        raise ConfigError(f"data.embeddings: missing (file {source})")
    if not isinstance(spec, EmbeddingsSection):
        spec = parse_section(EmbeddingsSection, spec, "data.embeddings", source)
    if not spec.files:
        raise ConfigError(f"data.embeddings.paths: missing (file {source})")
    aliases = parse_aliases(spec.aliases, class_names, "data.embeddings.aliases", source)
    parts, named = [], False
    for path in map(Path, spec.files):
        table = load_class_embeddings(path, spec.normalize)
        row_names, where = embedding_row_names(path, spec.names, source)
        if row_names is None:
            if table.shape[0] != len(class_names):
                raise ConfigError(f"{path}: has {table.shape[0]} rows but the class list has {len(class_names)} "
                                  f"classes (name its rows with data.embeddings.names or {classes_sidecar(path).name} "
                                  f"to pick them by class name)")
            parts.append(table)
            continue
        named = True
        if len(row_names) != table.shape[0]:
            raise ConfigError(f"{path}: has {table.shape[0]} rows but {len(row_names)} row names in {where} "
                              f"(file {source})")
        rows = match_names(class_names, row_names, aliases)
        missing = [f"{name!r}" + (f" (alias {aliases[canonical_name(name)]!r})" if canonical_name(name) in aliases
                                  else "") for name, row in zip(class_names, rows) if row is None]
        if missing:
            raise ConfigError(f"data.embeddings: no row for {', '.join(missing)} in {path} (rows named by {where}); "
                              f"add data.embeddings.aliases, or leave such a class out of data.classes and ignore "
                              f"its pixels with data.ignore_labels (file {source})")
        parts.append(table[rows])
    if aliases and not named:
        raise ConfigError(f"data.embeddings.aliases: the embedding files have no row names (give "
                          f"data.embeddings.names or a .classes.txt beside each file) (file {source})")
    return torch.cat(parts, dim=1)
