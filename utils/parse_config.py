"""Config files: JSON with inheritance (``_base_``, ``_delete_``), dotted-key overrides, object factories.

A config file may name a base config (``"_base_": "../config_pascal_zs3setting.json"``, a path
relative to the file, or a list of them): the bases are read first and this file's keys are
deep-merged over them (objects merge key by key, any other value replaces; an object with
``"_delete_": true`` replaces the base's object whole). Overrides address
nested keys with dotted paths (``optimizer.args.lr``); their values are parsed as JSON where they
parse (``5``, ``[0.5, 1.5]``, ``true``, ``null``), else kept as strings (``/data/VOC2012``).
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
        if isinstance(value, Mapping) and value.get(DELETE_KEY) is True:
            merged[key] = deep_merge({}, {k: v for k, v in value.items() if k != DELETE_KEY})
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, Mapping):
            merged[key] = deep_merge({}, value)   # no base object: drop any _delete_ marker below
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


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"data.root=/data/VOC2012"`` -> ``("data.root", "/data/VOC2012")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"-o {text!r}: expected KEY=VALUE, e.g. -o trainer.epochs=5")
    return key.strip(), parse_value(value.strip())


def set_by_path(config: dict, dotted: str, value: Any, schema: Mapping | None = None) -> None:
    """Set ``config[a][b][c] = value`` for ``"a.b.c"``.

    The path must lead through objects. Its last key must exist already or be a key the
    ``schema`` knows (``{section: {key: None | NULLABLE | nested schema | FREE}}``; FREE accepts
    any key below it); without a schema only existing keys may be set. An unknown path is a
    ConfigError naming it (and the valid keys at the point where it went wrong), and so is a
    null ``value`` unless the schema says the key may be null (a NULLABLE leaf, or a key below
    FREE; without a schema: a key that does not hold an object).
    """
    keys = dotted.split(".")
    node, spec = config, schema
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        known = spec == FREE or key in node or (isinstance(spec, Mapping) and key in spec)
        if not known:
            valid = sorted(set(node) | (set(spec) if isinstance(spec, Mapping) else set()))
            raise ConfigError(f"config key {dotted}: unknown key {key!r}"
                              f"{' under ' + '.'.join(keys[:depth]) if depth else ''}; valid: {', '.join(valid)}")
        if last:
            if value is None and not _may_be_null(spec, key, node):
                raise ConfigError(f"config key {dotted}: may not be null (-o {dotted}=null); give a value, or leave "
                                  "the key out of the override")
            node[key] = value
            return
        if key not in node:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"config key {dotted}: {'.'.join(keys[:depth + 1])} is not an object "
                              f"(it is {node[key]!r})")
        node = node[key]
        spec = FREE if spec == FREE else (spec.get(key) if isinstance(spec, Mapping) else None)


def _may_be_null(spec: Any, key: str, node: Mapping) -> bool:
    if spec is None:   # no schema: any key but a section
        return not isinstance(node.get(key), Mapping)
    return spec == FREE or (isinstance(spec, Mapping) and spec.get(key) == NULLABLE)


def construct(registry: Any, spec: Any, name: str, *args, **kwargs) -> Any:
    """Build ``spec.type`` from ``registry`` (a module or a dict ``{name: class}``) with
    ``spec.args`` plus ``kwargs``, which the program sets and the config may not. ``spec``: a
    checked section with ``type`` and ``args`` (:mod:`utils.schema`); ``name``: its config key."""
    factory = lookup_type(registry, spec.type, name)
    module_args = dict(spec.args)
    overlap = set(kwargs) & set(module_args)
    if overlap:
        raise ConfigError(f"config key {name}.args: {sorted(overlap)} may not be set here (set by the program)")
    module_args.update(kwargs)
    return call_with_config_args(factory, name, *args, **module_args)


def call_with_config_args(factory: Callable, name: str, *args, **kwargs) -> Any:
    """Call ``factory``; an unknown keyword becomes a ConfigError naming ``name.args``."""
    try:
        return factory(*args, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            bad = str(err).split("unexpected keyword argument", 1)[1].strip()
            raise ConfigError(f"config key {name}.args: unexpected argument {bad} for {factory.__name__}") from None
        raise


def lookup_type(module: Any, type_name: str, name: str) -> Callable:
    """The class named ``type_name`` in ``module`` (a module or a dict of classes)."""
    if isinstance(module, dict):
        valid = dict(module)
    else:
        exported = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        valid = {n: getattr(module, n) for n in exported if callable(getattr(module, n, None))}
    if type_name not in valid:
        raise ConfigError(f"config key {name}.type: unknown {type_name!r}; valid: {', '.join(sorted(valid))}")
    return valid[type_name]
