"""GlobalBatchNorm: on 2 gloo processes, each holding half the batch, it gives what BatchNorm2d gives on the whole batch
in one process (outputs, input and parameter gradients, running statistics); without a process group it is
BatchNorm2d. Only torch is imported here, so the spawned workers start fast."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from transfer.ade20k.global_bn import GlobalBatchNorm, convert_to_global_bn

W, B, C = 2, 3, 4  # ranks, images per rank, channels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_and_bn(cls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(W * B, C, 5, 3, generator=g, dtype=torch.float64) * 3 + 1
    target = torch.randn(W * B, C, 5, 3, generator=g, dtype=torch.float64)
    bn = cls(C, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, C))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return x, target, bn


def _loss(y, target):  # a mean over images, as the segmentation losses
    return ((y - target) ** 2 * target.sin()).flatten(1).sum(1).mean()


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        x, target, bn = _batch_and_bn(GlobalBatchNorm)
        mine = slice(rank * B, (rank + 1) * B)
        x = x[mine].clone().requires_grad_()
        y = bn(x)
        _loss(y, target[mine]).backward()
        grads = torch.stack([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)  # what DDP does with the parameter gradients: their mean over ranks
        torch.save({"y": y.detach(), "x_grad": x.grad, "param_grads": grads / W, "running_mean": bn.running_mean,
                    "running_var": bn.running_var}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_batch_norm_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=W, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W)]

    x, target, bn = _batch_and_bn(nn.BatchNorm2d)
    x.requires_grad_()
    y = bn(x)
    _loss(y, target).backward()
    close = dict(rtol=1e-10, atol=1e-12)  # float64: only the order of the sums differs
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    # rank r's loss is the mean over its B images, 1 process's over W * B: W times the gradient per image
    assert torch.allclose(torch.cat([r["x_grad"] for r in ranks]) / W, x.grad, **close)
    for r in ranks:
        assert torch.allclose(r["param_grads"], torch.stack([bn.weight.grad, bn.bias.grad]), **close)
        assert torch.allclose(r["running_mean"], bn.running_mean, **close)
        assert torch.allclose(r["running_var"], bn.running_var, **close)  # the unbiased variance, as BatchNorm2d


def test_without_a_process_group_it_is_batch_norm_and_converting_keeps_every_tensor():
    x, _, bn = _batch_and_bn(nn.BatchNorm2d)
    model = nn.Sequential(nn.Conv2d(C, C, 1), bn, nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    converted = convert_to_global_bn(model)
    assert converted is model and isinstance(model[1], GlobalBatchNorm) and isinstance(model[2][0], GlobalBatchNorm)
    assert {k: id(p) for k, p in model.named_parameters()} == params  # the optimizer's parameters stay the same
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    plain = nn.BatchNorm2d(C, momentum=0.3).double()
    plain.load_state_dict(bn.state_dict())  # the replaced module's tensors: the ones model[1] holds
    assert torch.equal(model[1](x), plain(x)) and torch.equal(model[1].running_var, plain.running_var)
