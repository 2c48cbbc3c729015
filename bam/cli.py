"""The command-line base both entry points (``eval/run.py``, ``pretrain/main.py``) share: the parser class, typed
and bounded flag values, defaults that depend on context (an explicit flag wins, then a named preset, then the
built-in sample's setting, then the task's default; flags declared with ``default=None`` take part) and their help
text generated from the one table that holds them, logging set-up, device resolution. The only argparse in ``bam``.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

LOG_FORMAT = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s", "datefmt": "%H:%M:%S"}


def setup_logging(level: int = logging.INFO) -> None:
    """One format for every entry point and job (a no-op once the root logger has a handler)."""
    logging.basicConfig(level=level, **LOG_FORMAT)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``--device`` as a torch device; ``cuda`` without an index takes this process's ``local_rank`` GPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda[:N] are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    return device


class FlagParser(argparse.ArgumentParser):
    """argparse that names the valid flags when it meets an unknown one; ``add("a_b")`` declares ``--a-b`` and
    ``--a_b`` for the key ``a_b`` (the YAML spelling of a recipe)."""

    def add(self, name: str, **kw) -> argparse.Action:
        dashed = "--" + name.replace("_", "-")
        return self.add_argument(dashed, *([f"--{name}"] if "_" in name else []), dest=name, **kw)

    def flags(self) -> list[str]:
        return sorted({s for a in self._actions for s in a.option_strings if s.startswith("--") and "_" not in s})

    def error(self, message: str) -> None:  # type: ignore[override]
        if "unrecognized arguments" in message:
            message += f"; valid flags: {' '.join(self.flags())}"
        super().error(message)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).replace("%", "%%")  # argparse %-formats help text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; every flag's help ends with its default (flags whose default comes from a
    task's table get theirs from :func:`document_defaults`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default:" in text or not action.option_strings:
            return text
        return f"{text} (default: {_shown(action.default)})".lstrip()


def document_defaults(container: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: Mapping[str, Any],
                      sample: Mapping[str, Any] | None = None) -> None:
    """Append ``(default: X)`` (and ``built-in sample: Y`` where the sample differs) to the help of every flag in
    ``container`` whose value comes from ``defaults``: the table is the one place such a default is written."""
    actions = container._group_actions if isinstance(container, argparse._ArgumentGroup) else container._actions
    for action in actions:
        if action.dest not in defaults or action.default is not None or defaults[action.dest] is None:
            continue
        text = f"default: {_shown(defaults[action.dest])}"
        if sample and action.dest in sample and sample[action.dest] != defaults[action.dest]:
            text += f"; built-in sample: {_shown(sample[action.dest])}"
        action.help = f"{action.help} ({text})" if action.help else f"({text})"


def check_keys(given: Iterable[str], valid: Iterable[str], where: str, what: str = "keys") -> None:
    """One-line error for keys of a YAML file (a suite, a profile, a recipe) that nothing reads: a typo must not be
    silently ignored. ``where`` names the file and the entry, e.g. ``suite.yaml: step knn``."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"{where} has unknown {what} {unknown}; valid: {', '.join(sorted(valid))}")


def bool_flag(s: str | bool) -> bool:
    if isinstance(s, bool):
        return s
    if s.lower() in ("true", "1", "yes", "on"):
        return True
    if s.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def json_dict(s: str | dict) -> dict:
    if isinstance(s, dict):
        return s
    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}': {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def optional_float(s: str | float | None) -> float | None:
    return None if s in (None, "none", "null", "None") else float(s)


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
