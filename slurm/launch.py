"""One submit path for both front doors: the same command line, run by a submitit job.

``python eval/run.py ... --launcher slurm`` and ``python pretrain/main.py ... --launcher slurm`` strip their launch
flags and hand the rest of the command line to :class:`FrontDoorJob`, which submitit pickles and runs on the
allocated nodes: it exports the rank, world size and master address from submitit's job environment (the
distributed helpers then join NCCL on GPUs, gloo on CPUs) and calls the front door's ``main``. On preemption or a
time limit, submitit calls :meth:`FrontDoorJob.checkpoint` and requeues the same call; the requeued job resumes
from the file training writes (``bam.checkpoint.latest_path``), because both front doors resume from it by
themselves. ``--launcher local`` runs the same job through submitit's local executor (a subprocess on this machine).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.local.debug import DebugJob

from bam.checkpoint import latest_path
from bam.cli import setup_logging
from slurm.outcome import read_outcome
from slurm.profiles import FIELDS, Profile, load_profile

logger = logging.getLogger(__name__)

LAUNCHERS = ("none", "local", "slurm", "debug")  # debug: submitit's in-process executor (tests, pdb)


@dataclass(frozen=True)
class Entry:
    module: str  # imported only where the entry runs (a job, a suite step): slurm/ imports no entry point
    script: str  # the command line a user types, relative to the checkout


# the one registry of entry points: the launcher, the suites and their printed plans read it
ENTRIES = {"eval": Entry("eval.run", "eval/run.py"), "pretrain": Entry("pretrain.main", "pretrain/main.py")}
JOB_RECORD = "job.json"


def entry_main(name: str) -> Callable[[list[str]], int]:
    """The ``main(argv) -> exit code`` of an entry point, imported now."""
    return importlib.import_module(ENTRIES[name].module).main


class JobFailed(RuntimeError):
    """A front door inside a job returned non-zero; the message is its last logged error."""


# ---------------------------------------------------------------------------------------------- front-door flags

def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("launching", "run in this process (default), through submitit's local executor, "
                                  "or as a SLURM job; resources come from a cluster profile (slurm/profiles.yaml)")
    g.add_argument("--launcher", default="none", choices=LAUNCHERS,
                   help="none: in this process; local: a submitit job on this machine; slurm: sbatch through submitit")
    g.add_argument("--profile", default=None, help="cluster profile name (default: local with --launcher "
                   "slurm: the one-node cluster of slurm/local_cluster.sh)")
    g.add_argument("--profile-file", default=None, help="YAML file of your own profiles (also $BAM_SLURM_PROFILES)")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--nodes", type=int, default=None)
    g.add_argument("--gpus-per-node", type=int, default=None)
    g.add_argument("--tasks-per-node", type=int, default=None, help="processes per node (one per GPU for DDP)")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    g.add_argument("--time-min", type=int, default=None, help="time limit; the job is requeued when it is reached")
    g.add_argument("--sbatch", action="append", default=None, metavar="KEY=VALUE",
                   help="extra sbatch option, repeatable (e.g. --sbatch exclusive=true --sbatch comment=bam)")
    g.add_argument("--sweep", action="append", default=None, metavar="FLAG=V1,V2,...",
                   help="a job array: one job per value of FLAG (e.g. --sweep fractions=0.01,0.1), each writing "
                        "<output-dir>/<FLAG>=<V>; repeated, the flags' values go together (the i-th of each)")
    g.add_argument("--wait", action="store_true", help="with --launcher slurm: wait for the job(s) and report their "
                   "outcome (--launcher local always waits)")


def _launch_flags() -> dict[str, bool]:
    """flag -> takes a value, read from :func:`add_launch_arguments` itself (the job's command line is the
    user's minus these)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_launch_arguments(parser)
    return {flag: action.nargs != 0 for action in parser._actions for flag in action.option_strings}


LAUNCH_FLAGS = _launch_flags()
LAUNCH_DESTS = {flag[2:].replace("-", "_") for flag in LAUNCH_FLAGS}


def strip_launch_flags(argv: list[str]) -> list[str]:
    """The command line the job runs: ``argv`` without the launch flags (``--flag value`` or ``--flag=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = LAUNCH_FLAGS[name] and "=" not in a
            continue
        out.append(a)
    return out


def parse_sbatch(pairs: list[str] | None) -> dict | None:
    if not pairs:
        return None
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--sbatch {pair!r}: expected KEY=VALUE (an sbatch long option without --)")
        options[key.strip().lstrip("-")] = True if value.lower() == "true" else value
    return options


Sweep = list[tuple[str, list[str]]]  # [(flag, values)], zipped: element i takes the i-th value of every flag


def parse_sweep(specs: list[str] | None) -> Sweep | None:
    if not specs:
        return None
    sweep = []
    for spec in specs:
        flag, sep, values = spec.partition("=")
        items = [v for v in values.split(",") if v]
        if not sep or not flag or not items:
            raise ValueError(f"--sweep {spec!r}: expected FLAG=V1,V2,... (e.g. --sweep fractions=0.01,0.1)")
        sweep.append((flag.lstrip("-"), items))
    if len({len(values) for _, values in sweep}) > 1:
        raise ValueError(f"--sweep: the swept flags have different numbers of values ({specs}); they go together")
    return sweep


def sweep_elements(sweep: Sweep) -> list[tuple[str, list[str]]]:
    """(sub-folder name, extra flags) of every array element; the folder is named by the first flag."""
    first, values = sweep[0]
    return [(f"{first}={values[i]}", [a for flag, vals in sweep for a in (f"--{flag.replace('_', '-')}", vals[i])])
            for i in range(len(values))]


def profile_overrides(args: argparse.Namespace) -> dict:
    """The resource flags as profile fields (None where a flag was not given)."""
    fields = {f: getattr(args, f, None) for f in FIELDS - {"sbatch", "signal_delay_s", "max_num_timeout"}}
    return {**fields, "sbatch": parse_sbatch(args.sbatch)}


def profile_from_args(args: argparse.Namespace) -> Profile:
    return load_profile(args.profile or "local", args.profile_file, **profile_overrides(args))


# ------------------------------------------------------------------------------------------------------- the job

class _LastError(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


def _checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints a run writes under its folder: its own, a subset's (one level down), mmengine's."""
    found = [latest_path(output_dir), *(latest_path(d) for d in output_dir.glob("*") if d.is_dir())]
    return [p for p in found if p.is_file()] + sorted(output_dir.glob("mmseg/iter_*.pth"))


@dataclass
class FrontDoorJob:
    """What submitit pickles: a front door (``eval`` or ``pretrain``), its command line and its output folder."""

    entry: str
    argv: list[str]
    output_dir: Path | None = None  # where the command writes results.json and checkpoint.pth (its --output-dir)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for bam.distributed
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        main = entry_main(self.entry)
        # the front door's own basicConfig would be a no-op once a handler is on the root logger
        setup_logging()
        errors = _LastError()
        logging.getLogger().addHandler(errors)
        try:
            code = main(list(self.argv))
        finally:
            logging.getLogger().removeHandler(errors)
        if code:
            raise JobFailed(errors.message or f"{self.entry} exited with code {code}")
        results_file = self.output_dir / "results.json" if self.output_dir else None
        results = json.loads(results_file.read_text()) if results_file and results_file.is_file() else None
        return {"rank": env.global_rank, "world_size": env.num_tasks, "job_id": env.job_id, "results": results}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out: requeue the same command, which resumes by itself.

        submitit then runs ``scontrol requeue``, and SLURM, requeueing, sends SIGTERM to every process of the job at
        once: to that scontrol too, before it has exited, often enough on a busy node. Killed, it makes submitit
        record the requeued job as failed (its error becomes the job's result until the requeued run replaces it).
        From here this process only requeues and exits, so it ignores SIGTERM, and so does the scontrol it starts
        (a child inherits an ignored signal).
        """
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        saved = _checkpoints(Path(self.output_dir)) if self.output_dir else []
        if saved:  # the run's own (semisup: one per fraction, <out>/<p>pct/; ADE20K: mmseg/iter_N.pth)
            logger.warning("requeueing; the job will resume from %s", max(saved, key=lambda p: p.stat().st_mtime))
        else:
            logger.warning("requeueing; no checkpoint yet, the job will start over")
        return submitit.helpers.DelayedSubmission(FrontDoorJob(self.entry, list(self.argv), self.output_dir))


# -------------------------------------------------------------------------------------------------- submitting

def make_executor(launcher: str, folder: Path, profile: Profile, name: str,
                  dependency: str | None = None) -> submitit.Executor:
    if launcher not in ("local", "slurm", "debug"):
        raise ValueError(f"--launcher {launcher!r}: expected one of local, slurm, debug")
    if launcher == "slurm" and not shutil.which("sbatch"):
        raise ValueError("--launcher slurm needs sbatch on PATH (a SLURM login node, or slurm/local_cluster.sh up "
                         "here); --launcher local runs the same job on this machine")
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher, slurm_max_num_timeout=profile.max_num_timeout)
    params = {"name": name, "timeout_min": profile.time_min, "nodes": profile.nodes,
              "tasks_per_node": profile.tasks_per_node, "gpus_per_node": profile.gpus_per_node,
              "cpus_per_task": profile.cpus_per_task}
    if launcher == "slurm":
        extra = dict(profile.sbatch)
        if dependency:
            extra["dependency"] = dependency
        params.update(slurm_signal_delay_s=profile.signal_delay_s, slurm_additional_parameters=extra)
        if profile.mem_gb:
            params["mem_gb"] = profile.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(profile, key):
                params[f"slurm_{key}"] = getattr(profile, key)
    elif launcher == "local":
        if profile.nodes > 1:
            raise ValueError("--launcher local runs on this machine only: use --nodes 1 (or --launcher slurm)")
    executor.update_parameters(**params)
    return executor


def submit(entry: str, argv: list[str], output_dir: str | os.PathLike, launcher: str, profile: Profile,
           name: str | None = None, sweep: Sweep | None = None,
           dependency: str | None = None) -> list[submitit.Job]:
    """Submit ``entry``'s command line ``argv`` as one job (or a job array over ``sweep``'s values).

    ``output_dir`` is the job folder: submitit's logs go to ``<output_dir>/jobs``, the submission record to
    ``<output_dir>/job.json`` and the front door writes its results and checkpoints there (an array element
    writes ``<output_dir>/<flag>=<value>``). ``dependency`` is SLURM's (``afterok:12:13``).
    """
    if entry not in ENTRIES:
        raise ValueError(f"unknown entry {entry!r}; known: {', '.join(ENTRIES)}")
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    argv = list(argv)
    name = name or f"bam-{entry}"
    if sweep is None:
        calls = [(output_dir, FrontDoorJob(entry, argv + ["--output-dir", str(output_dir)], output_dir))]
    else:
        calls = [(output_dir / sub,
                  FrontDoorJob(entry, argv + extra + ["--output-dir", str(output_dir / sub)], output_dir / sub))
                 for sub, extra in sweep_elements(sweep)]
    executor = make_executor(launcher, output_dir / "jobs", profile, name, dependency)
    try:
        if len(calls) == 1:
            jobs = [executor.submit(calls[0][1])]
        else:
            with executor.batch():  # a SLURM job array
                pending = [executor.submit(job) for _, job in calls]
            jobs = list(pending)
    except submitit.core.utils.FailedJobError as e:  # sbatch refused: say why in one line
        lines = [line.removeprefix("sbatch: error:").strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"sbatch refused the job ({profile.describe()}): {lines[0] if lines else e}; "
                         f"check --profile and its overrides (sinfo lists partitions)") from None
    record = {"entry": entry, "launcher": launcher, "profile": profile.name, "resources": profile.describe(),
              "dependency": dependency, "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "folder": str(executor.folder),
              "jobs": [{"job_id": j.job_id, "output_dir": str(d), "argv": call.argv}
                       for j, (d, call) in zip(jobs, calls)]}
    (output_dir / JOB_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for j, (d, _) in zip(jobs, calls):
        logger.info("submitted %s job %s (%s): output %s, logs %s", launcher, j.job_id, profile.describe(), d,
                    executor.folder)
    return jobs


def failure_message(error: BaseException) -> str:
    """One line from a failed job: our JobFailed message, else the last line of the job's traceback."""
    text = str(error)
    found = re.findall(r"JobFailed: (.+)", text)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    tb = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    return (tb or lines or [type(error).__name__])[-1]


def wait_for(jobs: list[submitit.Job]) -> list[str | None]:
    """Wait for every job; ``None`` for a success, else the one-line reason it failed."""
    outcomes: list[str | None] = []
    for job in jobs:
        if isinstance(job, DebugJob):  # ran in this process: its result is in memory, no file is read
            try:
                job.results()
                outcomes.append(None)
            except Exception as e:
                outcomes.append(f"job {job.job_id} failed: {failure_message(e)}")
            continue
        job.wait()  # then its result files, read as plain data only (never plain pickle.load)
        reasons = []
        for task in range(job.num_tasks):
            path = job.task(task).paths.result_pickle
            deadline = time.time() + 15  # a shared file system may show the file after sacct shows the end
            while not path.is_file() and time.time() < deadline:
                time.sleep(1)
            outcome = read_outcome(path) if path.is_file() else ("error", f"no result (state {job.state})")
            if outcome is None:
                reasons.append(f"{path} holds more than plain data; not read")
            elif outcome[0] != "success":
                reasons.append(failure_message(RuntimeError(str(outcome[1]))))
        outcomes.append(f"job {job.job_id} failed: {reasons[0]} (logs: {job.paths.stderr})" if reasons else None)
    return outcomes


def check_in_process(args: argparse.Namespace) -> None:
    """Launch flags that mean nothing without a launcher are an error, not silently ignored."""
    if args.sweep:
        raise ValueError("--sweep makes a job array: add --launcher local or --launcher slurm")
    if args.wait:
        raise ValueError("--wait waits for a submitted job: add --launcher slurm")


def launch(entry: str, argv: list[str], args: argparse.Namespace, output_dir: str | os.PathLike) -> int:
    """The front doors' ``--launcher local|slurm``: submit, and wait when local (or ``--wait``)."""
    profile = profile_from_args(args)
    jobs = submit(entry, strip_launch_flags(argv), output_dir, args.launcher, profile, sweep=parse_sweep(args.sweep))
    if args.launcher == "slurm" and not args.wait:
        logger.info("see how they do: python eval/run.py --status %s", Path(output_dir).resolve())
        return 0
    failures = [f for f in wait_for(jobs) if f]
    for f in failures:
        logger.error("%s", f)
    if not failures:
        logger.info("%d job(s) finished; results in %s", len(jobs), Path(output_dir).resolve())
    return 1 if failures else 0
