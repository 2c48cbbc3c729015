import pytest
import torch

from bam.loss import BAMLoss, bam_loss, gather_targets
from bam.masks import positive_mask, top_k_mask
from bam.sinkhorn import self_optimal_transport

from .reference import reference_bam_loss


def _z(n_crops, b, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_crops * b, d, generator=g, dtype=torch.float64)


CASES = [
    # n_crops, n_large, n_tgt, reg, temp, iters, top_k, positive masking
    (4, 2, 2, 0.05, 0.1, 3, 0, True),
    (4, 2, 2, 0.5, 0.2, 3, 0, False),
    (5, 2, 3, 0.3, 0.1, 5, 0, True),
    (3, 2, 1, 0.2, 0.5, 1, 0, True),
    (4, 2, 2, 0.3, 0.1, 3, 4, True),
    (6, 2, 2, 0.1, 0.1, 3, 3, False),
    (2, 1, 1, 0.25, 0.1, 2, 0, True),
]


@pytest.mark.parametrize("case", CASES)
def test_loss_matches_naive_reference(case):
    n_crops, n_large, n_tgt, reg, temp, iters, top_k, pm = case
    z = _z(n_crops, b=3)
    got = bam_loss(z, n_crops=n_crops, n_large_crops=n_large, n_target_crops=n_tgt, reg=reg, temperature=temp,
                   sinkhorn_iters=iters, top_k=top_k, positive_masking=pm)
    want = reference_bam_loss(z.numpy(), n_crops=n_crops, n_large=n_large, n_tgt=n_tgt, reg=reg, temp=temp,
                              iters=iters, top_k=top_k, pm=pm)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]])
def test_distillation_matches_naive_reference(case):
    n_crops, n_large, n_tgt, reg, temp, iters, top_k, pm = case
    z, zt = _z(n_crops, 3, seed=1), _z(n_crops, 3, seed=2)
    got = bam_loss(z, zt, n_crops=n_crops, n_large_crops=n_large, n_target_crops=n_tgt, reg=reg, temperature=temp,
                   sinkhorn_iters=iters, top_k=top_k, positive_masking=pm)
    want = reference_bam_loss(z.numpy(), zt.numpy(), n_crops=n_crops, n_large=n_large, n_tgt=n_tgt, reg=reg,
                              temp=temp, iters=iters, top_k=top_k, pm=pm)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_module_defaults_are_the_official_ones_and_reg_is_a_live_schedule():
    loss_fn = BAMLoss(n_crops=4)
    assert (loss_fn.n_large_crops, loss_fn.n_target_crops, loss_fn.reg, loss_fn.temperature) == (2, 2, 0.05, 0.1)
    assert (loss_fn.sinkhorn_iters, loss_fn.top_k, loss_fn.positive_masking) == (3, 0, True)
    z = _z(4, 5)
    first = loss_fn(z)
    loss_fn.reg = 0.5
    second = loss_fn(z)
    want = reference_bam_loss(z.numpy(), n_crops=4, n_large=2, n_tgt=2, reg=0.5, temp=0.1, iters=3, top_k=0, pm=True)
    assert second.item() == pytest.approx(want, rel=1e-10)
    assert first.item() != pytest.approx(second.item())


def test_float32_and_half_inputs_compute_in_float32():
    z = _z(4, 3).float()
    assert BAMLoss(4)(z).dtype == torch.float32
    assert BAMLoss(4)(z.half()).dtype == torch.float32


def test_gradient_is_finite_and_nonzero():
    z = _z(8, 4, d=16).float().requires_grad_()
    zt = _z(8, 4, d=16, seed=3).float()
    for teacher in (None, zt):
        z.grad = None
        BAMLoss(8, top_k=5)(z, teacher).backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_positive_mask_layout_by_hand():
    # B=2 images per rank, rank 1 of 2: local image i is global image 2 + i. 3 crops, 2 target crops.
    m = positive_mask(batch_size=2, n_crops=3, n_target_crops=2, rank=1, world_size=2)
    assert m.shape == (6, 8)
    want = torch.zeros(6, 8, dtype=torch.bool)
    for row in range(6):
        global_image = 2 + row % 2
        want[row, global_image] = want[row, 4 + global_image] = True
    assert torch.equal(m, want)


def test_top_k_mask_keeps_the_k_largest():
    s = torch.tensor([[0.1, 0.5, 0.3, 0.9], [4.0, 3.0, 2.0, 1.0]])
    assert top_k_mask(s, 2).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert top_k_mask(s, 9).all()


def test_top_k_keeps_k_targets_per_image_shared_by_its_global_views(monkeypatch):
    import bam.loss as loss_module
    seen = []
    monkeypatch.setattr(loss_module, "top_k_mask", lambda s, k: seen.append(top_k_mask(s, k)) or seen[-1])
    b, k = 6, 3
    bam_loss(_z(4, b, d=8), n_crops=4, top_k=k)
    (mask,) = seen
    assert mask.shape == (b, 2 * b) and mask.sum(1).eq(k).all()


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 6, generator=g, dtype=torch.float64)
    plan = self_optimal_transport(scores, reg=0.5, n_iters=500)
    # sample rows are distributions; with nothing masked the target marginal converges to uniform
    assert torch.allclose(plan.sum(1), torch.ones(12, dtype=torch.float64))
    assert torch.allclose(plan.sum(0), torch.full((6,), 12 / 6, dtype=torch.float64), atol=1e-8)
    mask = torch.zeros(12, 6, dtype=torch.bool)
    mask[torch.arange(12), torch.arange(12) % 6] = True
    plan = self_optimal_transport(scores, reg=0.5, n_iters=3, mask=mask, n_masked=2)
    assert plan[mask].abs().max() == 0
    assert torch.allclose(plan.sum(1), torch.ones(12, dtype=torch.float64))


def test_sinkhorn_is_stable_at_the_official_reg_in_float32():
    # cosine scores span [-1, 1]; exp((S - max) / 0.05) reaches exp(-40), well inside float32's range
    scores = torch.tensor([[1.0, -1.0, 0.99], [-1.0, -1.0, -1.0], [0.2, 0.3, -0.9]])
    plan = self_optimal_transport(scores, reg=0.05, n_iters=3)
    assert torch.isfinite(plan).all() and torch.allclose(plan.sum(1), torch.ones(3))


def test_gather_targets_orders_crop_major_over_ranks():
    # two fake ranks with B=2 and 2 target crops; rows labelled (rank, crop, image)
    ranks = [torch.tensor([[r * 100 + c * 10 + i] for c in range(2) for i in range(2)], dtype=torch.float64)
             for r in range(2)]
    out = gather_targets(ranks[0], 2, gather_fn=lambda x: ranks)
    assert out.flatten().tolist() == [0, 1, 100, 101, 10, 11, 110, 111]


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="n_crops=4"):
        bam_loss(torch.randn(10, 3), n_crops=4)
    with pytest.raises(ValueError, match="z_teacher"):
        bam_loss(torch.randn(8, 3), torch.randn(4, 3), n_crops=4)


def test_autocast_does_not_lower_the_loss_precision():
    z = _z(4, 3).float()
    plain = BAMLoss(4)(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = BAMLoss(4)(z)
    assert inside.dtype == torch.float32 and torch.isfinite(inside) and inside.item() == plain.item()
