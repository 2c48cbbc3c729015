"""The downstream tasks of the front door: one module per task, each declaring one :class:`TaskSpec` as ``SPEC``.

Adding a task: write ``eval/tasks/<name>.py`` (its flags, presets, built-in sample and a ``run`` that calls into
``transfer/``), the protocol itself under ``transfer/``, and one line in :data:`TASKS`. ``eval/run.py``, the report
card and the suites read everything else (help, headline metric, whether it runs on several processes, its step in
``--suite all``) from the spec; ``tests/eval/test_task_contract.py`` checks every registered task against this contract.
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# task name -> the module that declares its SPEC (imported when the task is used)
TASKS: dict[str, str] = {
    "davis": "eval.tasks.davis",
    "knn": "eval.tasks.knn",
    "linear": "eval.tasks.linear",
    "finetune": "eval.tasks.finetune",
    "semisup": "eval.tasks.semisup",
    "coco": "eval.tasks.coco",
    "ade20k": "eval.tasks.ade20k",
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    help: str                                                   # one line, shown in --help
    headline: str                                               # results.json metric the report and suites show
    add_arguments: Callable[[argparse._ArgumentGroup], None]    # the task's own flags
    builtin_sample: Callable[[Path], Path]                      # cache dir -> the sample's root, generated once
    run: Callable[[Any, argparse.Namespace], dict]              # (TaskContext, args) -> {"metrics": {...}, ...}
    headline_scale: float = 1.0                                 # headline x scale = percent (DAVIS writes fractions)
    distributed: bool = False                                   # runs under torchrun / a multi-task SLURM job
    defaults: Mapping[str, Any] = field(default_factory=dict)   # flags declared default=None take these
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # --preset NAME -> flag values
    sample: Mapping[str, Any] = field(default_factory=dict)     # flag values on the built-in sample
    suite_dataset: str = "imagenet"                             # the suites' data set its --data reads
    suite_profile: str = "gpu-1"                                # its cluster profile in `--suite all`
    suite_args: Mapping[str, Any] = field(default_factory=dict)  # its extra flags in `--suite all`
    # (its flags, the backbone's arch, processes) -> eval.budget.Workload: what a run at paper scale asks of the GPUs;
    # it fills the flags left unset with the values the run would take (preset, defaults; derived suites read them)
    workload: Callable[[argparse.Namespace, str, int], Any] | None = None

    def headline_metric(self, metrics: Mapping[str, Any]) -> tuple[str, float] | None:
        """(name, percent) of the headline in ``metrics``: the exact key, else the first key it prefixes
        (``top1_`` matches semisup's ``top1_1pct``); None when absent or not a number."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys = [k for k in numbers if k == self.headline] or [k for k in numbers if k.startswith(self.headline)]
        return (keys[0], self.headline_scale * float(numbers[keys[0]])) if keys else None


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = importlib.import_module(TASKS[name]).SPEC
    if spec.name != name:
        raise ValueError(f"{TASKS[name]} declares the task {spec.name!r}, registered as {name!r}")
    return spec
