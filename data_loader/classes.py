"""Ordered class lists (index i = label value i = embedding row i, or the row of the same name),
ZS3/SPNet unseen-class presets, the seen/unseen split, and the one home of class-name rules:
reading a list, the alias table, and matching names to the rows of a named table.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from utils.errors import ConfigError
from utils.schema import SPLIT_IGNORE_BG, UNSEEN_KEY, DataSection, as_data_section

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
        # SPNet setting (use with the background ignored).
        "spnet": ("potted plant", "sheep", "sofa", "train", "tv"),
    },
    "context": _cumulative([("cow", "motorbike"), ("sofa", "cat"), ("boat", "fence"), ("bird", "tvmonitor"),
                            ("keyboard", "aeroplane")]),
}

# Spellings that name the same class, the first being the canonical one. Class-name
# matching (canonical_name) ignores case, spaces, "_" and "-" and folds each group to its
# first name; word lookup (data_loader.word_vectors) tries the other spellings of a group,
# in this order, when a name itself has no vector ("pottedplant" -> "potted plant").
_ALIAS_GROUPS: tuple[tuple[str, ...], ...] = (
    ("aeroplane", "airplane", "plane"),
    ("tvmonitor", "tv monitor", "tv", "monitor", "television"),
    ("motorbike", "motorcycle"),
    ("diningtable", "dining table", "table"),
    ("pottedplant", "potted plant", "plant"),
    ("sofa", "couch"),
    ("background", "bg"),
)
NAME_SEPARATORS = re.compile(r"[\s_\-]+")   # between the words of a class name: spaces, _ and -


def _key(name: str) -> str:
    return NAME_SEPARATORS.sub("", str(name).lower())


_GROUP_OF = {_key(alias): group for group in _ALIAS_GROUPS for alias in group}


def canonical_name(name: str) -> str:
    """Matching key of a class name: lower case, no separators, aliases folded."""
    key = _key(name)
    return _key(_GROUP_OF[key][0]) if key in _GROUP_OF else key


def alias_spellings(name: str) -> tuple[str, ...]:
    """The other spellings of ``name``'s alias group, in table order (empty if it has none)."""
    return tuple(alias for alias in _GROUP_OF.get(_key(name), ()) if alias.lower() != str(name).strip().lower())


def _where(source: str | None) -> str:
    return f" (file {source})" if source else ""


def load_class_names(spec: Any, key: str = "data.classes", source: str | None = "config") -> tuple[str, ...]:
    """A class list from a built-in name, a file (one name a line, or a JSON list), a list or a
    ``"name,name"`` string (else one name); duplicates (aliases folded) are a ConfigError naming
    ``key`` and ``source`` (None: not a file, e.g. a command-line option)."""
    if isinstance(spec, str) and spec.strip().lower() in BUILTIN_CLASS_LISTS:
        names = BUILTIN_CLASS_LISTS[spec.strip().lower()]
    elif (isinstance(spec, Path) or (isinstance(spec, str) and "," not in spec)) and Path(spec).is_file():
        path = Path(spec)
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: invalid JSON class list ({err.msg} at line {err.lineno})") from None
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        source = str(path)
    elif isinstance(spec, str):
        suffix = Path(spec.strip()).suffix.lower()
        looks_like_file = "/" in spec or "\\" in spec or suffix in (".txt", ".json", ".lst", ".csv", ".names")
        if "," not in spec and looks_like_file:
            raise ConfigError(f"{key}: {spec!r} is neither a built-in class list "
                              f"({', '.join(BUILTIN_CLASS_LISTS)}) nor a file{_where(source)}")
        names = [name for name in spec.split(",") if name.strip()]
    elif isinstance(spec, (list, tuple)):
        names = spec
    else:
        raise ConfigError(f"{key}: expected a class-list name, a file, a list or 'name,name,...', "
                          f"got {spec!r}{_where(source)}")
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"{key}: class names must be a non-empty list of non-empty strings{_where(source)}")
    names = tuple(n.strip() for n in names)
    keys = [canonical_name(name) for name in names]
    twice = next((i for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise ConfigError(f"{key}: duplicate class {names[twice]!r} (same as {names[keys.index(keys[twice])]!r})"
                          f"{_where(source)}")
    return names


def class_index(names: Sequence[str]) -> dict[str, int]:
    """Map canonical name -> index for a class list."""
    return {canonical_name(name): i for i, name in enumerate(names)}


def resolve_indices(values: Iterable[Any], names: Sequence[str], *, out_of_range: Callable[[int], str] | None,
                    unknown: Callable[[Any], str], duplicate: Callable[[Any, int], str],
                    check: Callable[[Any, int], str | None] = lambda value, index: None,
                    limit: int | None = None) -> list[int]:
    """The index of each value (an integer below ``limit``, default ``len(names)``, or a name of
    ``names``), in order. Each callback gives the ConfigError message of its case (``out_of_range``
    None: integers are refused); ``check`` may refuse an index."""
    index = class_index(names)
    resolved: list[int] = []
    for value in values:
        if out_of_range is not None and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < (len(names) if limit is None else limit):
                raise ConfigError(out_of_range(value))
            idx = value
        elif isinstance(value, str) and canonical_name(value) in index:
            idx = index[canonical_name(value)]
        else:
            raise ConfigError(unknown(value))
        problem = check(value, idx)
        if problem:
            raise ConfigError(problem)
        if idx in resolved:
            raise ConfigError(duplicate(value, idx))
        resolved.append(idx)
    return resolved


@dataclass(frozen=True)
class ClassSplit:
    """Ordered class names, the sorted unseen indices, whether background is ignored and whether
    class 0 is a background at all (if so it is never unseen nor in :attr:`seen_object`)."""

    names: tuple[str, ...]
    unseen: tuple[int, ...]
    ignore_bg: bool = False
    has_background: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "unseen", tuple(sorted(int(i) for i in self.unseen)))
        first = 1 if self.has_background else 0
        bad = [i for i in self.unseen if not first <= i < len(self.names)]
        if bad or len(set(self.unseen)) != len(self.unseen):
            raise ConfigError(f"class split: unseen indices {list(self.unseen)} must be distinct and in "
                              f"{first}..{len(self.names) - 1}")
        if self.ignore_bg and not self.has_background:
            raise ConfigError("class split: an ignored background needs a background class (class 0 is not one)")

    @property
    def never_predicted(self) -> tuple[int, ...]:
        """Classes inference never chooses: an ignored background (trained on no pixel)."""
        return (0,) if self.ignore_bg else ()

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
        """Seen classes without the background (all seen classes when there is none)."""
        return tuple(i for i in self.seen if i != 0 or not self.has_background)

    @property
    def unseen_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.unseen)

    @property
    def seen_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.seen)

    def to_dict(self) -> dict:
        """JSON-able form (stored in checkpoints)."""
        return {"names": list(self.names), "unseen": list(self.unseen), SPLIT_IGNORE_BG: self.ignore_bg,
                "has_background": self.has_background}

    @classmethod
    def from_dict(cls, data: dict) -> "ClassSplit":
        """Inverse of :meth:`to_dict`; dicts written before ``has_background`` existed have one."""
        return cls(tuple(data["names"]), tuple(data["unseen"]), bool(data.get(SPLIT_IGNORE_BG, False)),
                   bool(data.get("has_background", True)))


def has_background(data: DataSection, names: Sequence[str]) -> bool:
    """``data.background``; by default true for the built-in dataset types, and for
    ``Custom`` whether class 0 is named background (or an alias of it, e.g. ``bg``)."""
    if data.background is None:
        return data.type != "Custom" or canonical_name(names[0]) == "background"
    return data.background


def parse_class_split(data: DataSection | Mapping, source: str = "config") -> ClassSplit:
    """The :class:`ClassSplit` of a ``data`` section: ``classes`` (see :func:`load_class_names`) and
    ``unseen_classes``, a preset name (``zs3-2`` ... ``zs3-10``, ``spnet``) or class names / indices."""
    data = as_data_section(data, source)
    if data.classes is None:
        raise ConfigError(f"data.classes: missing (file {source})")
    names = load_class_names(data.classes, "data.classes", source)
    if len(names) < 2:
        raise ConfigError(f"data.classes: {data.classes!r} is neither a built-in class list "
                          f"({', '.join(BUILTIN_CLASS_LISTS)}), a file, nor a list of two or more classes"
                          f"{_where(source)}")
    background = has_background(data, names)
    if not background and data.background_problem(names[0]):
        raise ConfigError(f"{data.background_problem(names[0])}{_where(source)}")
    unseen, key = data.unseen_classes, UNSEEN_KEY
    if isinstance(unseen, str):
        classes = data.classes.lower() if isinstance(data.classes, str) else ""
        family = classes if classes in PRESETS else data.type.lower()
        presets = PRESETS.get(family, {})
        if unseen.lower() not in presets:
            valid = ", ".join(presets) if presets else f"none for {family!r}; give a list of class names"
            raise ConfigError(f"{key}: unknown preset {unseen!r}{_where(source)}; valid: {valid}")
        key = f"{key} (preset {unseen!r})"
        unseen = presets[unseen.lower()]
    where = _where(source)
    indices = resolve_indices(
        unseen, names, out_of_range=lambda v: f"{key}: class index {v} out of range 0..{len(names) - 1}{where}",
        unknown=lambda v: f"{key}: unknown class {v!r}{where}; valid: {', '.join(names)}",
        duplicate=lambda v, i: f"{key}: duplicate class {v!r} ({names[i]}){where}",
        check=lambda v, i: f"{key}: class {v!r} is the background (index 0) and cannot be unseen{where}"
        if i == 0 and background else None)
    return ClassSplit(names, tuple(indices), data.ignore_bg, background)


# ----------------------------------------------------------------------------- names -> rows


def parse_aliases(spec: Any, names: Sequence[str], key: str, source: str | None = "config") -> dict[str, str]:
    """``{class of names: row name to look up instead}`` (``{"pavement": "sidewalk"}``), keyed by the
    canonical class name; ``spec`` is a dict (the schema's ``data.embeddings.aliases``) or None."""
    if not spec:
        return {}
    if not all(isinstance(v, str) and v.strip() for v in spec.values()):
        raise ConfigError(f"{key}: expected {{\"class\": \"name to look up\", ...}}, got {spec!r}{_where(source)}")
    index = class_index(names)
    unknown = [k for k in spec if canonical_name(k) not in index]
    if unknown:
        raise ConfigError(f"{key}: {', '.join(map(repr, unknown))} not in the class list "
                          f"({', '.join(names)}){_where(source)}")
    return {canonical_name(k): v.strip() for k, v in spec.items()}


def match_names(wanted: Sequence[str], available: Sequence[str],
                aliases: Mapping[str, str] | None = None) -> list[int | None]:
    """For each name of ``wanted``, the index of the same class (:func:`canonical_name`) in ``available``
    or None; a class with an explicit alias (:func:`parse_aliases`) is looked up by its alias only."""
    index = class_index(available)
    aliases = aliases or {}
    return [index.get(canonical_name(aliases.get(canonical_name(name), name))) for name in wanted]
