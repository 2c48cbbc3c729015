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


def assert_one_line_error(main, argv, caplog, match):
    """``main(argv)`` exits with 2 after logging exactly one one-line error that contains ``match``."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert match in errors[0], errors[0]
