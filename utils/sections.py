"""Config sections as typed dataclasses: unknown keys, missing keys and wrong types are
one-line errors naming ``section.key`` and the config file, before any work starts."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from utils.errors import ConfigError
from utils.parse_config import NULLABLE

T = TypeVar("T")


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits the type hint (``int``, ``float``, ``bool``, ``str``, unions, Any)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def section_keys(cls: type) -> dict[str, str | None]:
    """The keys a section dataclass accepts (schema node for overrides): NULLABLE for those whose
    type admits None, else None."""
    hints = typing.get_type_hints(cls)
    return {field.name: NULLABLE if _accepts(hints[field.name], None) else None for field in dataclasses.fields(cls)}


def parse_section(cls: type[T], values: Mapping | None, name: str, source: str = "config") -> T:
    """Build the dataclass ``cls`` from config section ``name``; fields without a default are
    required. Values are type-checked against the annotations (ints are accepted as floats)."""
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
        value = values[key]
        if not _accepts(hints[key], value):
            raise ConfigError(f"{name}.{key}: invalid value {value!r} (file {source})")
        kwargs[key] = float(value) if hints[key] is float else value
    settings = cls(**kwargs)
    check = getattr(settings, "check", None)
    if check is not None:
        problem = check()
        if problem:
            raise ConfigError(f"{name}.{problem} (file {source})")
    return settings
