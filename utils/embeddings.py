"""Loading class-embedding files (word2vec, fastText, ...) as one float tensor.

Supported formats: ``.npy`` (numpy, no pickles), ``.pt``/``.pth`` (``torch.load``
with ``weights_only=True``) and data-only pickles (``.pkl``: read with encoding
latin-1 by a restricted unpickler that only rebuilds numpy arrays / torch tensors).
Files whose content is not a 2-D numeric array are refused with an error naming the file.
An embedding file ``X.npy`` may name its rows in ``X.classes.txt`` beside it
(:func:`classes_sidecar`; written by build_embeddings.py, read by the data loader and predict.py).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.errors import ConfigError

NORMALIZATIONS = (None, "none", "l2", "max_norm")


class _DataOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays (and nothing else); anything executable is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol-2 (Python 2 era) pickles
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a numeric array")


def _to_tensor(obj, path: Path) -> torch.Tensor:
    if isinstance(obj, np.ndarray):
        if not np.issubdtype(obj.dtype, np.number):
            raise ConfigError(f"{path}: embeddings must be a numeric array, got dtype {obj.dtype}")
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if not isinstance(obj, torch.Tensor) or obj.dtype == torch.bool or obj.is_complex():
        raise ConfigError(f"{path}: embeddings must be a numeric array, got {type(obj).__name__}")
    if obj.dim() != 2:
        raise ConfigError(f"{path}: embeddings must be 2-D (classes x dims), got shape {tuple(obj.shape)}")
    tensor = obj.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ConfigError(f"{path}: embeddings contain NaN or Inf")
    return tensor


def _read_one(path: Path) -> torch.Tensor:
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
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise ConfigError(f"{path}: cannot read embeddings ({type(err).__name__}: {err})") from None
    return _to_tensor(obj, path)


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
    raise ConfigError(f"embeddings.normalize: unknown value {mode!r}; valid: {NORMALIZATIONS[1:]}")


def load_class_embeddings(paths: str | Path | Sequence[str | Path], normalize: str | None = None,
                          num_classes: int | None = None) -> torch.Tensor:
    """Load one or several embedding files and concatenate them along the feature axis.

    ``normalize`` is applied to each file before concatenation (so word2vec and fastText
    weigh the same in a 600-d CaGNet-style embedding). ``num_classes`` checks the row count.
    Returns a float32 tensor ``num_classes x dim``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("embeddings: no embedding file given")
    parts = []
    for path in map(Path, paths):
        tensor = normalize_embeddings(_read_one(path), normalize)
        if num_classes is not None and tensor.shape[0] != num_classes:
            raise ConfigError(f"{path}: has {tensor.shape[0]} rows but the class list has {num_classes} classes")
        if parts and tensor.shape[0] != parts[0].shape[0]:
            raise ConfigError(f"{path}: has {tensor.shape[0]} rows, {paths[0]} has {parts[0].shape[0]}")
        parts.append(tensor)
    return torch.cat(parts, dim=1)
