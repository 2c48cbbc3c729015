"""The fine-tuning recipe against MAE's official code, value by value, each with the line it comes from.

The reference is facebookresearch/mae: ``FINETUNE.md`` (the ViT-B/16 command the authors ran, lines 66-77),
``main_finetune.py`` (the argparse defaults of the flags the command leaves out) and ``engine_finetune.py`` (the
training and evaluation steps: fp16 autocast around both). The table transcribes those lines; with
``MAE_OFFICIAL_REPO=/path/to/a/checkout/of/mae`` the test also reads each cited line and checks that it says what the
table says. That evaluation runs under the training's autocast is tested in tests/transfer/test_finetune.py.
"""
import argparse
import os
from pathlib import Path

import pytest

from eval.run import get_args_parser
from eval.tasks import task_spec

# our flag: (official file, line, the official text on that line, the value in our terms)
# "F" is FINETUNE.md, "M" main_finetune.py, "E" engine_finetune.py
SOURCE = {
    "epochs": ("F", 71, "--epochs 100", 100),
    "blr": ("F", 72, "--blr 5e-4", 5e-4),
    "layer_decay": ("F", 72, "--layer_decay 0.65", 0.65),
    "weight_decay": ("F", 73, "--weight_decay 0.05", 0.05),
    "drop_path": ("F", 73, "--drop_path 0.1", 0.1),
    "reprob": ("F", 73, "--reprob 0.25", 0.25),
    "mixup": ("F", 73, "--mixup 0.8", 0.8),
    "cutmix": ("F", 73, "--cutmix 1.0", 1.0),
    "batch_size": ("F", 77, "* 8 (gpus per node) = 1024", 1024),  # the effective (global) batch
    "accum_iter": ("M", 47, "'--accum_iter', default=1", 1),
    "image_size": ("M", 54, "'--input_size', default=224", 224),
    "clip_grad": ("M", 61, "'--clip_grad', type=float, default=None", 0.0),  # None: no clipping; ours 0 = off
    "min_lr": ("M", 73, "'--min_lr', type=float, default=1e-6", 1e-6),
    "warmup_epochs": ("M", 76, "'--warmup_epochs', type=int, default=5", 5),
    "auto_augment": ("M", 82, "'--aa', type=str, default='rand-m9-mstd0.5-inc1'", "rand-m9-mstd0.5-inc1"),
    "smoothing": ("M", 84, "'--smoothing', type=float, default=0.1", 0.1),
    "pool": ("M", 115, "parser.set_defaults(global_pool=True)", "avg"),
    # torch.cuda.amp.autocast() (fp16) around the forward and the loss, with main_finetune.py:288's NativeScaler
    "amp": ("E", 55, "with torch.cuda.amp.autocast():", "fp16"),
}
# the evaluation's forward runs under the same autocast
EVAL_AUTOCAST = ("E", 115, "with torch.cuda.amp.autocast():")
SCALER = ("M", 288, "loss_scaler = NativeScaler()")


def _paper_run(world: int = 8) -> argparse.Namespace:
    """The flags of ``--task finetune --preset vit_base`` as a run on ``world`` GPUs resolves them (no sample)."""
    args = get_args_parser("finetune").parse_args(["--task", "finetune", "--preset", "vit_base"])
    task_spec("finetune").workload(args, "vit_base_patch16_224", world)
    return args


def test_the_vit_base_recipe_equals_maes():
    args = vars(_paper_run())
    differ = {k: (args[k], v) for k, (*_, v) in SOURCE.items() if args[k] != v}
    assert not differ, f"--preset vit_base differs from MAE's ViT-B/16 recipe (ours, MAE's): {differ}"


@pytest.mark.skipif(not os.environ.get("MAE_OFFICIAL_REPO"), reason="set MAE_OFFICIAL_REPO to a checkout of "
                    "facebookresearch/mae to check the transcribed lines against the official files")
def test_the_transcription_matches_the_official_files():
    root = Path(os.environ["MAE_OFFICIAL_REPO"])
    files = {"F": "FINETUNE.md", "M": "main_finetune.py", "E": "engine_finetune.py"}
    for key, (where, line, official, *_) in {**SOURCE, "eval_autocast": EVAL_AUTOCAST, "scaler": SCALER}.items():
        text = " ".join((root / files[where]).read_text().splitlines()[line - 1].split())
        assert official in text, (key, files[where], line, text)
