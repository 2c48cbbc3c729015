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
