"""Suites: many front-door runs as one plan (``eval/suites/<name>.yaml``), launched in dependency order.

A suite file lists steps. A step runs one front door (``task: knn`` for ``eval/run.py``, ``entry: pretrain`` for
``pretrain/main.py``) with ``args`` (``{key: value}`` -> ``--key value``; ``true`` -> ``--key``). ``{name}`` in a
value is a dataset folder (``datasets:`` in the file, ``--dataset name=DIR`` on the command line),
``{checkpoint}`` (the suite's ``--checkpoint``) or ``{repo}`` (this checkout). ``checkpoint: STEP`` evaluates the
checkpoint that step writes (``bam.checkpoint.latest_path`` of its folder) and makes the step wait for it (SLURM
``afterok``). ``profile`` names the cluster profile of its SLURM job (``resources: {field: value}`` changes some of
its fields for this step), ``sweep: {flag: [values]}`` makes it a job array. After the steps, the suite renders
``table:`` rows (measured vs published) and, with ``report: true``, a report card. ``derive: SUITE`` instead of steps
makes a suite of another suite's steps on the built-in samples, its recipes scaled as the file declares
(``eval/derive.py``; ``paper-mini``).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from bam.checkpoint import latest_path
from bam.cli import check_keys
from eval import budget
from eval.derive import DERIVED_KEYS, PRETRAIN, derive, scaled_flags, unused_key
from eval.tasks import TASKS, task_spec
from slurm.launch import (
    ENTRIES,
    Sweep,
    entry_main,
    parse_sweep,
    profile_overrides,
    submit,
    sweep_elements,
    wait_for,
)
from slurm.profiles import Profile, load_profile

logger = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).with_name("suites")
REPO = Path(__file__).resolve().parents[1]
STEP_KEYS = {"task", "entry", "args", "checkpoint", "profile", "resources", "sweep"}
SUITE_KEYS = {"description", "datasets", "datasets_required", "steps", "table", "report"}
PLACEHOLDER = re.compile(r"\{(\w+)\}")
EVERY_TASK = "every-task"  # steps: every-task, one step per registered task
DEFAULT_ARCH = "vit_small_patch16_224"  # the front door's, when neither a flag nor a checkpoint names one


@dataclass
class Step:
    name: str
    entry: str                      # "eval" | "pretrain"
    argv: list[str]                 # without --output-dir (the suite gives each step <suite-dir>/<name>)
    output_dir: Path
    profile: Profile
    needs: list[str]                # steps whose checkpoint this one reads
    sweep: Sweep | None = None
    input_checkpoint: Path | None = None
    source: str | None = None       # the step whose checkpoint this one reads

    def command(self) -> str:
        sweep = [f"--sweep {flag}={','.join(values)}" for flag, values in self.sweep or []]
        return " ".join(["python", ENTRIES[self.entry].script, *map(shlex.quote, self.argv),
                         "--output-dir", shlex.quote(str(self.output_dir)), *sweep])


def suite_file(name: str) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"--suite {name}: no such suite; known: {', '.join(known)} (or a path to a YAML)")
    return path


def every_task() -> tuple[dict, dict]:
    """``steps: every-task``: one step per registered task (eval/tasks), on the suite's ``--checkpoint``, with the
    data set, cluster profile and flags its TaskSpec names; and the data sets they read."""
    steps, datasets = {}, {}
    for name in TASKS:
        spec = task_spec(name)
        steps[name] = {"task": name, "checkpoint": "{checkpoint}", "profile": spec.suite_profile,
                       "args": {"data": f"{{{spec.suite_dataset}}}", **spec.suite_args}}
        datasets[spec.suite_dataset] = None
    return steps, datasets


def load_suite(name: str) -> dict:
    path = suite_file(name)
    spec = yaml.safe_load(path.read_text()) or {}
    if "derive" in spec:  # eval/derive.py: another suite's steps on the built-in samples, scaled
        check_keys(spec, DERIVED_KEYS, str(path))
        parent = suite_file(str(spec["derive"]))
        if parent.resolve() == path.resolve() or "derive" in (yaml.safe_load(parent.read_text()) or {}):
            raise ValueError(f"{path}: derive: {spec['derive']} is itself derived; derive from a suite of steps")
        return derive({**spec, "path": str(path), "name": path.stem}, load_suite(str(parent)))
    check_keys(spec, SUITE_KEYS, str(path))
    if spec.get("steps") == EVERY_TASK:
        spec["steps"], datasets = every_task()
        spec["datasets"] = {**datasets, **(spec.get("datasets") or {})}
    steps = spec.get("steps") or {}
    if not isinstance(steps, dict) or not steps:
        raise ValueError(f"{path}: expected 'steps:' mapping step names to {{task|entry, args, ...}}, or "
                         f"'steps: {EVERY_TASK}'")
    for step_name, step in steps.items():
        check_keys(step, STEP_KEYS, f"{path}: step {step_name}")
        if ("task" in step) == (step.get("entry", "eval") == "pretrain"):
            raise ValueError(f"{path}: step {step_name} needs 'task: NAME' (an evaluation) or 'entry: pretrain'")
        needed = step.get("checkpoint")
        if needed and not PLACEHOLDER.search(str(needed)) and needed not in steps and "/" not in str(needed):
            raise ValueError(f"{path}: step {step_name} evaluates the checkpoint of {needed!r}, which is not a step")
    spec["path"] = str(path)
    spec["name"] = path.stem
    return spec


def parse_datasets(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--dataset {pair!r}: expected NAME=DIR (e.g. --dataset imagenet=/data/imagenet)")
        out[key] = value
    return out


def _fill(value: str, values: dict[str, str | None], where: str, keep_unset: bool) -> str | None:
    """``value`` with its ``{name}``s replaced. An unset name leaves the flag out (None), or, with ``keep_unset``
    (a suite whose datasets are required), stays as ``{name}`` for the dry run to show and the launch to refuse."""
    names = PLACEHOLDER.findall(value)
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{where}: unknown placeholder {{{missing[0]}}}; known: {', '.join(sorted(values))}")
    if any(values[n] is None for n in names) and not keep_unset:
        return None
    return PLACEHOLDER.sub(lambda m: m.group(0) if values[m.group(1)] is None else str(values[m.group(1)]), value)


def _argv(args: dict, values: dict[str, str | None], where: str, keep_unset: bool) -> list[str]:
    argv: list[str] = []
    for key, value in (args or {}).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            filled = _fill(str(value), values, f"{where} --{key}", keep_unset)
            if filled is not None:
                argv += [flag, filled]
    return argv


def plan(spec: dict, output_dir: str | os.PathLike, datasets: dict[str, str] | None = None,
         checkpoint: str | None = None, only: list[str] | None = None, profile_file: str | None = None,
         overrides: dict | None = None, profile: str | None = None) -> list[Step]:
    """The suite's steps, in an order where every step comes after the steps whose checkpoints it reads.

    Each step's cluster profile is its own (``profile:`` in the file), or ``profile`` for every step when given,
    with ``overrides`` (flag values; None = not given) on top."""
    output_dir = Path(output_dir).resolve()
    datasets = {**{k: (str(v) if v is not None else None) for k, v in (spec.get("datasets") or {}).items()},
                **(datasets or {})}
    unknown = set(datasets) - set(spec.get("datasets") or {})
    if unknown:
        raise ValueError(f"--dataset {sorted(unknown)[0]}: suite {spec['name']} reads "
                         f"{', '.join(sorted(spec.get('datasets') or {})) or 'no datasets'}")
    values = {**datasets, "checkpoint": checkpoint, "repo": str(REPO)}
    required = bool(spec.get("datasets_required"))
    names = list(spec["steps"])
    if only:
        bad = [n for n in only if n not in names]
        if bad:
            raise ValueError(f"--only {bad[0]}: no such step in suite {spec['name']}; steps: {', '.join(names)}")
    selected = [n for n in names if not only or n in only]
    steps: dict[str, Step] = {}
    scale, fixed, used, archs = spec.get("scale"), spec.get("set") or {}, set(), {}
    for name in _dependency_order(spec["steps"], selected):
        s = spec["steps"][name]
        where = f"suite {spec['name']}, step {name}"
        entry = s.get("entry", "eval")
        if entry not in ENTRIES:
            raise ValueError(f"{where}: unknown entry {entry!r}; known: {', '.join(ENTRIES)}")
        argv = (["--task", s["task"]] if entry == "eval" else []) + _argv(s.get("args"), values, where, required)
        needs, input_ckpt = [], None
        ref = s.get("checkpoint")
        try:  # the profile's fields < the step's resources < the flags
            step_profile = load_profile(profile or s.get("profile", "local"), profile_file).with_overrides(
                **(s.get("resources") or {})).with_overrides(**(overrides or {}))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if scale or fixed:
            if entry == PRETRAIN:
                from pretrain.main import parse_args

                archs[name] = parse_args(argv).arch
            try:
                argv += scaled_flags(entry, argv, scale or {}, fixed, step_profile.world_size,
                                     archs.get(ref, DEFAULT_ARCH), used)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if ref in spec["steps"]:
            input_ckpt = latest_path(output_dir / ref)
            if ref in selected:
                needs.append(ref)
            elif not input_ckpt.is_file():
                raise FileNotFoundError(f"{where} evaluates {input_ckpt} (written by step {ref}), which does not "
                                        f"exist: run step {ref} first, or leave out --only")
        elif ref:
            filled = _fill(str(ref), values, f"{where} checkpoint", False)
            input_ckpt = Path(filled) if filled else None
            if input_ckpt is not None and not input_ckpt.is_file():
                raise FileNotFoundError(f"{where}: checkpoint {input_ckpt} does not exist; check --checkpoint")
        if input_ckpt is not None:
            argv += ["--checkpoint", str(input_ckpt)]
        sweep = _sweep(s.get("sweep"), values, where, required)
        steps[name] = Step(name, entry, argv, output_dir / name, step_profile, needs, sweep, input_ckpt,
                           ref if ref in spec["steps"] else None)
    unused = unused_key({**(scale or {}), **fixed}, used) if not only else None
    if unused:
        raise ValueError(f"suite {spec['name']}: {unused} (scale or set) is a flag of no step (known flags: each "
                         f"step's, or TASK.flag / pretrain.flag)")
    return list(steps.values())


def _sweep(sweep: dict | None, values: dict[str, str | None], where: str, keep_unset: bool) -> Sweep | None:
    """A step's job array; a flag whose values all name an unset data set is left out (the built-in sample's own
    subsets), unless the suite's data sets are required."""
    flags = []
    for flag, vals in (sweep or {}).items():
        filled = [_fill(str(v), values, f"{where} sweep {flag}", keep_unset) for v in vals]
        if all(f is None for f in filled):
            continue
        if any(f is None for f in filled):
            raise ValueError(f"{where}: sweep {flag} mixes values with and without a data set: {vals}")
        flags.append(f"{flag}={','.join(filled)}")
    return parse_sweep(flags) if flags else None


def _dependency_order(all_steps: dict, selected: list[str]) -> list[str]:
    order, seen = [], set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise ValueError(f"suite steps depend on each other in a cycle: {' -> '.join(stack + (name,))}")
        ref = all_steps[name].get("checkpoint")
        if ref in all_steps and ref in selected:
            visit(ref, stack + (name,))
        seen.add(name)
        order.append(name)

    for name in selected:
        visit(name, ())
    return order


def unset_datasets(steps: list[Step]) -> list[str]:
    return sorted({m for s in steps for m in PLACEHOLDER.findall(s.command())})


def format_plan(spec: dict, steps: list[Step], launcher: str, output_dir: Path) -> str:
    lines = [f"suite {spec['name']} ({spec['path']}): {len(steps)} steps, launcher {launcher}, output {output_dir}"]
    for s in steps:
        after = f"afterok:{','.join(s.needs)}" if s.needs else "-"
        array = f", array of {len(s.sweep[0][1])}" if s.sweep else ""
        lines += [f"  {s.name}  [{s.profile.name}: {s.profile.describe()}{array}]  after: {after}",
                  f"      {s.command()}"]
    renders = [w for w, key in (("paper_table.md/.csv", "table"), ("report.md + plots", "report")) if spec.get(key)]
    if renders:
        lines.append(f"  then: {' and '.join(renders)} in {output_dir} (after every step, whatever its outcome)")
    return "\n".join(lines)


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def estimates(steps: list[Step]) -> list[budget.Estimate]:
    """Every step's (and every job of a sweep's) estimates; the arch an evaluation reads is its ``--arch``, the
    arch its pretraining step trains, or the one in its checkpoint file."""
    archs: dict[str, str] = {}
    out = []
    for s in steps:
        world = s.profile.world_size
        try:
            if s.entry == "pretrain":
                w = budget.pretrain_workload(s.argv, world)
                archs[s.name] = w.arch
                out.append(budget.estimate(s.name, w, s.profile))
                continue
            spec = task_spec(_flag(s.argv, "--task"))
            if spec.workload is None:
                raise ValueError(f"--task {spec.name} declares no workload (TaskSpec.workload)")
            arch = _flag(s.argv, "--arch") or archs.get(s.source) or _checkpoint_arch(s.input_checkpoint)
            runs = [(s.name, s.argv)] if not s.sweep else [
                (f"{s.name}/{element}", [*s.argv, *flags]) for element, flags in sweep_elements(s.sweep)]
            for label, argv in runs:
                out.append(budget.estimate(label, spec.workload(budget.step_args(spec.add_arguments, argv), arch,
                                                                world), s.profile))
        except ValueError as e:
            raise ValueError(f"step {s.name}: {e}") from None
    return out


def _checkpoint_arch(path: Path | None) -> str:
    if path is None or not path.is_file():
        return DEFAULT_ARCH
    from bam.formats import load_backbone

    return load_backbone(path).arch


def run_steps(steps: list[Step], launcher: str) -> dict[str, str]:
    """Run the steps here in order (launcher none: in this process; local: submitit's local executor, waiting for
    each). A step whose input step failed is skipped, as SLURM's afterok would. Returns step -> outcome."""
    outcome: dict[str, str] = {}
    for s in steps:
        failed = [n for n in s.needs if outcome.get(n) != "COMPLETED"]
        if failed:
            outcome[s.name] = f"SKIPPED (step {failed[0]} did not complete)"
            logger.error("suite: skipping %s: step %s did not complete", s.name, failed[0])
            continue
        logger.info("suite: step %s: %s", s.name, s.command())
        if launcher == "none" and not s.sweep:
            code = entry_main(s.entry)([*s.argv, "--output-dir", str(s.output_dir)])
            outcome[s.name] = "COMPLETED" if code == 0 else f"FAILED (exit code {code})"
        else:
            profile = dataclasses.replace(load_profile("local"), time_min=s.profile.time_min)
            jobs = submit(s.entry, s.argv, s.output_dir, "local" if launcher == "none" else launcher, profile,
                          name=f"bam-{s.name}", sweep=s.sweep)
            failures = [f for f in wait_for(jobs) if f]
            outcome[s.name] = "COMPLETED" if not failures else f"FAILED ({failures[0]})"
        if outcome[s.name] != "COMPLETED":
            logger.error("suite: step %s: %s", s.name, outcome[s.name])
    return outcome


def submit_steps(spec: dict, steps: list[Step], output_dir: Path, render_profile: Profile) -> dict[str, str]:
    """Submit every step to SLURM, each after the steps it reads (afterok), then one job that renders the table or
    report after all of them (afterany). Returns step -> job id."""
    ids: dict[str, str] = {}
    for s in steps:
        dependency = "afterok:" + ":".join(ids[n] for n in s.needs) if s.needs else None
        profile = s.profile.with_overrides(sbatch={"kill-on-invalid-dep": "yes"}) if dependency else s.profile
        jobs = submit(s.entry, s.argv, s.output_dir, "slurm", profile, name=f"bam-{s.name}", sweep=s.sweep,
                      dependency=dependency)
        ids[s.name] = jobs[0].job_id.split("_")[0]
    if spec.get("table") or spec.get("report"):
        jobs = submit("eval", ["--suite", spec["path"], "--render"], output_dir, "slurm", render_profile,
                      name=f"bam-{spec['name']}-render", dependency="afterany:" + ":".join(ids.values()))
        ids["render"] = jobs[0].job_id
    return ids


def run_suite(args: argparse.Namespace) -> int:
    """``eval/run.py --suite NAME``: plan, then print it (--dry-run), render (--render), or run / submit it."""
    if args.sweep or args.wait:
        raise ValueError("--sweep and --wait apply to one run (--task); a suite's steps declare their own sweeps, "
                         "and --status follows a submitted suite")
    spec = load_suite(args.suite)
    output_dir = Path(args.output_dir or Path("outputs") / f"suite-{spec['name']}").resolve()
    if args.render:
        return render(spec, output_dir, args.checkpoint)
    overrides = profile_overrides(args)
    steps = plan(spec, output_dir, parse_datasets(args.dataset), args.checkpoint,
                 [n for n in (args.only or "").split(",") if n] or None, args.profile_file, overrides, args.profile)
    if args.dry_run or args.launcher == "slurm":  # the plan is checked before anything is submitted
        checked = estimates(steps)
        if args.dry_run:
            print(format_plan(spec, steps, args.launcher, output_dir))
            print(budget.format_estimates(checked))
        problem = budget.first_problem(checked)
        if problem:
            raise ValueError(f"suite {spec['name']}: {problem}")
        if args.dry_run:
            return 0
    missing = unset_datasets(steps)
    if missing:
        raise ValueError(f"suite {spec['name']} needs --dataset {missing[0]}=DIR (datasets to give: "
                         f"{', '.join(missing)}); --dry-run shows the plan without them")
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.launcher == "slurm":
        # the render job: where the last step runs (its partition and account, with the user's overrides), no GPU
        render_profile = steps[-1].profile.with_overrides(gpus_per_node=0, tasks_per_node=1, nodes=1,
                                                          cpus_per_task=1, mem_gb=4, time_min=30)
        ids = submit_steps(spec, steps, output_dir, render_profile)
        logger.info("suite %s: submitted %d jobs (%s); follow them: python eval/run.py --status %s", spec["name"],
                    len(ids), " ".join(f"{k}={v}" for k, v in ids.items()), output_dir)
        return 0
    outcome = run_steps(steps, args.launcher)
    code = render(spec, output_dir, args.checkpoint)
    failed = {k: v for k, v in outcome.items() if v != "COMPLETED"}
    logger.info("suite %s: %d of %d steps completed%s", spec["name"], len(outcome) - len(failed), len(outcome),
                f"; not: {', '.join(failed)}" if failed else "")
    return 1 if failed or code else 0


def render(spec: dict, output_dir: Path, checkpoint: str | None = None) -> int:
    from eval.paper_table import write_table
    from eval.report import write_report

    if spec.get("table"):
        md, _ = write_table(spec, output_dir)
        logger.info("wrote %s and .csv", md)
    if spec.get("report"):
        logger.info("wrote %s", write_report(spec, output_dir, checkpoint))
    return 0
