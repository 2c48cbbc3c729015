"""BAM pretraining: images in, checkpoints out.

    python pretrain/main.py                                             # a small ViT on the built-in sample, ~3 min CPU
    python pretrain/main.py --config pretrain/configs/vit_small.yaml --data /data/imagenet/train --output-dir runs/s16
    torchrun --nproc_per_node 8 pretrain/main.py --config pretrain/configs/vit_base.yaml --data ... --output-dir ...
    python pretrain/main.py --config pretrain/configs/vit_base.yaml --data ... --launcher slurm --profile gpu-2x8

--config only sets defaults; any flag overrides it (--key value, with - or _). The resolved config is written to
<output-dir>/config.yaml. A run resumes by itself when <output-dir> holds a checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import yaml  # noqa: E402

from bam.backbones import ARCHS  # noqa: E402
from bam.checkpoint import UnsafeCheckpointError  # noqa: E402
from bam.cli import FlagParser, bool_flag, json_dict, number, optional_float, setup_logging  # noqa: E402
from bam.images import UnreadableImageError  # noqa: E402
from bam.training import NonFiniteLossError  # noqa: E402
from slurm.launch import LAUNCH_DESTS, add_launch_arguments, check_in_process, launch  # noqa: E402

logger = logging.getLogger("pretrain")


def config_keys(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in ("help", "config")} - LAUNCH_DESTS


def get_args_parser() -> FlagParser:
    """Defaults are the built-in sample run; the YAML recipes hold the paper's values."""
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=None, help="YAML file of defaults (pretrain/configs/*.yaml)")
    p.add("data", default=None, help="ImageFolder root to pretrain on (labels unused); default: the built-in sample")
    p.add("output_dir", default="outputs/pretrain", help="checkpoints, logs, config.yaml, results.json")
    p.add("cache_dir", default=None, help="where built-in samples are generated (default $BAM_CACHE or ~/.cache/bam)")
    # model
    p.add("arch", default="vit_small_patch16_224", help=f"backbone; known: {', '.join(sorted(ARCHS))}")
    p.add("arch_kwargs", type=json_dict, default={"depth": 2, "embed_dim": 96, "num_heads": 3, "patch_size": 4,
                                                  "img_size": 32}, help="timm keyword arguments, as JSON")
    p.add("drop_path_rate", type=number(float, ge=0, lt=1), default=0.0, help="stochastic depth of the backbone")
    p.add("proj_hidden_dim", type=number(int, ge=1), default=256, help="projector hidden width (official: 4096)")
    p.add("proj_out_dim", type=number(int, ge=1), default=128, help="projector output width (official: 4096)")
    p.add("proj_layers", type=number(int, ge=1), default=3, help="projector linear layers (official: 3)")
    p.add("proj_norm", default="none", choices=["none", "bn", "ln"], help="norm between projector layers")
    p.add("proj_act", default="gelu", choices=["gelu", "relu"])
    p.add("proj_last_norm", type=bool_flag, default=False, help="non-affine BatchNorm after the projector")
    p.add("teacher", type=bool_flag, default=True, help="an EMA teacher provides the targets")
    p.add("teacher_momentum", type=number(float, ge=0, le=1), default=0.99,
          help="start of the cosine momentum schedule (ends at 1)")
    p.add("grad_checkpointing", type=bool_flag, default=False, help="recompute activations in backward (memory)")
    p.add("compile", type=bool_flag, default=False, help="torch.compile the student")
    # loss
    p.add("reg", type=number(float, gt=0), default=0.05, help="Sinkhorn entropy regularisation (after warm-up)")
    p.add("reg_start", type=optional_float, default=None, help="reg at step 0, linear to --reg (default: --reg)")
    p.add("reg_warmup_epochs", type=number(float, ge=0), default=0, help="epochs of the reg warm-up")
    p.add("temperature", type=number(float, gt=0), default=0.2,
          help="softmax temperature of the source attention (official: 0.1)")
    p.add("sinkhorn_iters", type=number(int, ge=1), default=3)
    p.add("top_k", type=number(int, ge=0), default=64, help="keep the top-k entries of the balanced target (0: all)")
    p.add("positive_masking", type=bool_flag, default=True)
    p.add("n_target_crops", type=number(int, ge=1), default=2, help="crops whose views are the attention targets")
    # data
    p.add("batch_size_per_gpu", type=number(int, ge=2), default=64, help="images per process per step")
    p.add("global_size", type=number(int, ge=1), default=32, help="global crop size (official: 224)")
    p.add("local_size", type=number(int, ge=1), default=16, help="local crop size (official: 96)")
    p.add("global_scale", type=float, nargs=2, default=[0.25, 1.0])
    p.add("local_scale", type=float, nargs=2, default=[0.05, 0.25])
    p.add("n_local", type=number(int, ge=0), default=2, help="local crops per image (official: 6)")
    p.add("ccrop_alpha", type=optional_float, default=None, help="ContrastiveCrop Beta(a, a) placement; none: off")
    p.add("loc_interval", type=number(int, ge=1), default=20,
          help="epochs between ContrastiveCrop box updates (after warm-up)")
    p.add("box_thresh", type=number(float, ge=0, le=1), default=0.1,
          help="attention threshold of ContrastiveCrop boxes")
    p.add("num_workers", type=number(int, ge=0), default=2, help="DataLoader workers per process")
    # optimisation
    p.add("optimizer", default="adamw", choices=["adamw", "sgd", "lars"])
    p.add("lr", type=number(float, ge=0), default=3e-4,
          help="peak learning rate per 256 images (scaled by the global batch)")
    p.add("min_lr", type=number(float, ge=0), default=1e-6,
          help="final lr of the cosine schedule, an absolute value as in the "
          "official main_pretrain.py (not scaled by the batch; official recipes: 1e-3)")
    p.add("warmup_epochs", type=number(float, ge=0), default=2)
    p.add("epochs", type=number(int, ge=1), default=16)
    p.add("weight_decay", type=number(float, ge=0), default=0.04)
    p.add("weight_decay_end", type=number(float, ge=0), default=0.4)
    p.add("clip_grad", type=number(float, ge=0), default=3.0, help="max gradient norm (0: off)")
    p.add("amp", default="none", choices=["none", "fp16", "bf16"], help="fp16 (CUDA, grad scaler) or bf16 autocast")
    # run
    p.add("seed", type=int, default=0)
    p.add("device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add("saveckp_freq", type=number(int, ge=0), default=0, help="keep a copy every N epochs (0: only the latest)")
    p.add("stop_after_epochs", type=number(int, ge=0), default=0,
          help="leave after this many epochs in this process, the "
          "schedule still spanning --epochs (time-limited jobs; 0: run to the end)")
    p.add("knn_freq", type=number(int, ge=0), default=0, help="online k-NN every N epochs (0: only before and after)")
    p.add("knn_train", default=None, help="labelled ImageFolder for the k-NN bank (sample: its train/)")
    p.add("knn_val", default=None, help="labelled ImageFolder for the k-NN queries (sample: its val/)")
    p.add("knn_train_fraction", type=number(float, gt=0, le=1), default=1.0, help="fraction of --knn-train in the bank")
    p.add("log_freq", type=number(int, ge=1), default=10, help="steps between log.jsonl records")
    p.add("tensorboard", type=bool_flag, default=True)
    p.add("wandb", type=bool_flag, default=False)
    p.add("deterministic", type=bool_flag, default=False, help="torch.use_deterministic_algorithms")
    p.add("debug", type=bool_flag, default=False, help="tracebacks instead of one-line errors")
    p.add("force_recipe_change", type=bool_flag, default=False, help="resume a run from --output-dir although the "
          "recipe differs from the checkpoint's (recorded in log.jsonl); without it such a resume is refused")
    add_launch_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"--config {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(values) - config_keys(parser))
        if unknown:
            parser.error(f"{path}: unknown keys {unknown}; valid keys: {', '.join(sorted(config_keys(parser)))}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging()
    from pretrain.trainer import train  # heavy imports after argument parsing

    try:
        if args.launcher != "none":  # the same command line as a submitit job (it resumes by itself if requeued)
            return launch("pretrain", argv, args, args.output_dir)
        check_in_process(args)
        for key in LAUNCH_DESTS:  # not part of the recipe (config.yaml, checkpoints)
            delattr(args, key)
        train(args)
    except (ValueError, FileNotFoundError, PermissionError, UnsafeCheckpointError, NonFiniteLossError) as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()
        # a DataLoader worker re-raises with the original traceback inside: keep its last line
        line = message[-1] if isinstance(e, UnreadableImageError) else message[0]
        logger.error("%s", line.split("UnreadableImageError: ")[-1])
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
