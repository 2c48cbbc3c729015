"""2-process gloo: each rank's share of the BAM loss and its gradients agree with 1 process on the global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bam.distributed import DistInfo, get_dist_info
from bam.loss import BAMLoss

N_CROPS, B, D, W = 4, 3, 8, 2
KW = dict(n_crops=N_CROPS, top_k=4, reg=0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_CROPS * B * W, 5, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(5, D).double()
    torch.manual_seed(1)
    lin.reset_parameters()
    return x, lin


def _local_rows(rank):
    # crop-major global layout: row c*B*W + rank*B + i holds crop c of global image rank*B + i
    return torch.tensor([c * B * W + rank * B + i for c in range(N_CROPS) for i in range(B)])


def _worker(rank, port, out_dir, teacher):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        assert get_dist_info() == DistInfo(rank, W, 0)
        x, lin = _global_batch()
        model = torch.nn.parallel.DistributedDataParallel(lin)
        rows = _local_rows(rank)
        z_leaf = model(x[rows])
        z_leaf.retain_grad()
        zt = (x[rows] @ torch.ones(5, D, dtype=torch.float64) * 0.3 + 0.1).sin() if teacher else None
        loss = BAMLoss(**KW)(z_leaf, zt)
        loss.backward()
        torch.save({"loss": loss.detach(), "z_grad": z_leaf.grad, "w_grad": lin.weight.grad.clone()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, teacher):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), teacher), nprocs=W, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W)]

    x, lin = _global_batch()
    z = lin(x)
    z.retain_grad()
    zt = (x @ torch.ones(5, D, dtype=torch.float64) * 0.3 + 0.1).sin() if teacher else None
    full = BAMLoss(**KW)(z, zt)
    full.backward()

    # the global loss is the mean of the ranks' losses
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), full, atol=1e-6, rtol=0)
    for rank, r in enumerate(ranks):
        # DDP averages over ranks: each rank's parameter gradient is the 1-process gradient
        assert torch.allclose(r["w_grad"], lin.weight.grad, atol=1e-6, rtol=0)
        # gradient w.r.t. this rank's rows: the sum over ranks' losses, i.e. W x the gradient of the mean
        assert torch.allclose(r["z_grad"] / W, z.grad[_local_rows(rank)], atol=1e-6, rtol=0)


def test_two_process_gloo_equals_one_process(tmp_path):
    _run(tmp_path, teacher=False)


def test_two_process_gloo_equals_one_process_with_teacher(tmp_path):
    _run(tmp_path, teacher=True)


def test_helpers_are_no_ops_without_a_process_group(monkeypatch):
    from bam.distributed import all_reduce_, gather_with_grad, init_distributed, mean_over_ranks

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed() == DistInfo() and get_dist_info().is_main
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_(t, "max") is t and t.tolist() == [1.0, 2.0]
    assert gather_with_grad(t) == [t]
    assert mean_over_ranks(3.5) == 3.5
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a single-task SLURM job needs no process group either
    assert init_distributed() == DistInfo()


def test_balanced_shards_put_the_costliest_item_first_on_the_least_loaded_rank():
    from bam.distributed import balanced_shards

    # 26 -> rank 0; 24 -> rank 1; 24 -> rank 1 (24 < 26); 22 -> rank 0 (48 = 48: the lower rank); 20 -> rank 0
    assert balanced_shards([26, 24, 24, 22, 20], 2) == [[0, 3, 4], [1, 2]]
    assert balanced_shards([6, 6], 2) == [[0], [1]] and balanced_shards([5], 3) == [[0], [], []]
    assert balanced_shards([3, 1, 2], 1) == [[0, 1, 2]] and balanced_shards([], 2) == [[], []]


def test_fail_together_without_a_process_group_is_the_block_and_its_cleanup():
    from bam.distributed import fail_together

    cleaned = []
    with fail_together(lambda: cleaned.append(True)):
        pass
    assert cleaned == []
    with pytest.raises(KeyError, match="boom"):
        with fail_together(lambda: cleaned.append(True)):
            raise KeyError("boom")
    assert cleaned == [True]
