import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

TINY_ARCH = '{"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8, "img_size": 16}'


def tiny_args(data, out, **overrides):
    """Flags for a pretraining run that takes seconds: a 1-block ViT on 16-pixel crops."""
    flags = {"data": data, "output_dir": out, "arch_kwargs": TINY_ARCH, "batch_size_per_gpu": 8, "epochs": 3,
             "warmup_epochs": 1, "global_size": 16, "local_size": 8, "n_local": 2, "proj_hidden_dim": 32,
             "proj_out_dim": 16, "top_k": 8, "num_workers": 0, "tensorboard": "false", "log_freq": 1,
             "knn_train": data, "knn_val": data, **overrides}
    argv = []
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", *(str(v).split() if k in ("global_scale", "local_scale") else [str(v)])]
    return argv


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """32 real digits in 4 class folders, 24 pixels, RGB."""
    root = tmp_path_factory.mktemp("tiny_images")
    digits = load_digits()
    for label in range(4):
        (root / str(label)).mkdir()
        for i in np.flatnonzero(digits.target == label)[:8]:
            img = Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((24, 24)).convert("RGB")
            img.save(root / str(label) / f"{i}.png")
    return root
