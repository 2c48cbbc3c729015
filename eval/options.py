"""Task flags whose defaults depend on context: an explicit flag wins, then a named preset, then the built-in
sample's setting, then the task's default. Flags declared with ``default=None`` take part."""
from __future__ import annotations

import argparse
from typing import Any


def resolve_defaults(args: argparse.Namespace, defaults: dict[str, Any], preset: dict[str, Any] | None = None,
                     sample: dict[str, Any] | None = None) -> None:
    """Fill every ``None`` flag named in ``defaults`` in place (so results.json records the values used)."""
    for key, default in defaults.items():
        if getattr(args, key, None) is not None:
            continue
        for layer in (preset or {}, sample or {}):
            if key in layer:
                setattr(args, key, layer[key])
                break
        else:
            setattr(args, key, default)


def parse_list(text: str, kind: type, flag: str) -> list:
    """``"1,4"`` -> ``[1, 4]``; ``"off,on"`` -> ``[False, True]`` for ``kind=bool``; one-line error otherwise."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        if kind is bool:
            table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
            values = [table[t.lower()] for t in items]
        else:
            values = [kind(t) for t in items]
    except (KeyError, ValueError):
        raise ValueError(f"{flag} {text!r} must be a comma-separated list of "
                         f"{'on/off' if kind is bool else kind.__name__} values") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


_BOUNDS = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="), "lt": (lambda v, b: v < b, "<"),
           "le": (lambda v, b: v <= b, "<=")}


def _check(value: float, bounds: dict[str, float]) -> str | None:
    """None when ``value`` keeps every bound, else the bounds spelled for a message (``">= 1"``)."""
    if all(_BOUNDS[name][0](value, bound) for name, bound in bounds.items()):
        return None
    return " and ".join(f"{_BOUNDS[name][1]} {bound:g}" for name, bound in bounds.items())


def number(kind: type, **bounds: float):
    """An argparse ``type``: ``kind(text)`` within ``bounds`` (gt/ge/lt/le), else argparse's one-line error that names
    the flag, e.g. ``argument --k: 0 must be >= 1``."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
        if value != value:  # NaN passes no bound
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        broken = _check(value, bounds)
        if broken:
            raise argparse.ArgumentTypeError(f"{text} must be {broken}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def number_list(kind: type, **bounds: float):
    """An argparse ``type`` for a comma-separated list (``--k 10,20``): each item as :func:`number`; the text is kept
    (tasks parse it with :func:`parse_list` after presets are applied)."""
    one = number(kind, **bounds)

    def parse(text: str) -> str:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("is empty")
        for item in items:
            one(item)
        return text
    parse.__name__ = f"{kind.__name__} list"
    return parse
