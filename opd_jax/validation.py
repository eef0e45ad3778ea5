"""The checks every gin-configurable dataclass runs on its fields when it is built.

gin passes a binding's value through as written, so `Schedule.steps = "ten"` reaches the
dataclass unchecked. Each configurable checks its ranges and choices with the helpers
here, then `check_types` holds every field to its annotation, so a bad value fails in one
line that names the binding (`Class.field`) and, for a choice, lists the valid values.
Nothing here imports the rest of the package, so every module can use it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work, found before any compile; the one-line message names it."""


def binding(cfg: Any, field: str) -> str:
    """The gin name of a config's field, "Class.field"."""
    return f"{type(cfg).__name__}.{field}"


def check_fields(cfg: Any, check: Callable[..., None], *fields: str, **settings: Any) -> None:
    """`check(binding, value, **settings)` on each named field of the config `cfg`."""
    for field in fields:
        check(binding(cfg, field), getattr(cfg, field), **settings)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """One of `choices`, which the error lists so a typo is fixed without reading code."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, or_none: bool = False) -> None:
    """An integer (not a bool, which Python counts as one) of at least `minimum`."""
    if or_none and value is None:
        return
    if not (_is_int(value) and value >= minimum):
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}{_or_none(or_none)}")


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
    or_none: bool = False,
) -> None:
    """A real number (an int will do) in the interval from low to high; NaN never is."""
    if or_none and value is None:
        return
    above = _is_number(value) and (value > low if open_low else value >= low)
    if not (above and (value < high if open_high else value <= high)):
        interval = _interval(low, high, open_low, open_high)
        raise ConfigError(f"{name}={value!r} must be a number {interval}{_or_none(or_none)}")


def _or_none(or_none: bool) -> str:
    return " or None" if or_none else ""


def _interval(low: float, high: float, open_low: bool, open_high: bool) -> str:
    if high == math.inf:
        return f"{'>' if open_low else '>='} {low:g}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


# ------------------------------------------------------------------------- types


def check_types(cfg: Any) -> None:
    """Every field of the dataclass `cfg` holds a value of its annotated type (an int for
    a float; a tuple, not a list, for a tuple), else a ConfigError naming the first that
    does not."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value, hint = getattr(cfg, field.name), hints[field.name]
        if not _matches(value, hint):
            name = binding(cfg, field.name)
            raise ConfigError(f"{name}={value!r} must be {_describe(hint)}")


_ATOMS: dict[Any, tuple[str, str, Callable[[Any], bool]]] = {
    # type -> (singular, plural, test)
    int: ("an integer", "integers", _is_int),
    float: ("a number", "numbers", _is_number),
    bool: ("True or False", "booleans", lambda v: isinstance(v, bool)),
    str: ("a string", "strings", lambda v: isinstance(v, str)),
    type(None): ("None", "None", lambda v: v is None),
    Any: ("anything", "anything", lambda v: True),
}
_CONTAINERS = {  # origin -> (singular, plural, the host types a value may have)
    tuple: ("a tuple", "tuples", (tuple,)),
    collections.abc.Sequence: ("a sequence", "sequences", (tuple, list)),
    collections.abc.Mapping: ("a mapping", "mappings", (collections.abc.Mapping,)),
}


def _members(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union, or the hint alone."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return typing.get_args(hint) if union else (hint,)


def _matches(value: Any, hint: Any) -> bool:
    if len(_members(hint)) > 1:
        return any(_matches(value, member) for member in _members(hint))
    if hint in _ATOMS:
        return _ATOMS[hint][2](value)
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin not in _CONTAINERS:
        return isinstance(value, origin)
    if not isinstance(value, _CONTAINERS[origin][2]):
        return False
    if origin is collections.abc.Mapping:
        key, item = args or (Any, Any)
        return all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if origin is tuple and args and args[-1] is not Ellipsis:
        return len(value) == len(args) and all(map(_matches, value, args))
    return all(_matches(item, args[0]) for item in value) if args else True


def _describe(hint: Any, plural: bool = False) -> str:
    """A type in words: "an integer, a tuple of integers or None"."""
    members = _members(hint)
    if len(members) > 1:
        words = [_describe(member, plural) for member in members]
        return f"{', '.join(words[:-1])} or {words[-1]}"
    if hint in _ATOMS:
        return _ATOMS[hint][int(plural)]
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin not in _CONTAINERS:
        return getattr(origin, "__name__", str(origin))
    words = _CONTAINERS[origin][int(plural)]
    if origin is collections.abc.Mapping and args:
        return f"{words} of {_describe(args[0], True)} to {_describe(args[1], True)}"
    if args and args[0] is not Any and (origin is not tuple or args[-1] is Ellipsis):
        return f"{words} of {_describe(args[0], True)}"
    return words
