"""Config files: JSON with inheritance (``_base_``, ``_delete_``), dotted-key overrides, object factories.

A config file may name base configs (``"_base_": "../config_pascal_zs3setting.json"`` or a list,
relative to the file): its keys are deep-merged over theirs. Overrides address nested keys with
dotted paths (``optimizer.args.lr``); values are JSON where they parse, else strings.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from utils.errors import ConfigError
from utils.util import read_json

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"   # in an object of a child config: replace the base's object instead of merging
FREE = "*"   # a schema node whose keys are not checked (constructor ``args``, ...)
NULLABLE = "?"   # a schema leaf that may be set to null (``-o key=null``)


class CustomArgs(NamedTuple):
    """A command-line flag that overrides one nested config key (``target``: a dotted path)."""

    flags: list
    type: Callable
    target: str
    help: str = ""


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """``base`` updated with ``override``: nested objects merge key by key, other values replace;
    an object of ``override`` holding ``"_delete_": true`` replaces the base's object whole
    (the base's other keys are deleted), as in MMSegmentation."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping):
            keep = isinstance(merged.get(key), Mapping) and value.get(DELETE_KEY) is not True
            merged[key] = deep_merge(merged[key] if keep else {}, {k: v for k, v in value.items() if k != DELETE_KEY})
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a JSON config and resolve its ``_base_`` chain (errors name the file)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"{path}: {BASE_KEY} chain loops back to itself ({cycle})")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    bases = config.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} {base!r}: file {base_path} not found")
        merged = deep_merge(merged, load_config(base_path, (*_chain, resolved)))
    return deep_merge(merged, config)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"data.root=/data/VOC2012"`` -> ``("data.root", "/data/VOC2012")``; ``"a=5"`` -> ``("a", 5)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"-o {text!r}: expected KEY=VALUE, e.g. -o trainer.epochs=5")
    try:
        return key.strip(), json.loads(value.strip())
    except json.JSONDecodeError:
        return key.strip(), value.strip()


def set_by_path(config: dict, dotted: str, value: Any, schema: Mapping | None = None) -> None:
    """Set ``config[a][b][c] = value`` for ``"a.b.c"``: each key must exist already or be one the
    ``schema`` knows (``{section: {key: None | NULLABLE | FREE | nested schema}}``; FREE accepts
    anything below), and null only where the schema allows it (without a schema: not a section)."""
    keys = dotted.split(".")
    node, spec = config, schema
    for depth, key in enumerate(keys):
        known = spec if isinstance(spec, Mapping) else {}
        if spec != FREE and key not in node and key not in known:
            raise ConfigError(f"config key {dotted}: unknown key {key!r}"
                              f"{' under ' + '.'.join(keys[:depth]) if depth else ''}; "
                              f"valid: {', '.join(sorted({*node, *known}))}")
        if depth == len(keys) - 1:
            break
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted}: {'.'.join(keys[:depth + 1])} is not an object (it is {child!r})")
        node, spec = child, spec if spec == FREE else known.get(key)
    if spec is None:   # no schema: any key but a section may be null
        nullable = not isinstance(node.get(key), Mapping)
    else:
        nullable = spec == FREE or known.get(key) in (NULLABLE, FREE)
    if value is None and not nullable:
        raise ConfigError(f"config key {dotted}: may not be null (-o {dotted}=null); give a value, or leave the key "
                          "out of the override")
    node[key] = value


def construct(registry: Any, spec: Any, name: str, *args, **kwargs) -> Any:
    """Build ``spec.type`` from ``registry`` (a module or a dict ``{name: class}``) with
    ``spec.args`` plus ``kwargs``, which the program sets and the config may not. ``spec``: a
    checked section with ``type`` and ``args`` (:mod:`utils.schema`); ``name``: its config key."""
    if isinstance(registry, dict):
        valid = dict(registry)
    else:
        exported = getattr(registry, "__all__", None) or [n for n in dir(registry) if not n.startswith("_")]
        valid = {n: getattr(registry, n) for n in exported if callable(getattr(registry, n, None))}
    if spec.type not in valid:
        raise ConfigError(f"config key {name}.type: unknown {spec.type!r}; valid: {', '.join(sorted(valid))}")
    overlap = set(kwargs) & set(spec.args)
    if overlap:
        raise ConfigError(f"config key {name}.args: {sorted(overlap)} may not be set here (set by the program)")
    factory = valid[spec.type]
    try:
        return factory(*args, **spec.args, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        bad = str(err).split("unexpected keyword argument", 1)[1].strip()
        raise ConfigError(f"config key {name}.args: unexpected argument {bad} for {factory.__name__}") from None
