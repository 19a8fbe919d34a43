"""A procedural colour x texture segmentation benchmark where zero-shot transfer is learnable.

Each object class is a (colour, texture) pair, e.g. "blue checker", both visible locally; its
embedding is ``[one-hot colour | one-hot texture | background flag]`` through a fixed random
orthogonal projection plus noise, so an unseen class composes attributes that seen classes carry.
Deterministic from its parameters; writes a VOC-layout tree with ``classes.txt`` and ``embeddings.npy``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from utils.errors import ConfigError, StorageError
from utils.schema import SyntheticSection
from utils.util import make_dirs
from utils.visualization import mask_image

GENERATOR_VERSION = 1
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 215), "yellow": (225, 200, 45),
    "magenta": (200, 50, 190), "cyan": (45, 195, 205), "orange": (235, 130, 35), "purple": (120, 50, 170),
}
DARK = 0.35  # brightness of the dark half of a texture


# Bright (True) / dark pixels of each texture, from the row and column grids (same shape) and the period.
TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "solid": lambda yy, xx, period: np.ones(yy.shape, dtype=bool),
    "hstripe": lambda yy, xx, period: (yy % period) < period // 2,
    "vstripe": lambda yy, xx, period: (xx % period) < period // 2,
    "checker": lambda yy, xx, period: ((yy % period) < period // 2) ^ ((xx % period) < period // 2),
    "diagonal": lambda yy, xx, period: ((yy + xx) % period) < period // 2,
}


def identity(params: SyntheticSection) -> dict:
    """Everything that changes the generated data (not ``cache_dir``), with the generator version."""
    content = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items() if k != "cache_dir"}
    return {**content, "version": GENERATOR_VERSION}


def cache_folder(params: SyntheticSection) -> Path:
    """``<cache_dir>/synthetic-<digest of the parameters>``; unknown colour or texture names are refused."""
    for key, options in (("colours", PALETTE), ("textures", TEXTURES)):
        if not set(getattr(params, key)) <= set(options):
            raise ConfigError(f"data.synthetic.{key}: {getattr(params, key)!r} must be distinct names from "
                              f"{', '.join(options)}")
    digest = hashlib.sha256(json.dumps(identity(params), sort_keys=True).encode()).hexdigest()[:12]
    return Path(params.cache_dir) / f"synthetic-{digest}"


def class_names(params: SyntheticSection) -> list[str]:
    """``background`` then ``"<colour> <texture>"``, colour-major."""
    return ["background"] + [f"{c} {t}" for c in params.colours for t in params.textures]


def class_attributes(params: SyntheticSection) -> np.ndarray:
    """Rows ``[one-hot colour | one-hot texture | background flag]`` for every class."""
    n_col, n_tex = len(params.colours), len(params.textures)
    attrs = np.zeros((1 + n_col * n_tex, n_col + n_tex + 1), dtype=np.float64)
    attrs[0, -1] = 1.0
    attrs[1:, :n_col] = np.repeat(np.eye(n_col), n_tex, axis=0)   # class 1 + c * n_tex + t: colour c
    attrs[1:, n_col:-1] = np.tile(np.eye(n_tex), (n_col, 1))      # ... and texture t
    return attrs


def attribute_projection(params: SyntheticSection) -> np.ndarray:
    """The fixed random orthonormal ``embed_dim x num_attributes`` projection."""
    rng = np.random.default_rng([params.seed, 1])
    k = len(params.colours) + len(params.textures) + 1
    q, r = np.linalg.qr(rng.standard_normal((params.embed_dim, k)))
    return q * np.sign(np.diag(r))


def class_embeddings(params: SyntheticSection) -> np.ndarray:
    """``num_classes x embed_dim`` float32: projected attributes + noise of norm ~``embed_noise``."""
    rng = np.random.default_rng([params.seed, 2])
    attrs = class_attributes(params)
    noise = rng.standard_normal((attrs.shape[0], params.embed_dim)) * params.embed_noise / np.sqrt(params.embed_dim)
    return (attrs @ attribute_projection(params).T + noise).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A desaturated grey with smooth low-frequency blotches, HxWx3 float."""
    coarse = torch.from_numpy(rng.standard_normal((1, 1, 6, 6))).float() * 22.0
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    level = rng.uniform(70, 170)
    tint = rng.uniform(-10, 10, size=3)
    return level + smooth[..., None] + tint


def _shape_mask(rng: np.random.Generator, size: int, radius_range: tuple[float, float]) -> np.ndarray:
    """A random ellipse, regular polygon or blob at a random position, size and rotation."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    r0 = rng.uniform(*radius_range) * size
    angle = rng.uniform(0, 2 * np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    kind = rng.integers(3)
    if kind == 0:  # ellipse
        aspect = rng.uniform(0.45, 1.0)
        return (u / r0) ** 2 + (v / (aspect * r0)) ** 2 <= 1.0
    phi, rho = np.arctan2(v, u), np.hypot(u, v)
    if kind == 1:  # regular polygon
        n = int(rng.integers(3, 7))
        sector = 2 * np.pi / n
        return rho <= r0 * np.cos(np.pi / n) / np.cos(np.mod(phi, sector) - np.pi / n)
    harmonics = sum(rng.uniform(-0.2, 0.2) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in range(2, 5))
    return rho <= r0 * (1.0 + harmonics)  # blob


def render(params: SyntheticSection, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8) and its label (HxW uint8, 0 = background)."""
    size, n_tex = params.image_size, len(params.textures)
    num_classes = 1 + len(params.colours) * n_tex
    image = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    low, high = params.objects_per_image
    for _ in range(int(rng.integers(low, high + 1))):
        cls = int(rng.integers(1, num_classes))
        colour, texture = divmod(cls - 1, n_tex)
        mask = _shape_mask(rng, size, params.object_radius)
        dy, dx = rng.integers(0, params.stripe_period, size=2)
        pattern = TEXTURES[params.textures[texture]](yy + dy, xx + dx, params.stripe_period)
        rgb = np.array(PALETTE[params.colours[colour]], dtype=np.float64)
        rgb = rgb * rng.uniform(1 - params.colour_jitter, 1 + params.colour_jitter, size=3)
        shade = np.where(pattern, 1.0, DARK)[..., None] * rgb
        image[mask] = shade[mask]
        label[mask] = cls
    image = image + rng.standard_normal(image.shape) * params.noise_std
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def samples(params: SyntheticSection) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """Every ``(split, name, image, label)``; sample i of a split depends only on (seed, split, i)."""
    for split_id, (split, count) in enumerate((("train", params.num_train), ("val", params.num_val))):
        for i in range(count):
            rng = np.random.default_rng([params.seed, 100 + split_id, i])
            image, label = render(params, rng)
            yield split, f"{split}_{i:06d}", image, label


def write_tree(params: SyntheticSection, folder: Path, progress: bool = True) -> None:
    """Write the VOC-layout tree, ``classes.txt``, ``embeddings.npy`` and ``params.json``."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True)
    lists = {"train": [], "val": []}
    total = params.num_train + params.num_val
    for split, name, image, label in tqdm(samples(params), total=total, desc="generating synthetic data",
                                          disable=not progress, leave=False):
        Image.fromarray(image).save(folder / "JPEGImages" / f"{name}.png", compress_level=1)
        mask_image(torch.from_numpy(label)).save(folder / "SegmentationClass" / f"{name}.png", compress_level=1)
        lists[split].append(name)
    for split, names in lists.items():
        (folder / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    (folder / "classes.txt").write_text("\n".join(class_names(params)) + "\n")
    np.save(folder / "embeddings.npy", class_embeddings(params))
    (folder / "params.json").write_text(json.dumps(identity(params), indent=2) + "\n")


def ensure_synthetic(params: SyntheticSection, progress: bool = True) -> Path:
    """The cache folder, generated unless it is there: written aside and renamed into place, so that
    concurrent callers never see a half-written tree (the loser of the race discards its copy)."""
    folder = cache_folder(params)
    if folder.is_dir():
        return folder
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=make_dirs(folder.parent)))
        write_tree(params, tmp / "tree", progress)
        try:
            os.rename(tmp / "tree", folder)
        except OSError:
            if not folder.is_dir():
                raise
    except OSError as err:
        raise StorageError(f"cannot write the synthetic data into {folder.parent}: {err.strerror or err}; set "
                           "data.synthetic.cache_dir to a writable folder") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
