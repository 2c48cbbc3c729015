import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from transfer.davis.propagation import (
    context_frames,
    neighbourhood_mask,
    pil_nearest_index,
    pil_nearest_resize,
    propagate_labels,
    soft_to_mask,
)

from .reference_propagation import straightforward_propagation


def _one_hot(labels, c):
    return F.one_hot(labels, c).permute(2, 0, 1).float()


def test_identical_frames_carry_the_first_mask_over():
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(6, 9, 16, generator=g)
    labels = torch.zeros(6, 9, dtype=torch.long)
    labels[1:4, 2:6] = 1
    labels[4:6, 6:9] = 2
    first = _one_hot(labels, 3)
    soft = propagate_labels(frame[None].repeat(10, 1, 1, 1), first, size_mask_neighborhood=2)
    assert soft.shape == (10, 3, 6, 9)
    assert torch.equal(soft[0], first)
    assert (soft.argmax(1) == labels).all()


def test_neighbourhood_restriction_and_top_k_on_a_constructed_case():
    # a 1x10 strip; frame 0 marks patch 0 as the object. In frame 1, patch 9 looks exactly like patch 0 of
    # frame 0, and patches 7-9 of frame 0 are nearly orthogonal to it.
    d = 10
    f0 = torch.eye(d)[None]  # patch j has feature e_j
    f1 = torch.eye(d)[None].clone()
    f1[0, 9] = torch.eye(d)[0]  # target patch 9 == source patch 0
    feats = torch.stack([f0, f1])
    first = _one_hot(torch.tensor([[1] + [0] * 9]), 2)
    # unrestricted, top-1: patch 9 copies the object label from patch 0
    free = propagate_labels(feats, first, size_mask_neighborhood=0, topk=1)
    assert free[1, 1, 0, 9] == 1.0
    # within 2 columns, patch 0 is out of reach: patch 9 stays background
    near = propagate_labels(feats, first, size_mask_neighborhood=2, topk=1)
    assert near[1, 1, 0, 9] == 0.0
    # top-2: weights are exp(cos/T) normalised over the two kept entries (cosines 1 and 0)
    two = propagate_labels(feats, first, size_mask_neighborhood=0, topk=2, temperature=0.1)
    assert two[1, 1, 0, 9].item() == pytest.approx(math.exp(10) / (math.exp(10) + 1), rel=1e-5)


def test_context_is_the_first_frame_and_the_last_predicted_frames():
    assert context_frames(1, 7) == [0]
    assert context_frames(3, 7) == [0, 1, 2]
    assert context_frames(10, 7) == [0, 3, 4, 5, 6, 7, 8, 9]
    assert context_frames(10, 1) == [0, 9]


def test_neighbourhood_mask_equals_the_loop_definition():
    h, w, r = 4, 6, 1
    want = torch.zeros(h, w, h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            for ii in range(max(0, i - r), min(h, i + r + 1)):
                for jj in range(max(0, j - r), min(w, j + r + 1)):
                    want[i, j, ii, jj] = True
    assert torch.equal(neighbourhood_mask(h, w, r), want.reshape(h * w, h * w))


@pytest.mark.parametrize("n_frames,h,w,size,topk,n_last,tile", [
    (12, 7, 9, 3, 5, 7, None), (6, 7, 9, 0, 3, 2, None), (9, 7, 9, 2, 1, 3, None),
    (14, 20, 23, 3, 5, 2, 8), (11, 13, 17, 2, 4, 7, 5),  # several tiles in both directions, edges included
])
def test_matches_the_straightforward_per_frame_implementation(n_frames, h, w, size, topk, n_last, tile):
    g = torch.Generator().manual_seed(n_frames)
    base = torch.randn(1, 8, h, w, generator=g)
    feats = (base + 0.3 * torch.randn(n_frames, 8, h, w, generator=g)).permute(0, 2, 3, 1).contiguous()
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[2:5, 1:4] = 1
    labels[0:3, 6:9] = 2
    first = _one_hot(labels, 3)
    ours = propagate_labels(feats, first, n_last, size, topk, chunk=4, tile=tile)
    ref, _ = straightforward_propagation(feats, first, n_last, size, topk)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("n_in,n_out", [(2, 7), (2, 853), (4, 853), (30, 480), (52, 854), (53, 854), (7, 3)])
def test_pil_nearest_index_matches_pil(n_in, n_out):
    src = np.arange(n_in, dtype=np.int32)[None]
    want = np.array(Image.fromarray(src, mode="I").resize((n_out, 1), Image.NEAREST))[0]
    assert np.array_equal(pil_nearest_index(n_in, n_out), want)


def test_soft_to_mask_matches_the_pil_pipeline():
    g = torch.Generator().manual_seed(0)
    soft = torch.rand(3, 30, 52, generator=g)
    soft[2] = 0.0  # an all-zero channel is left as it is
    got = soft_to_mask(soft, 16, (480, 854))
    up = F.interpolate(soft[None], scale_factor=16, mode="bilinear", align_corners=False)[0]
    for c in range(2):
        up[c] = (up[c] - up[c].min()) / (up[c] - up[c].min()).max()
    small = up.argmax(0).numpy().astype(np.uint8)
    want = np.array(Image.fromarray(small).resize((854, 480), Image.NEAREST))
    assert got.dtype == torch.long and got.shape == (480, 854)
    assert np.array_equal(got.numpy(), want)
    assert torch.equal(pil_nearest_resize(torch.from_numpy(small), (480, 854)), torch.from_numpy(want))


def test_frames_are_normalised_as_dinos_eval_video_segmentation(tmp_path):
    """DINO's / BAM's color_normalize: mean (0.485, 0.456, 0.406), std (0.228, 0.224, 0.225); 0.229 on request."""
    from bam.images import STD as IMAGENET_STD
    from transfer.davis.data import read_frame

    path = tmp_path / "frame.png"
    Image.fromarray(np.full((16, 24, 3), (200, 100, 50), np.uint8)).save(path)
    x = read_frame(path, (16, 24))
    expected = [(200 / 255 - 0.485) / 0.228, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225]
    assert x.shape == (3, 16, 24) and torch.allclose(x[:, 5, 7], torch.tensor(expected), atol=1e-6)
    assert read_frame(path, (16, 24), IMAGENET_STD)[0, 0, 0].item() == pytest.approx((200 / 255 - 0.485) / 0.229)
