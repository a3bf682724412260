"""The worker protocol's codec: a dataclass to and from JSON-ready data, over its declared fields.

Standard library only (the worker imports it in the project's interpreter, which may be Python
3.9): annotations are evaluated at run time by `typing.get_type_hints`. Nested dataclasses,
`Sequence[X]` / `tuple[X, ...]` (a tuple), lists, frozensets, mappings and `Optional` are walked
by their declared type; anything else must already be JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar, Union

T = TypeVar("T")


class ProtocolError(ValueError):
    """A line that is not a message of this protocol (or of another version of it)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _wire(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("wire", f.name))


def _optional_of(hint: Any) -> Any:
    """X for Optional[X], else None."""
    if typing.get_origin(hint) is Union:
        others = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(others) == 1:
            return others[0]
    return None


def encode(value: Any, hint: Any = None) -> Any:
    """`value` as JSON-ready data, walked by its declared type (`hint`; default: its own class).

    A dataclass is encoded over the fields of its declared class: a subclass's extra fields (the
    control plane's `WorkerJob.python`) stay on this side."""
    hint = type(value) if hint is None else hint
    if value is None:
        return None
    inner = _optional_of(hint)
    if inner is not None:
        return encode(value, inner)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        return {_wire(f): encode(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(hint)}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list, Sequence, frozenset, set, AbstractSet):
        items = [encode(v, args[0] if args else Any) for v in value]
        if origin in (frozenset, set, AbstractSet):
            items.sort(key=lambda item: json.dumps(item, sort_keys=True, default=str))
        return items
    if origin in (dict, Mapping):
        return {str(k): encode(v, args[1] if args else Any) for k, v in value.items()}
    return value


def decode(cls: type[T], data: Any) -> T:
    """The `cls` dataclass that `data` (as `encode` made it) holds; ProtocolError when it does not."""
    return typing.cast(T, _decode(cls, data, cls.__name__))


def _decode(hint: Any, data: Any, where: str) -> Any:
    if hint is Any:
        return data
    inner = _optional_of(hint)
    if inner is not None:
        return None if data is None else _decode(inner, data, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, data, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list, Sequence, frozenset, set, AbstractSet):
        if not isinstance(data, list):
            raise ProtocolError(f"{where}: expected a list, got {_kind(data)}")
        item = args[0] if args else Any
        items = [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
        if origin is list:
            return items
        return frozenset(items) if origin in (frozenset, set, AbstractSet) else tuple(items)
    if origin in (dict, Mapping):
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected an object, got {_kind(data)}")
        value = args[1] if args else Any
        return {str(k): _decode(value, v, f"{where}.{k}") for k, v in data.items()}
    return _decode_scalar(hint, data, where)


def _decode_dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected an object, got {_kind(data)}")
    hints = _hints(cls)
    wires = {_wire(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(wires))
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for wire, f in wires.items():
        if wire in data:
            values[f.name] = _decode(hints[f.name], data[wire], f"{where}.{wire}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing field {wire}")
    return cls(**values)


def _decode_scalar(hint: Any, data: Any, where: str) -> Any:
    if hint is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if hint is int and isinstance(data, int) and not isinstance(data, bool):
        return data
    if hint in (str, bool) and isinstance(data, hint):
        return data
    if hint in (str, bool, int, float):
        raise ProtocolError(f"{where}: expected {hint.__name__}, got {_kind(data)}")
    return data


def _kind(data: Any) -> str:
    return "null" if data is None else type(data).__name__
