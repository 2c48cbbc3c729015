"""Every registered task keeps the contract of ``eval/tasks/__init__.py``: a complete TaskSpec, its flags and their
defaults in ``--task NAME --help``, a built-in sample that generates, and a run on it whose results.json holds the
headline metric the report card and the suites read. A new task without an entry in TINY fails here."""
import argparse
import json
import math

import pytest
import torch

from bam import build_backbone
from bam.cli import HelpFormatter
from bam.formats import backbone_checkpoint
from eval.run import get_args_parser, main
from eval.tasks import TASKS, TaskSpec, task_spec

from ..conftest import TINY_VIT

# flags that make each task's run on its built-in sample take seconds (the tiny ViT of tests/conftest.py)
TINY = {
    "davis": ["--short-side", "64", "--long-multiple", "32", "--no-overlays", "--sequences", "horse-grass"],
    "knn": ["--image-size", "32", "--num-workers", "0", "--k", "20"],
    "linear": ["--image-size", "32", "--num-workers", "0", "--n-blocks", "1", "--lrs", "0.1", "--epochs", "1",
               "--batch-size", "64", "--extract-batch-size", "64"],
    "finetune": ["--image-size", "32", "--num-workers", "0", "--epochs", "1", "--batch-size", "64",
                 "--auto-augment", "none"],
    "semisup": ["--image-size", "32", "--num-workers", "0", "--fractions", "0.1", "--logreg-c", "1"],
    "coco": ["--iters", "2", "--batch-size", "2", "--min-size", "64", "--max-size", "64", "--proposals",
             "100,50,50,20", "--roi-batch", "16", "--detections-per-image", "10", "--num-workers", "0",
             "--checkpoint-period", "2", "--warmup-iters", "1", "--steps", "2", "--lr", "0.001"],
    "ade20k": ["--preset", "cpu_sample", "--iters", "2", "--batch-size", "2", "--crop-size", "32", "--num-workers",
               "0"],
}
DEPTH = {"ade20k": 4}  # UperNet takes 4 levels from 4 different blocks


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bam-cache")


def _task_actions(spec: TaskSpec) -> list[argparse.Action]:
    parser = get_args_parser(spec.name)
    group = next(g for g in parser._action_groups if g.title == f"--task {spec.name}")
    return group._group_actions


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_states_its_workload_at_its_defaults(name):
    """The plan check's input (eval/budget.py): the task's default recipe as a workload on 8 processes."""
    from eval.budget import Workload, step_args

    spec = task_spec(name)
    w = spec.workload(step_args(spec.add_arguments, []), "vit_base_patch16_224", 8)
    assert isinstance(w, Workload) and w.arch == "vit_base_patch16_224" and w.images > 0
    assert w.micro_batch >= 1 and w.global_batch >= w.micro_batch and w.inputs
    assert not w.trains or (w.optimizer in ("adamw", "sgd") and w.resumable)  # a trained model resumes


def test_every_task_has_a_tiny_run_here():
    assert sorted(TINY) == sorted(TASKS)


@pytest.mark.parametrize("name", list(TASKS))
def test_spec_is_complete_and_its_tables_name_its_flags(name):
    spec = task_spec(name)
    assert spec.name == name and spec.help and "\n" not in spec.help and spec.headline
    assert all(callable(f) for f in (spec.add_arguments, spec.builtin_sample, spec.run, spec.workload))
    assert spec.distributed  # every task runs under torchrun / multi-task SLURM jobs
    assert spec.headline_scale > 0 and spec.suite_dataset and spec.suite_profile
    dests = {a.dest for a in _task_actions(spec)}
    for table, keys in (("defaults", set(spec.defaults)), ("sample", set(spec.sample)),
                        *((f"preset {p}", set(v)) for p, v in spec.presets.items())):
        assert keys <= dests, f"{name}: {table} names no flag of the task: {sorted(keys - dests)}"
    if spec.presets:
        preset = next(a for a in _task_actions(spec) if a.dest == "preset")
        assert set(preset.choices) == set(spec.presets)


@pytest.mark.parametrize("name", list(TASKS))
def test_help_lists_every_flag_with_its_default(name, capsys):
    spec = task_spec(name)
    with pytest.raises(SystemExit) as stop:
        main(["--task", name, "--help"])
    assert stop.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, and breaks long words
    formatter = HelpFormatter("run.py")
    for action in _task_actions(spec):
        flag = action.option_strings[0]
        assert flag in text, f"--task {name} --help does not list {flag}"
        has_default = action.default not in (None, False) or spec.defaults.get(action.dest) is not None
        if has_default:
            shown = formatter._get_help_string(action)
            assert "(default: " in shown and "".join(shown.replace("%%", "%").split()) in text, f"{flag}: {shown!r}"
    for key, value in spec.defaults.items():  # a table default reaches the help text (the one place it is written)
        if value is not None and not isinstance(value, bool):
            assert f"default:{value}" in text, f"--task {name} --help does not show {key}'s default {value}"


@pytest.mark.parametrize("name", list(TASKS))
def test_builtin_sample_runs_and_reports_the_headline_metric(name, sample_cache, tmp_path):
    spec = task_spec(name)
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    backbone = build_backbone("vit_small_patch16_224", **{**TINY_VIT, "depth": DEPTH.get(name, 2)})
    torch.save(backbone_checkpoint(backbone), checkpoint)
    root = spec.builtin_sample(sample_cache)
    assert root.is_dir() and any(root.iterdir())
    assert spec.builtin_sample(sample_cache) == root  # generated once
    out = tmp_path / "out"
    assert main(["--task", name, "--checkpoint", str(checkpoint), "--cache-dir", str(sample_cache),
                 "--output-dir", str(out), *TINY[name]]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == name and results["data"]["builtin_sample"] is True
    found = spec.headline_metric(results["metrics"])
    assert found is not None, f"{name}: no {spec.headline!r} in {sorted(results['metrics'])}"
    assert math.isfinite(found[1])


def test_the_all_suite_has_a_step_per_registered_task(tmp_path):
    from eval.suite import load_suite, plan

    suite = load_suite("all")
    assert list(suite["steps"]) == list(TASKS)
    (tmp_path / "ckpt.pth").write_bytes(b"")
    steps = {s.name: s for s in plan(suite, tmp_path, checkpoint=str(tmp_path / "ckpt.pth"))}
    for name in TASKS:
        spec = task_spec(name)
        assert steps[name].profile.name == spec.suite_profile
        assert steps[name].argv[:2] == ["--task", name] and "--data" not in steps[name].argv  # no data set given
    with_data = {s.name: s for s in plan(suite, tmp_path, {"coco": "/data/coco"}, str(tmp_path / "ckpt.pth"))}
    assert with_data["coco"].argv[with_data["coco"].argv.index("--data") + 1] == "/data/coco"
