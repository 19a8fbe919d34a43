"""Ordered class lists, ZS3/SPNet unseen-class presets and the seen/unseen split.

A class list is the label map of a dataset: index i is label value i (0 = background)
and row i of its embedding file. The config chooses a list (``data.classes``) and the
unseen classes (``data.unseen_classes``) by preset name, class names or indices.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from utils.util import ConfigError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Pascal-Context 59 + background in the row order of the published ZS3 Context embeddings.
CONTEXT_CLASSES: tuple[str, ...] = VOC_CLASSES + (
    "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup", "door",
    "fence", "floor", "flower", "food", "grass", "ground", "keyboard", "light", "mountain", "mouse", "curtain",
    "platform", "sign", "plate", "road", "rock", "shelves", "sidewalk", "sky", "snow", "bedclothes", "track",
    "tree", "truck", "wall", "water", "window", "wood",
)

# Label values of the common Pascal-Context PNG conversion (Detail API / mmsegmentation):
# 0 = background, then the 59 classes in alphabetical order ("diningtable" is called "table").
CONTEXT_PNG_CLASSES: tuple[str, ...] = ("background",) + tuple(
    sorted("table" if name == "diningtable" else name for name in CONTEXT_CLASSES[1:]))

BUILTIN_CLASS_LISTS: dict[str, tuple[str, ...]] = {
    "voc": VOC_CLASSES,
    "context": CONTEXT_CLASSES,
    "context-png": CONTEXT_PNG_CLASSES,
}


def _cumulative(steps: Sequence[Sequence[str]]) -> dict[str, tuple[str, ...]]:
    presets, names = {}, ()
    for step in steps:
        names = names + tuple(step)
        presets[f"zs3-{len(names)}"] = names
    return presets


# ZS3Net benchmark splits (cumulative: zs3-4 = zs3-2 + two more classes, ...).
# The official JoEm code encodes the 10th Context unseen class as index 2 (bicycle);
# we follow the ZS3 benchmark, which names aeroplane.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "voc": {
        **_cumulative([("cow", "motorbike"), ("airplane", "sofa"), ("cat", "tv"), ("train", "bottle"),
                       ("chair", "potted plant")]),
        # SPNet setting (use with "ignore_bg": true).
        "spnet": ("potted plant", "sheep", "sofa", "train", "tv"),
    },
    "context": _cumulative([("cow", "motorbike"), ("sofa", "cat"), ("boat", "fence"), ("bird", "tvmonitor"),
                            ("keyboard", "aeroplane")]),
}

# Spellings that name the same class; matching also ignores case, spaces, "_" and "-".
_ALIAS_GROUPS: tuple[tuple[str, ...], ...] = (
    ("aeroplane", "airplane", "plane"),
    ("tvmonitor", "tv", "monitor", "television"),
    ("motorbike", "motorcycle"),
    ("diningtable", "table"),
    ("pottedplant", "plant"),
    ("sofa", "couch"),
    ("background", "bg"),
)
_CANONICAL = {alias: group[0] for group in _ALIAS_GROUPS for alias in group}


def canonical_name(name: str) -> str:
    """Matching key of a class name: lower case, no separators, aliases folded."""
    key = re.sub(r"[\s_\-]+", "", str(name).lower())
    return _CANONICAL.get(key, key)


def _where(source: str) -> str:
    return f"(file {source})"


def load_class_names(spec: Any, key: str = "data.classes", source: str = "config") -> tuple[str, ...]:
    """Resolve a class list: a built-in name, a file (one name a line, or a JSON list) or a list.

    Duplicate names (after alias folding) are a ConfigError.
    """
    if isinstance(spec, str) and spec.lower() in BUILTIN_CLASS_LISTS:
        names = BUILTIN_CLASS_LISTS[spec.lower()]
    elif isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{key}: {str(spec)!r} is neither a built-in class list "
                              f"({', '.join(BUILTIN_CLASS_LISTS)}) nor a file {_where(source)}")
        text = path.read_text()
        if text.lstrip().startswith("["):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: invalid JSON class list ({err.msg} at line {err.lineno})") from None
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        source = str(path)
    elif isinstance(spec, (list, tuple)):
        names = spec
    else:
        raise ConfigError(f"{key}: expected a class-list name, a file or a list, got {spec!r} {_where(source)}")
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"{key}: class names must be a non-empty list of non-empty strings {_where(source)}")
    names = tuple(n.strip() for n in names)
    seen: dict[str, str] = {}
    for name in names:
        if canonical_name(name) in seen:
            raise ConfigError(f"{key}: duplicate class {name!r} (same as {seen[canonical_name(name)]!r}) "
                              f"{_where(source)}")
        seen[canonical_name(name)] = name
    return names


def class_index(names: Sequence[str]) -> dict[str, int]:
    """Map canonical name -> index for a class list."""
    return {canonical_name(name): i for i, name in enumerate(names)}


def _resolve_unseen(values: Iterable[Any], names: Sequence[str], key: str, source: str) -> tuple[int, ...]:
    index = class_index(names)
    resolved: list[int] = []
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(names):
                raise ConfigError(f"{key}: class index {value} out of range 0..{len(names) - 1} {_where(source)}")
            idx = value
        elif isinstance(value, str) and canonical_name(value) in index:
            idx = index[canonical_name(value)]
        else:
            raise ConfigError(f"{key}: unknown class {value!r} {_where(source)}; valid: {', '.join(names)}")
        if idx == 0:
            raise ConfigError(f"{key}: class {value!r} is the background (index 0) and cannot be unseen "
                              f"{_where(source)}")
        if idx in resolved:
            raise ConfigError(f"{key}: duplicate class {value!r} ({names[idx]}) {_where(source)}")
        resolved.append(idx)
    return tuple(sorted(resolved))


def _preset_family(data_cfg: dict) -> str:
    classes = data_cfg.get("classes")
    if isinstance(classes, str) and classes.lower() in PRESETS:
        return classes.lower()
    return str(data_cfg.get("type", "")).lower()


@dataclass(frozen=True)
class ClassSplit:
    """Ordered class names, the sorted unseen indices and whether background is ignored."""

    names: tuple[str, ...]
    unseen: tuple[int, ...]
    ignore_bg: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "unseen", tuple(sorted(int(i) for i in self.unseen)))
        object.__setattr__(self, "ignore_bg", bool(self.ignore_bg))
        bad = [i for i in self.unseen if not 0 < i < len(self.names)]
        if bad or len(set(self.unseen)) != len(self.unseen):
            raise ConfigError(f"class split: unseen indices {list(self.unseen)} must be distinct and in "
                              f"1..{len(self.names) - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def seen(self) -> tuple[int, ...]:
        """Every index that is not unseen, background (0) included."""
        unseen = set(self.unseen)
        return tuple(i for i in range(self.num_classes) if i not in unseen)

    @property
    def seen_object(self) -> tuple[int, ...]:
        """Seen classes without the background."""
        return tuple(i for i in self.seen if i != 0)

    @property
    def unseen_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.unseen)

    @property
    def seen_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.seen)

    def unseen_mask(self) -> torch.Tensor:
        """Bool tensor ``[num_classes]``, True at unseen classes."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[list(self.unseen)] = True
        return mask

    def to_dict(self) -> dict:
        """JSON-able form (stored in checkpoints)."""
        return {"names": list(self.names), "unseen": list(self.unseen), "ignore_bg": self.ignore_bg}

    @classmethod
    def from_dict(cls, data: dict) -> "ClassSplit":
        return cls(tuple(data["names"]), tuple(data["unseen"]), bool(data.get("ignore_bg", False)))


def parse_class_split(data_cfg: dict, source: str = "config") -> ClassSplit:
    """Build the :class:`ClassSplit` from a config's ``data`` section.

    ``classes``: built-in list name, class-list file or list; ``unseen_classes``: a preset
    name (``zs3-2`` ... ``zs3-10``, ``spnet``) or a list of class names and/or indices.
    """
    if "classes" not in data_cfg:
        raise ConfigError(f"data.classes: missing (file {source})")
    names = load_class_names(data_cfg["classes"], "data.classes", source)
    unseen = data_cfg.get("unseen_classes", [])
    key = "data.unseen_classes"
    if isinstance(unseen, str):
        family = _preset_family(data_cfg)
        presets = PRESETS.get(family, {})
        if unseen.lower() not in presets:
            valid = ", ".join(presets) if presets else f"none for {family!r}; give a list of class names"
            raise ConfigError(f"{key}: unknown preset {unseen!r} {_where(source)}; valid: {valid}")
        unseen = presets[unseen.lower()]
        key = f"{key} (preset {data_cfg['unseen_classes']!r})"
    elif not isinstance(unseen, (list, tuple)):
        raise ConfigError(f"{key}: expected a preset name or a list, got {unseen!r} {_where(source)}")
    ignore_bg = data_cfg.get("ignore_bg", False)
    if not isinstance(ignore_bg, bool):
        raise ConfigError(f"data.ignore_bg: expected true or false, got {ignore_bg!r} {_where(source)}")
    return ClassSplit(names, _resolve_unseen(unseen, names, key, source), ignore_bg)
