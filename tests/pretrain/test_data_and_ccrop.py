from pathlib import Path

import pytest
import torch
from PIL import Image

from bam import build_backbone
from pretrain.contrastive_crop import boxes_from_attention, cls_attention
from pretrain.data import MultiCropAugmentation, SeededAugmentedFolder, contrastive_crop_params
from pretrain.main import parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "pretrain" / "configs"


def test_multi_crop_shapes_order_and_normalisation():
    aug = MultiCropAugmentation(32, 16, n_local=3)
    crops = aug(Image.new("RGB", (40, 30), (120, 60, 200)))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)


def test_augmentations_depend_only_on_seed_epoch_and_index(tmp_path):
    for c in range(2):
        (tmp_path / str(c)).mkdir()
        for i in range(3):
            Image.new("RGB", (24, 24), (40 * i, 90 * c, 30)).save(tmp_path / str(c) / f"{i}.png")
    ds = SeededAugmentedFolder(tmp_path, MultiCropAugmentation(16, 8, n_local=2), seed=3)
    a, b = ds[(2, 4)], ds[(2, 4)]
    torch.manual_seed(123)  # the caller's RNG state does not matter
    c = ds[(2, 4)]
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a[0], b[0], c[0]))
    d = ds[(3, 4)]
    assert not all(torch.equal(x, y) for x, y in zip(a[0], d[0]))


def test_contrastive_crop_centres_lie_in_the_box():
    torch.manual_seed(0)
    box = (0.5, 0.1, 0.8, 0.3)  # h_min, w_min, h_max, w_max
    for _ in range(200):
        top, left, h, w = contrastive_crop_params(100, 200, box, (0.05, 0.1), (3 / 4, 4 / 3),
                                                  torch.distributions.Beta(0.6, 0.6))
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 200
        cy, cx = top + h // 2, left + w // 2
        assert 50 - 1 <= cy <= 80 + 1 and 20 - 1 <= cx <= 60 + 1


def test_boxes_from_a_constructed_attention_map():
    attn = torch.zeros(1, 8, 8)
    attn[0, 2:4, 5:7] = 1.0  # the object: rows 2-3, columns 5-6 of 8
    (box,) = boxes_from_attention(attn, (64, 64), threshold=0.5)
    h0, w0, h1, w1 = box.tolist()
    assert 0.2 <= h0 <= 0.26 and 0.45 <= h1 <= 0.52 and 0.57 <= w0 <= 0.63 and 0.82 <= w1 <= 0.89


def test_cls_attention_is_a_distribution_over_tokens_per_head():
    bb = build_backbone("vit_small_patch16_224", depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
    attn = cls_attention(bb.eval(), torch.randn(3, 3, 32, 48))
    assert attn.shape == (3, 4, 6) and (attn > 0).all() and (attn.flatten(1).sum(1) < 2).all()
    with pytest.raises(ValueError, match="needs a ViT"):
        cls_attention(build_backbone("resnet18"), torch.randn(1, 3, 32, 32))


def test_the_resnet50_recipe_shares_the_official_loss_and_crops():
    """No official ResNet-50 script exists (tests/pretrain/test_recipes.py checks the three that do)."""
    args = parse_args(["--config", str(CONFIGS / "resnet50.yaml")])
    assert (args.epochs, args.batch_size_per_gpu, args.n_local, args.global_size, args.local_size) == (400, 256, 6,
                                                                                                         224, 96)
    assert (args.reg, args.temperature, args.sinkhorn_iters, args.top_k, args.n_target_crops) == (0.05, 0.1, 3, 128, 2)
    assert args.warmup_epochs == 10 and args.optimizer == "lars" and args.min_lr == 0.0048
