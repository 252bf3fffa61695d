"""One validator for dataclass configurations (`train.TrainConfig`, the notebooks' parameters), built on
their type hints, so that a new field is checked without a hand-kept table to update."""
from __future__ import annotations

import functools
import types
import typing

_NONE = type(None)
_PLAIN = (str, int, float, bool, list, dict, _NONE)


def allowed(hint) -> tuple[type, ...]:
    """The Python types a value annotated ``hint`` may have (``list[int]`` checks the list only); any other
    annotation than `_PLAIN` and unions raises TypeError: a field is never silently left unchecked."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in allowed(arg))
    hint = _NONE if hint is None else (typing.get_origin(hint) or hint)
    if hint not in _PLAIN:
        raise TypeError(f"no validator for the annotation {hint!r}; use {', '.join(t.__name__ for t in _PLAIN)}")
    return {float: (int, float), list: (list, tuple)}.get(hint, (hint,))


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Field -> allowed types of the dataclass ``cls`` (its annotations resolved once)."""
    return {name: allowed(hint) for name, hint in typing.get_type_hints(cls).items()
            if name in cls.__dataclass_fields__}


def check(cls: type, name: str, value, error: type[Exception] = TypeError, widen: bool = False):
    """``value`` for the field ``name`` of ``cls``, or ``error`` naming the field and the types it takes
    (a bool is not an int). ``widen``: an int for a float field becomes a float and a tuple a list, so
    that equal configurations have equal canonical JSON (and run ids)."""
    ok = field_types(cls)[name]
    if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
        shown = [t for t in ok if t is not tuple and not (t is int and float in ok)]  # as annotated
        want = " or ".join(dict.fromkeys("None" if t is _NONE else t.__name__ for t in shown))
        raise error(f"{name}={value!r}: expected {want}, got {type(value).__name__}")
    if widen and isinstance(value, tuple):
        return list(value)
    if widen and float in ok and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
