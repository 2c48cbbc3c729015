"""Derived suites (``derive: paper``): paper-mini is the paper suite's steps and recipes, scaled as it declares."""
import argparse
from fractions import Fraction

import pytest
import yaml

from bam.cli import resolve_defaults
from eval.budget import step_args
from eval.derive import parse_factor, scaled
from eval.run import main
from eval.suite import load_suite, plan
from eval.tasks import task_spec
from pretrain.main import parse_args as pretrain_args

from ..conftest import assert_one_line_error

ONLY_FLAGS = {"--data", "--output-dir", "--checkpoint"}  # where the paper and its miniature differ by design


def _action(kind):
    parser = argparse.ArgumentParser()
    return parser.add_argument("--x", type=kind)


@pytest.mark.parametrize("value, factor, kind, expected", [
    (400, "1/400", int, "1"),                    # pretraining epochs
    (100, "1/400", int, "1"),                    # 0.25 epochs: a whole number, at least 1
    (40, "1/400", float, "0.1"),                 # a warm-up may be a fraction of an epoch
    (5, "1/400", float, "0.0125"),
    (224, "2/7", int, "64"),
    (96, "1/3", int, "32"),
    (184_375, "1/10000", int, "18"),             # 18.4375
    ("163889,177546", "1/10000", None, "16,18"),  # COCO's lr drops, element by element
    (10, "1/5", int, "2"),
    (250, "0.0001", int, "1"),
])
def test_scaled_values_are_the_hand_computed_ones(value, factor, kind, expected):
    assert scaled(value, parse_factor(factor, "scale"), _action(kind)) == expected


def test_only_numbers_are_scaled():
    for value in ("rand-m9-mstd0.5-inc1", True, "1,x"):
        with pytest.raises(ValueError, match="--x .* is not a number to scale"):
            scaled(value, Fraction(1, 2), _action(None))


@pytest.mark.parametrize("text", ["x", "-1", "0", "1/0"])
def test_a_bad_factor_is_one_line(text):
    with pytest.raises(ValueError, match="scale epochs: .* (is not a factor|must be positive)"):
        parse_factor(text, "scale epochs")
    assert parse_factor(" 2/7 ", "scale") == Fraction(2, 7)


def _paper_steps(tmp_path):
    data = {"imagenet": "/data/in1k", "coco": "/data/coco", "ade20k": "/data/ade", "davis": "/data/davis"}
    return {s.name: s for s in plan(load_suite("paper"), tmp_path / "paper", data)}


def _flags(argv):
    """flag -> value of an argv whose flags all take one value (the last one given counts, as in argparse)."""
    out, i = {}, 0
    while i < len(argv):
        out[argv[i]] = argv[i + 1]
        i += 2
    return out


def _resolved(step, on_sample):
    """Every value a step's run takes: the pretraining config with the flags, or the task's flags, preset, defaults
    and, on a built-in sample, the sample's own settings (what ``run`` resolves)."""
    if step.entry == "pretrain":
        return vars(pretrain_args(step.argv))
    spec = task_spec(step.argv[1])
    args = step_args(spec.add_arguments, step.argv)
    preset = spec.presets.get(getattr(args, "preset", None) or spec.defaults.get("preset"))
    resolve_defaults(args, spec.defaults, preset, spec.sample if on_sample else None)
    return vars(args)


def test_paper_mini_is_the_paper_suite_on_samples_with_only_the_declared_flags_scaled(tmp_path):
    mini_spec = load_suite("paper-mini")
    paper, mini = _paper_steps(tmp_path), {s.name: s for s in plan(mini_spec, tmp_path / "mini")}
    assert list(mini) == list(paper) and mini_spec["table"] == load_suite("paper")["table"]
    declared = {key.split(".")[-1] for key in [*mini_spec["scale"], *mini_spec["set"]]}
    for name, p in paper.items():
        m = mini[name]
        assert (m.entry, m.needs, m.source) == (p.entry, p.needs, p.source), name
        assert (m.profile.world_size, m.profile.gpus_per_node, m.profile.partition) == (2, 0, "debug"), name
        assert "--data" not in m.argv, name  # the built-in sample
        paper_flags, mini_flags = _flags(p.argv), _flags(m.argv)
        assert {k: v for k, v in paper_flags.items() if k not in ONLY_FLAGS} == \
            {k: mini_flags[k] for k in paper_flags if k not in ONLY_FLAGS}, name  # the parent's flags first, as given
        # the run on the sample takes the paper's recipe (sample settings pinned), but for the declared flags
        before, after = _resolved(p, on_sample=False), _resolved(m, on_sample=True)
        changed = {k for k in before if before[k] != after[k]} - {"data", "output_dir"}
        assert changed <= declared, (name, changed - declared)
    flags = {name: _flags(s.argv) for name, s in mini.items()}
    assert {k: flags["pretrain_vit_small"][k] for k in ("--epochs", "--warmup-epochs", "--batch-size-per-gpu",
                                                         "--global-size", "--local-size")} == \
        {"--epochs": "1", "--warmup-epochs": "0.1", "--batch-size-per-gpu": "16", "--global-size": "64",
         "--local-size": "32"}  # 400, 40, 256, 224, 96 (pretrain/configs/vit_small.yaml)
    assert {k: flags["finetune_vit_base"][k] for k in ("--epochs", "--batch-size", "--blr", "--image-size", "--amp")} \
        == {"--epochs": "1", "--batch-size": "32", "--blr": "0.0005", "--image-size": "64", "--amp": "bf16"}
    # blr: MAE's, not the sample's; the precision: MAE's fp16 needs CUDA, the sample's none is not a recipe's
    assert {k: flags["coco_vit_base"][k] for k in ("--iters", "--steps", "--batch-size", "--min-size", "--lr")} == \
        {"--iters": "18", "--steps": "16,18", "--batch-size": "4", "--min-size": "128", "--lr": "0.0001"}
    assert {k: flags["ade20k_vit_base"][k] for k in ("--iters", "--batch-size", "--crop-size")} == \
        {"--iters": "16", "--batch-size": "2", "--crop-size": "64"}  # mmseg's 160k config: 160000, 16, 512
    assert (flags["davis_vit_base"]["--short-side"], flags["davis_vit_base"]["--long-multiple"]) == ("96", "16")
    assert mini["semisup_vit_base"].sweep == [("fractions", ["0.01", "0.1"])]  # the sample's balanced subsets


def _suite(tmp_path, name, spec):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_derived_suite_follows_its_parent_file(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"")
    parent_spec = {"datasets": {"imagenet": None}, "datasets_required": True, "steps": {
        "ft": {"task": "finetune", "checkpoint": str(tmp_path / "x.pth"), "profile": "gpu-1x8",
               "args": {"data": "{imagenet}", "epochs": 50}}}}
    parent = _suite(tmp_path, "parent", parent_spec)
    child = _suite(tmp_path, "child", {"derive": parent, "scale": {"epochs": "1/10"}, "resources": {"nodes": 2}})
    spec = load_suite(child)
    assert list(spec["steps"]) == ["ft"] and spec["datasets"] == {"imagenet": None}
    (step,) = plan(spec, tmp_path / "out")
    assert (step.profile.name, step.profile.nodes) == ("gpu-1x8", 2) and "--data" not in step.argv
    assert _flags(step.argv[2:])["--epochs"] == "5"
    parent_spec["steps"]["ft"]["args"]["epochs"] = 70  # the child follows an edit of its parent
    _suite(tmp_path, "parent", parent_spec)
    (step,) = plan(load_suite(child), tmp_path / "out")
    assert _flags(step.argv[2:])["--epochs"] == "7"


def test_derived_suite_bad_input_is_one_line(tmp_path, caplog):
    parent = _suite(tmp_path, "parent", {"steps": {"k": {"task": "knn", "args": {"image_size": 224}}}})
    typo = _suite(tmp_path, "typo", {"derive": parent, "scale": {"image_sise": "1/2"}})
    assert_one_line_error(main, ["--suite", typo, "--dry-run"], caplog,
                          "image_sise (scale or set) is a flag of no step")
    chain = _suite(tmp_path, "chain", {"derive": typo, "scale": {"image_size": "1/2"}})
    assert_one_line_error(main, ["--suite", chain, "--dry-run"], caplog, "is itself derived")
    bad = _suite(tmp_path, "bad", {"derive": parent, "scale": {"image_size": "half"}})
    assert_one_line_error(main, ["--suite", bad, "--dry-run"], caplog, "scale image_size: 'half' is not a factor")
    extra = _suite(tmp_path, "extra", {"derive": parent, "steps": {}})
    assert_one_line_error(main, ["--suite", extra, "--dry-run"], caplog, "steps")
    both = _suite(tmp_path, "both", {"derive": parent, "scale": {"image_size": "1/2"}, "set": {"image_size": 96}})
    assert_one_line_error(main, ["--suite", both, "--dry-run"], caplog, "image_size is both scaled and set")
    mixed = _suite(tmp_path, "mixed", {"datasets": {"imagenet": None}, "steps": {"s": {
        "task": "semisup", "sweep": {"split_file": ["{imagenet}/1percent.txt", "/splits/10percent.txt"]}}}})
    assert_one_line_error(main, ["--suite", mixed, "--dry-run"], caplog, "sweep split_file mixes values with and "
                          "without a data set")


def test_a_set_flag_replaces_the_parents_value(tmp_path):
    parent = _suite(tmp_path, "parent", {"steps": {"k": {"task": "knn", "args": {"image_size": 224}}}})
    child = _suite(tmp_path, "child", {"derive": parent, "set": {"knn.image_size": 96}})
    (step,) = plan(load_suite(child), tmp_path / "out")
    assert step.argv == ["--task", "knn", "--image-size", "224", "--image-size", "96"]  # argparse: the last one
