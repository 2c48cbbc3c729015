import logging

import pytest
import torch

from bam import build_backbone

# The tiny ViT every test uses: depth 2, width 32, patch 8, 32-pixel images.
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_small_patch16_224", **TINY_VIT).eval()


@pytest.fixture(autouse=True)
def _capture_info_logs(caplog):
    caplog.set_level(logging.INFO)
