"""Suites derived from another suite (``derive: paper``): the same steps, recipes, code paths and table, every data
set left to its built-in sample, and the recipe's lengths and sizes scaled by factors the suite file declares.

A derived suite file holds ``derive`` (the suite it follows), ``scale`` (``flag: factor`` or ``task.flag: factor``,
e.g. ``epochs: 1/400``; ``pretrain.flag`` for the pretraining entry), and optionally ``set`` (``flag: value``, the same
keys: a value the derived suite's machines need, e.g. ``pretrain.amp: bf16`` where fp16 needs CUDA), ``profile`` and
``resources`` (every step's cluster profile and fields on top). Each step's flags are the parent's, then:

- every declared flag the step has: its value in the parent's recipe (the pretraining config, the task's preset and
  defaults, resolved by the task's own ``TaskSpec.workload``) x the factor; a flag that takes only whole numbers is
  rounded, and is at least 1; a comma-separated list (COCO's ``--steps``) is scaled element by element;
- every flag a built-in sample would otherwise set for the task (``TaskSpec.sample``), pinned to the parent recipe's
  value, so that the sample changes the data and the declared sizes, not the recipe;
- every ``set`` flag the step has, with its value.
"""
from __future__ import annotations

import argparse
from fractions import Fraction
from typing import Any

from eval.budget import step_args
from eval.tasks import task_spec

DERIVED_KEYS = {"description", "derive", "scale", "set", "profile", "resources"}
PRETRAIN = "pretrain"


def parse_factor(value: Any, where: str) -> Fraction:
    """``1/400``, ``0.25`` or ``2`` -> a positive Fraction; a one-line error otherwise."""
    try:
        factor = Fraction(str(value).replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{where}: {value!r} is not a factor; write a number or a fraction such as 1/400") from None
    if factor <= 0:
        raise ValueError(f"{where}: {value!r} must be positive")
    return factor


def derive(spec: dict, parent: dict) -> dict:
    """The suite ``spec`` (a derived file) with the steps, table and report of ``parent``; the parent's data sets
    are all left unset (the built-in samples; ``--dataset`` still gives one), every step on ``spec['profile']``
    (else its own) with ``spec['resources']`` on top of its own."""
    where = spec["path"]
    scale = {str(k): parse_factor(v, f"{where}: scale {k}") for k, v in (spec.get("scale") or {}).items()}
    fixed = {str(k): v for k, v in (spec.get("set") or {}).items()}
    both = sorted(set(scale) & set(fixed))
    if both:
        raise ValueError(f"{where}: {both[0]} is both scaled and set; keep one")
    steps = {}
    for name, step in parent["steps"].items():
        step = dict(step)
        if spec.get("profile"):
            step["profile"] = spec["profile"]
        if spec.get("resources"):
            step["resources"] = {**(step.get("resources") or {}), **spec["resources"]}
        steps[name] = step
    return {**{k: v for k, v in parent.items() if k in ("table", "report")},
            "description": spec.get("description", f"{parent['name']}, derived"), "steps": steps,
            "datasets": {name: None for name in parent.get("datasets") or {}}, "datasets_required": False,
            "scale": scale, "set": fixed, "derived_from": parent["path"], "path": spec["path"], "name": spec["name"]}


def _actions(add_arguments) -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_arguments(parser.add_argument_group())
    return {a.dest: a for a in parser._actions if a.option_strings}


def _whole(action: argparse.Action) -> bool:
    """Whether the flag takes whole numbers only (its type refuses 1.5)."""
    if action.type is None:
        return False
    try:
        action.type("1.5")
    except (ValueError, argparse.ArgumentTypeError):
        return True
    return False


def _times(value: Fraction, factor: Fraction, whole: bool) -> str:
    exact = value * factor
    if whole or exact.denominator == 1:
        return str(max(1, round(exact)))
    return repr(float(exact))


def scaled(value: Any, factor: Fraction, action: argparse.Action) -> str:
    """``value`` x ``factor`` as the flag's text: whole-number flags rounded (at least 1), lists element-wise (a
    whole number in a list stays whole)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        items = [Fraction(t.strip()) for t in str(value).split(",")]
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{action.option_strings[0]} {value!r} is not a number to scale") from None
    whole = _whole(action)
    return ",".join(_times(i, factor, whole or (isinstance(value, str) and i.denominator == 1)) for i in items)


def _key(table: dict, owner: str, dest: str) -> str | None:
    """The key of ``table`` that applies to flag ``dest`` of ``owner`` (a task, or pretrain): TASK.flag, else flag."""
    return next((k for k in (f"{owner}.{dest}", dest) if k in table), None)


def scaled_flags(entry: str, argv: list[str], scale: dict[str, Fraction], fixed: dict[str, Any], world: int,
                 arch: str, used: set[str]) -> list[str]:
    """The flags that follow a step's ``argv`` in a derived suite (module docstring); the ``scale`` and ``fixed``
    (``set``) keys applied are added to ``used``."""
    if entry == PRETRAIN:
        from pretrain.main import get_args_parser, parse_args

        owner, pinned = PRETRAIN, set()
        resolved = parse_args(argv)
        actions = {a.dest: a for a in get_args_parser()._actions if a.option_strings}
    else:
        spec = task_spec(argv[argv.index("--task") + 1])
        owner, pinned = spec.name, set(spec.sample)
        resolved = step_args(spec.add_arguments, argv)
        if spec.workload is not None:
            spec.workload(resolved, arch, world)  # resolves the preset and defaults into the flags, in place
        actions = _actions(spec.add_arguments)
    out = []
    for dest, action in actions.items():
        value = getattr(resolved, dest, None)
        factor, given = _key(scale, owner, dest), _key(fixed, owner, dest)
        if given is not None:
            used.add(given)
            out += [action.option_strings[0], str(fixed[given])]
        elif value is None or (factor is None and dest not in pinned):
            continue
        elif factor is not None:
            used.add(factor)
            out += [action.option_strings[0], scaled(value, scale[factor], action)]
        elif not isinstance(value, bool) and not set(action.option_strings) & set(argv):  # given: the parent's
            out += [action.option_strings[0], str(value)]
    return out


def unused_key(declared: dict, used: set[str]) -> str | None:
    """The first declared scale or set key that no step has (a typo, or a flag of a task the suite does not run)."""
    return next((k for k in declared if k not in used), None)
