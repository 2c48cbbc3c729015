"""The one front door: evaluate any checkpoint on any downstream task.

    python eval/run.py --task davis                                  # random-init ViT-S/16 on the built-in sample
    python eval/run.py --task davis --checkpoint dino_vits16.pth --data /data/DAVIS
    python eval/run.py --task davis --predictions my_method/ --data /data/DAVIS   # score another method's PNGs
    python eval/run.py --task linear --checkpoint ckpt.pth --data /data/imagenet --cache-features
    python eval/run.py --task coco --checkpoint ckpt.pth --data /data/coco --preset vitdet_100ep
    python eval/run.py --task knn --checkpoint ckpt.pth --launcher slurm --profile gpu-1   # a SLURM job
    python eval/run.py --status outputs/knn                          # the jobs launched there and their states
    python eval/run.py --suite paper --dry-run                       # the paper's experiments as jobs, printed
    python eval/run.py --suite all --checkpoint ckpt.pth             # every task, then a report card
    python eval/run.py --task TASK --help                            # one task's flags and their defaults

Every run writes <output-dir>/results.json (task, metrics, checkpoint and its sha256, detected format, arch,
data, resolved config, versions, seconds) and prints a short table.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from bam.backbones import ARCHS, Backbone, build_backbone  # noqa: E402
from bam.checkpoint import UnsafeCheckpointError  # noqa: E402
from bam.cli import FlagParser, HelpFormatter, document_defaults, resolve_device, setup_logging  # noqa: E402
from bam.distributed import fail_together, get_dist_info, init_distributed, is_dist, launched_as  # noqa: E402
from bam.formats import CONVERTERS, load_backbone  # noqa: E402
from bam.results import run_lock, sha256, versions, write_results  # noqa: E402
from bam.samples.cache import default_cache_dir  # noqa: E402
from eval.context import TaskContext  # noqa: E402
from eval.suite import run_suite  # noqa: E402
from eval.tasks import TASKS, TaskSpec, task_spec  # noqa: E402
from slurm.launch import add_launch_arguments, check_in_process, launch  # noqa: E402
from slurm.status import collect, format_status  # noqa: E402
from transfer.features import FeatureCache  # noqa: E402

logger = logging.getLogger("eval.run")

DEFAULT_ARCH = "vit_small_patch16_224"


def get_args_parser(task: str | None) -> argparse.ArgumentParser:
    tasks = "; ".join(f"{n}: {task_spec(n).help}" for n in TASKS)
    # tasks share flag names with one meaning (--image-size, --epochs, ...); the all-tasks help lists each once
    parser = FlagParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False,
                        epilog=f"tasks: {tasks}" + ("" if task else ". Tasks share some flag names; "
                                                     "'--task NAME --help' lists one task's flags and defaults"),
                        conflict_handler="error" if task else "resolve")
    parser.add_argument("--task", choices=sorted(TASKS), help="the downstream protocol to run")
    suite = parser.add_argument_group("suites", "many runs as one plan: eval/suites/<name>.yaml (steps, their "
                                      "dependencies and resources), then a table or a report card")
    suite.add_argument("--suite", default=None, help="paper: every experiment of the paper, then paper_table.md/.csv; "
                       "all: every task on --checkpoint, then report.md + plots; or a path to your own suite YAML")
    suite.add_argument("--dry-run", action="store_true", help="print the suite's plan (jobs, resources, commands, "
                       "dependencies) and submit nothing")
    suite.add_argument("--only", default=None, help="comma-separated steps of the suite to run (their input "
                       "checkpoints must exist)")
    suite.add_argument("--dataset", action="append", default=None, metavar="NAME=DIR",
                       help="a suite's data set folder, repeatable (e.g. --dataset imagenet=/data/imagenet)")
    suite.add_argument("--render", action="store_true", help="only render the suite's table / report card from the "
                       "results already in --output-dir")
    suite.add_argument("--status", default=None, metavar="DIR",
                       help="list the jobs launched under DIR (a run's or a suite's --output-dir) and their states")
    parser.add_argument("--checkpoint", default=None,
                        help="any checkpoint load_backbone reads (ours, official BAM, DINO, iBOT, MoCo v1/v2/v3, MAE, "
                             "DINOv2 hub/teacher/linear, MSN, I-JEPA, timm, torchvision, SwAV; .pth or .safetensors); "
                             "none: a random-init baseline of --arch")
    parser.add_argument("--arch", default=None, help=f"backbone name (default: from the checkpoint, or {DEFAULT_ARCH} "
                        f"without one); known: {', '.join(sorted(ARCHS))}")
    parser.add_argument("--format", default="auto", choices=["auto", *CONVERTERS], help="checkpoint format")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint whose pickle needs arbitrary code (only for files you trust)")
    parser.add_argument("--data", default=None, help="data root (default: the task's built-in sample)")
    parser.add_argument("--output-dir", default=None, help="where results go (default: outputs/<task>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda[:N]")
    parser.add_argument("--cache-dir", default=None, help="where built-in samples are generated "
                        "(default: $BAM_CACHE or ~/.cache/bam)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random-init baseline and any sampling")
    parser.add_argument("--cache-features", action="store_true",
                        help="frozen protocols (knn, linear, semisup logreg) keep their features in "
                             "<cache-dir>/features, keyed by checkpoint sha256, arch, image list and transform")
    parser.add_argument("--allow-nonfinite", action="store_true", help="evaluate a checkpoint with NaN/inf weights "
                        "(recorded as a warning in results.json) instead of refusing it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_launch_arguments(parser)
    for name in [task] if task else TASKS:
        spec = task_spec(name)
        group = parser.add_argument_group(f"--task {name}", spec.help)
        spec.add_arguments(group)
        document_defaults(group, spec.defaults, spec.sample)
    return parser


def format_table(task: str, metrics: dict[str, float], label: str) -> str:
    """A short fixed-width table of the headline metrics."""
    width = max(len(k) for k in metrics) if metrics else 6
    lines = [f"{task} -- {label}", "-" * (width + 12)]
    lines += [f"{k:<{width}}  {v:>9.4f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>9}"
              for k, v in metrics.items()]
    return "\n".join(lines)


def check_finite(backbone: Backbone, source: str, allow: bool, info: dict) -> None:
    """Non-finite weights make every downstream number meaningless: an error naming the tensors, or with
    --allow-nonfinite a warning recorded in results.json."""
    bad = [name for name, t in backbone.model.state_dict().items() if t.is_floating_point() and
           not torch.isfinite(t).all()]
    if not bad:
        return
    message = f"{source}: non-finite values (NaN/inf) in {len(bad)} tensor(s): {', '.join(bad[:4])}" \
              f"{' ...' if len(bad) > 4 else ''}"
    if not allow:
        raise ValueError(f"{message}; the run that wrote it diverged (use an earlier checkpoint, or "
                         "--allow-nonfinite to evaluate it anyway)")
    logger.warning("%s (--allow-nonfinite: evaluating anyway)", message)
    info["warnings"] = [*info.get("warnings", []), message]


def make_backbone_loader(args: argparse.Namespace, info: dict):
    def load() -> Backbone:
        if args.checkpoint:
            backbone = load_backbone(args.checkpoint, arch=args.arch, fmt=args.format, trust=args.trust_checkpoint)
            check_finite(backbone, args.checkpoint, args.allow_nonfinite, info)
            info.update(checkpoint=str(Path(args.checkpoint).resolve()), checkpoint_sha256=sha256(args.checkpoint),
                        checkpoint_format=backbone.checkpoint_format, random_init=False)
        else:
            torch.manual_seed(args.seed)
            backbone = build_backbone(args.arch or DEFAULT_ARCH)
            logger.warning("no --checkpoint: evaluating a RANDOMLY INITIALISED %s (a baseline, not a trained model)",
                           backbone.arch)
            info.update(checkpoint=None, checkpoint_sha256=None, checkpoint_format=None, random_init=True,
                        seed=args.seed)
        info.update(arch=backbone.arch, arch_kwargs=backbone.arch_kwargs)
        return backbone
    return load


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task")
    pre.add_argument("--status")
    known, _ = pre.parse_known_args(argv)
    setup_logging()
    if known.status:
        try:
            print(format_status(collect(known.status)))
        except FileNotFoundError as e:
            logger.error("%s", e)
            return 2
        return 0
    task = known.task if known.task in TASKS else None
    parser = get_args_parser(task)
    args = parser.parse_args(argv)
    if bool(args.task) == bool(args.suite):
        parser.error("give one of --task NAME (one run) or --suite NAME (many)")
    try:
        if args.suite:
            return run_suite(args)
        if args.launcher != "none":
            return launch("eval", argv, args, args.output_dir or Path("outputs") / args.task)
        check_in_process(args)
        return run(args)
    except (ValueError, FileNotFoundError, UnsafeCheckpointError) as e:
        if args.debug:
            raise
        logger.error("%s", e)
        return 2
    finally:
        if is_dist():
            torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    start = time.time()
    spec = task_spec(args.task)
    device = resolve_device(args.device)
    if launched_as().world_size > 1 and not spec.distributed:  # refused before any rank waits for another
        raise ValueError(f"--task {args.task} runs in one process; start it without torchrun / srun "
                         f"(tasks that run on several processes: "
                         f"{', '.join(n for n in TASKS if task_spec(n).distributed)})")
    dist_info = init_distributed(device)  # under torchrun or srun: one rank per process
    if dist_info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    output_dir = Path(args.output_dir or Path("outputs") / args.task)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.checkpoint and Path(args.checkpoint).is_dir():
        raise ValueError(f"--checkpoint {args.checkpoint} is a folder; give the checkpoint file in it")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file; give a folder")
    if args.data:
        data_root, is_sample = Path(args.data), False
        if not data_root.is_dir():
            raise FileNotFoundError(f"--data {data_root} is not a folder")
        if output_dir.resolve().is_relative_to(data_root.resolve()):
            raise ValueError(f"--output-dir {output_dir} is inside --data {data_root}: a run must never write into "
                             "its data set (it could overwrite the ground truth); write elsewhere")
    else:
        data_root, is_sample = spec.builtin_sample(cache), True
        logger.info("no --data: using the built-in sample at %s (generated, not the real data set)", data_root)
    # validated before the first byte is written: a failed run leaves an earlier results.json as it was, and a
    # folder it created itself only if it wrote something there
    created = not output_dir.exists()
    if dist_info.rank == 0:  # the one writer: the other ranks never create the folder a failed run must not leave
        output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            with fail_together():  # a folder in use stops every rank, not rank 0 alone
                stack.enter_context(run_lock(output_dir, dist_info.rank == 0))
            return _run_task(args, spec, device, dist_info, output_dir, cache, data_root, is_sample, start)
    except BaseException:
        if created and dist_info.rank == 0:
            (output_dir / ".bam.lock").unlink(missing_ok=True)
            if not any(output_dir.iterdir()):
                output_dir.rmdir()
        raise


def _run_task(args: argparse.Namespace, spec: TaskSpec, device: torch.device, dist_info, output_dir: Path,
              cache: Path, data_root: Path, is_sample: bool, start: float) -> int:
    info: dict = {"checkpoint": None, "checkpoint_sha256": None, "checkpoint_format": None, "random_init": None,
                  "arch": None}
    ctx = TaskContext(device, output_dir, data_root, is_sample, make_backbone_loader(args, info), info,
                      FeatureCache(cache / "features" if args.cache_features else None))
    outcome = spec.run(ctx, args)
    info.pop("seed", None)
    metrics = outcome.pop("metrics")
    results = {"task": args.task, "metrics": metrics, **info,
               "data": {"root": str(data_root.resolve()), "builtin_sample": is_sample},
               "config": vars(args), "versions": versions(), "seconds": round(time.time() - start, 2), **outcome}
    if is_sample:
        results["note"] = "built-in sample generated from installed packages' data: shows the pipeline works; " \
                          "not the real data set"
    if get_dist_info().rank != 0:  # rank 0 writes and talks
        return 0
    if dist_info.world_size > 1:
        results["world_size"] = dist_info.world_size
    path = write_results(output_dir, results)
    label = "random-init " + (info["arch"] or "") if info["random_init"] else (info["checkpoint"] or "predictions")
    print(format_table(args.task, metrics, f"{label}{' (built-in sample)' if is_sample else ''}"))
    logger.info("wrote %s (%.0f s)", path, results["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
