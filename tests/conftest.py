import logging

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from bam import build_backbone
from bam.formats import backbone_checkpoint

# The tiny ViT every test uses: depth 2, width 32, patch 8, 32-pixel images.
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_small_patch16_224", **TINY_VIT).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_vit):
    """The tiny ViT saved in our checkpoint format (``load_backbone`` reads it with no other argument)."""
    path = tmp_path / "tiny.pth"
    torch.save(backbone_checkpoint(tiny_vit), path)
    return path


@pytest.fixture(autouse=True)
def _capture_info_logs(caplog):
    caplog.set_level(logging.INFO)


def assert_one_line_error(main, argv, caplog, match):
    """``main(argv)`` exits with 2 after logging exactly one one-line error that contains ``match``."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert match in errors[0], errors[0]


def make_digit_folders(root):
    """A labelled ``train/`` + ``val/`` ImageFolder of scikit-learn digits 0-2 (12 + 4 per class, 32x32 RGB)."""
    digits = load_digits()
    for split, sl in (("train", slice(0, 12)), ("val", slice(12, 16))):
        for label in range(3):
            (root / split / str(label)).mkdir(parents=True)
            for i in np.flatnonzero(digits.target == label)[sl]:
                img = Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((32, 32)).convert("RGB")
                img.save(root / split / str(label) / f"{i}.png")
    return root


@pytest.fixture
def digit_folders(tmp_path):
    return make_digit_folders(tmp_path / "digits")
