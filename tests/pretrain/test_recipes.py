"""The pretraining recipes against the official scripts, value by value, each with the line it comes from.

The reference is DanielShalam/BAM: ``scripts/pretrain/<name>.slurm`` (the flags the authors ran) and
``main_pretrain.py`` (the argparse defaults of the flags a script leaves out). The table below transcribes those
lines; with ``BAM_OFFICIAL_REPO=/path/to/a/checkout/of/BAM`` the test also reads each cited line from the official
files and checks that it says what the table says, so the transcription itself is tested against the source.
"""
import os
from pathlib import Path

import pytest

from pretrain.main import parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "pretrain" / "configs"
OFFICIAL = {"vit_small": "vit_small.slurm", "vit_base": "vit_base.slurm", "caformer_m36": "caformer_m36.slurm"}

# our key: (official file, line, the official text on that line, the value in our terms)
# "S" is scripts/pretrain/<name>.slurm, "M" is main_pretrain.py.
SOURCE = {
    "seed": ("S", 30, "--seed 1", 1),
    "teacher": ("S", 31, "--teacher true", True),
    "num_workers": ("S", 32, "--num_workers 10", 10),
    "epochs": ("S", 34, "--epochs 400", 400),
    "warmup_epochs": ("S", 35, "--warmup_epochs 40", 40),
    "batch_size_per_gpu": ("S", 36, "--batch_size_per_gpu 256", 256),
    "loc_interval": ("S", 37, "--loc_interval 40", 40),
    "knn_freq": ("S", 38, "--knn_freq 16", 16),
    "proj_layers": ("S", 39, "--n_layers 3", 3),
    "proj_hidden_dim": ("S", 40, "--hidden_dim 4096", 4096),
    "proj_out_dim": ("S", 41, "--out_dim 4096", 4096),
    "proj_norm": ("S", 42, "--proj_use_bn false", "none"),
    "proj_last_norm": ("S", 43, "--proj_last_bn false", False),
    "proj_act": ("S", 44, "--proj_act gelu", "gelu"),
    "optimizer": ("S", 46, "--optimizer adamw", "adamw"),
    "drop_path_rate": ("S", 47, "--drop_path_rate 0.", 0.0),
    "reg": ("S", 49, "--reg 0.05", 0.05),
    "temperature": ("S", 51, "--temperature 0.1", 0.1),
    "sinkhorn_iters": ("S", 52, "--num_sink_iter 3", 3),
    "lr": ("S", 53, "--lr 0.0003", 3e-4),
    # an absolute final lr: main_pretrain.py:288 passes it to cosine_scheduler(args.lr, args.min_lr, ...)
    "min_lr": ("S", 54, "--min_lr 1e-3", 1e-3),
    "clip_grad": ("S", 55, "--clip_grad 0.3", 0.3),
    "weight_decay": ("S", 56, "--weight_decay 0.04", 0.04),
    "weight_decay_end": ("S", 57, "--weight_decay_end 0.4", 0.4),
    "n_target_crops": ("S", 58, "--target_crops_number 2", 2),
    "global_scale": ("S", 60, "--global_crops_scale 0.25 1.", [0.25, 1.0]),
    "n_local": ("S", 61, "--local_crops_number 6", 6),
    "local_scale": ("S", 62, "--local_crops_scale 0.05 0.25", [0.05, 0.25]),
    "amp": ("S", 63, "--use_fp16 true", "fp16"),
    "top_k": ("S", 64, "--top_k_sink 128", 128),
    "teacher_momentum": ("M", 99, "'--teacher_m', type=float, default=0.995", 0.995),
    "positive_masking": ("M", 68, "'--positive_masking', default=True", True),
    "local_size": ("M", 133, "'--local_crops_size', type=int, default=96", 96),
    "box_thresh": ("M", 32, "'--box_thresh', type=float, default=0.1", 0.1),
    "knn_train_fraction": ("M", 52, "'--knn_train_fraction', default=0.1", 0.1),
    "saveckp_freq": ("M", 148, "'--saveckp_freq', default=20", 20),
    "global_size": ("image_transforms.py", 64, "224, scale=global_crops_scale", 224),
}
# values the three scripts do not share
ARCH = {"vit_small": ("--arch vit_small", "vit_small_mocov3_patch16_224"),
        "vit_base": ("--arch vit_base", "vit_base_mocov3_patch16_224"),
        "caformer_m36": ("--arch caformer_m36", "caformer_m36")}
CCROP_ALPHA = ("M", 36, "'--ccrop_alpha', type=float, default=0.6", 0.6)  # the ViTs; CAFormer: boxes need attention


def _official_line(root: Path, name: str, where: str, line: int) -> str:
    path = {"S": root / "scripts" / "pretrain" / OFFICIAL[name], "M": root / "main_pretrain.py"}.get(where,
                                                                                                     root / where)
    return " ".join(path.read_text().splitlines()[line - 1].split())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipes_equal_the_official_scripts(name):
    args = vars(parse_args(["--config", str(CONFIGS / f"{name}.yaml")]))
    expected = {key: value for key, (_, _, _, value) in SOURCE.items()}
    expected["arch"] = ARCH[name][1]
    if name != "caformer_m36":
        expected["ccrop_alpha"] = CCROP_ALPHA[3]
    differ = {k: (args[k], v) for k, v in expected.items() if args[k] != v}
    assert not differ, f"{name}.yaml differs from the official scripts (ours, official): {differ}"


def test_the_recipe_files_cite_the_line_of_each_value():
    for name in OFFICIAL:
        text = (CONFIGS / f"{name}.yaml").read_text()
        cited = {line.split(":")[0]: line for line in text.splitlines() if line and not line.startswith("#")}
        for key, (where, line, official, _) in SOURCE.items():
            flag = official.split()[0].strip("',")
            if where in ("S", "M"):
                assert f"{where}:{line} {flag}" in cited[key], f"{name}.yaml: {key} should cite {where}:{line} {flag}"


@pytest.mark.skipif(not os.environ.get("BAM_OFFICIAL_REPO"), reason="set BAM_OFFICIAL_REPO to a checkout of "
                    "DanielShalam/BAM to check the transcribed lines against the official files")
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_the_transcription_matches_the_official_files(name):
    root = Path(os.environ["BAM_OFFICIAL_REPO"])
    sources = {**SOURCE, "arch": ("S", 33, ARCH[name][0], None), "ccrop_alpha": CCROP_ALPHA}
    for key, (where, line, official, _) in sources.items():
        assert official in _official_line(root, name, where, line), (key, where, line)


def test_the_official_lr_schedule_peaks_at_4p8e3_and_ends_at_the_absolute_min_lr():
    """16 GPUs x 256: peak 3e-4 x 4096 / 256 = 4.8e-3 after 40 epochs, then cosine down to 1e-3 (not 1e-3 x peak)."""
    from pretrain.trainer import make_schedules

    args = parse_args(["--config", str(CONFIGS / "vit_small.yaml")])
    lr = make_schedules(args, steps=10, global_batch=16 * 256).lr
    assert len(lr) == 4000 and lr[400] == pytest.approx(4.8e-3) and lr.max() == pytest.approx(4.8e-3)
    assert lr[-1] == pytest.approx(1e-3, rel=1e-5) and lr.min() == lr[0] == 0.0
