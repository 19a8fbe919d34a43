"""Config sections as typed dataclasses: unknown keys, missing keys and wrong types are
one-line errors naming ``section.key`` and the config file, before any work starts."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from utils.errors import ConfigError
from utils.parse_config import FREE, NULLABLE

T = TypeVar("T")


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits the type hint (``int``, ``float``, ``bool``, ``str``, unions, Any)."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if isinstance(value, bool) and hint in (int, float):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    kind = typing.get_origin(hint) or hint   # list[str] -> list
    if kind in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, kind) if isinstance(kind, type) else True


def _section_type(hint: Any) -> type | None:
    """The section dataclass a field holds (``S`` or ``S | None``), else None."""
    return next((kind for kind in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(kind)), None)


def section_keys(cls: type) -> dict[str, Any]:
    """The keys a section dataclass accepts, as a node of the override schema: a nested section's
    keys, FREE for an object, NULLABLE for a key that may be null, else None."""
    keys = {}
    for name, hint in typing.get_type_hints(cls).items():
        kind = _section_type(hint)
        if kind is not None:
            keys[name] = section_keys(kind)
        elif hint is not Any and _accepts(hint, {}):
            keys[name] = FREE
        else:
            keys[name] = NULLABLE if _accepts(hint, None) else None
    return keys


def parse_section(cls: type[T], values: Mapping | None, name: str, source: str = "config") -> T:
    """Build the dataclass ``cls`` (and its nested sections) from config section ``name``, then run
    its ``check()``; fields without a default are required, values must fit the annotations."""
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{name}: expected an object, got {values!r} (file {source})")
    values = dict(values or {})
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = [key for key in values if key not in fields]
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (file {source}); valid: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, field in fields.items():
        if key not in values:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{name}.{key}: missing (file {source})")
            continue
        value, kind = values[key], _section_type(hints[key])
        if kind is not None and value is not None:
            value = parse_section(kind, value, f"{name}.{key}", source)
        elif not _accepts(hints[key], value):
            raise ConfigError(f"{name}.{key}: invalid value {value!r} (file {source})")
        kwargs[key] = float(value) if hints[key] is float else value
    section = cls(**kwargs)
    problem = section.check() if hasattr(section, "check") else None
    if problem:
        raise ConfigError(f"{name}.{problem} (file {source})")
    return section
