"""The linear-probe grid: N heads trained together equal N heads trained alone; the selection picks the best lr."""
import argparse
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bam import build_backbone
from eval.tasks.linear import augmented_batches
from transfer.classification.linear import (
    HeadSpec,
    LinearGrid,
    evaluate_grid,
    feature_batches,
    head_input,
    select_head,
    train_grid,
)

from ..conftest import TINY_VIT

CPU = torch.device("cpu")


def _slots(n, seed, n_cls=4, dim=8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    slots = torch.randn(n, n_cls + 1, dim, generator=g) + 2.0 * torch.eye(3, dim)[labels][:, None]
    return slots, labels


def test_head_input_layout():
    d = 3
    slots = torch.arange(5 * d, dtype=torch.float32).reshape(1, 5, d)  # CLS_1..CLS_4, patch mean
    assert head_input(slots, 1, False).tolist() == [slots[0, 3].tolist()]
    assert head_input(slots, 4, False).tolist() == [slots[0, :4].flatten().tolist()]
    assert head_input(slots, 1, True).tolist() == [slots[0, 3].tolist() + slots[0, 4].tolist()]
    assert head_input(slots[:, [2, 3, 4]], 2, True).tolist() == [slots[0, 2:].flatten().tolist()]
    cnn = torch.randn(2, 1, d)
    assert torch.equal(head_input(cnn, 1, False), cnn[:, 0])
    with pytest.raises(ValueError, match="CNN"):
        head_input(cnn, 1, True)
    with pytest.raises(ValueError, match="asked for 5 blocks"):
        head_input(slots, 5, False)


@pytest.mark.parametrize("bn", [False, True])
def test_grid_heads_equal_heads_trained_one_at_a_time(bn):
    slots, labels = _slots(70, 0)
    specs = [HeadSpec(lr, n, pool) for lr in (0.01, 0.3) for n in (1, 4) for pool in (False, True)]
    torch.manual_seed(0)
    grid = LinearGrid(specs, 8, 3, bn=bn)
    initial = [copy.deepcopy(head.linear.weight.detach()) for head in grid.heads]
    alone = []
    for spec, head in zip(specs, grid.heads):
        single = LinearGrid([spec], 8, 3, bn=bn)
        single.heads[0].load_state_dict(copy.deepcopy(head.state_dict()))
        alone.append(single)
    batches = feature_batches(slots, labels, 16, seed=3, device=CPU)
    train_grid(grid, batches, epochs=4, batch_size=16)
    for single in alone:
        train_grid(single, batches, epochs=4, batch_size=16)
    for head, single in zip(grid.heads, alone):
        for (name, a), (_, b) in zip(head.state_dict().items(), single.heads[0].state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # every head moved away from its own initialisation, and by more at the larger lr (30x)
    moved = [(head.linear.weight.detach() - init).abs().max().item() for head, init in zip(grid.heads, initial)]
    assert min(moved) > 5e-3, moved
    assert all(moved[i + 4] > 5 * moved[i] for i in range(4)), moved


def test_grid_selects_the_clearly_best_learning_rate():
    """lr 1e-7 cannot learn in 8 epochs (chance), 0.1 learns, 1e39 overflows float32 weights (a diverged head
    scores 0): the held-out selection must pick 0.1."""
    train, train_y = _slots(300, 1)
    held, held_y = _slots(150, 2)
    specs = [HeadSpec(lr, 1, False) for lr in (1e-7, 0.1, 1e39)]
    torch.manual_seed(0)
    grid = LinearGrid(specs, 8, 3)
    train_grid(grid, feature_batches(train, train_y, 32, seed=0, device=CPU), epochs=8, batch_size=32)
    res = evaluate_grid(grid, held, held_y)
    assert select_head(res) == 1, res
    assert res[1]["top1"] > 85.0 and res[0]["top1"] < 60.0 and res[2]["top1"] == 0.0, res
    assert not torch.isfinite(grid.heads[2].linear.weight).all()


def test_evaluate_grid_counts_correctly():
    slots = torch.zeros(4, 1, 2)
    labels = torch.tensor([0, 1, 0, 1])
    grid = LinearGrid([HeadSpec(0.1, 1, False)], 2, 2)
    with torch.no_grad():
        grid.heads[0].linear.weight.zero_()
        grid.heads[0].linear.bias.copy_(torch.tensor([1.0, 0.0]))  # always predicts class 0
    assert evaluate_grid(grid, slots, labels) == [{"top1": 50.0, "top5": 100.0}]
    assert select_head([{"top1": 50.0}, {"top1": 70.0}, {"top1": 70.0}]) == 1


# The official probe, transcribed: (file, line, text on that line) -> the preset's value. L is
# scripts/linear/linear.slurm of DanielShalam/BAM, E its eval_linear.py; BAM_OFFICIAL_REPO checks the lines.
BAM_PROBE = {
    "lrs": (("L", 33, "--lr 0.002"), "0.002"),
    "n_blocks": (("L", 36, "--n_last_blocks 1"), "1"),
    "avgpool": (("L", 37, "--avgpool_patchtokens true"), "on"),
    "bn_head": (("L", 35, "--bn_head true"), True),
    "epochs": (("L", 32, "--epochs 100"), 100),
    "batch_size": (("L", 34, "--batch_size_per_gpu 128"), 8 * 128),  # x 8 tasks (L:7 --ntasks=8)
    "augment": (("E", 61, "pth_transforms.RandomResizedCrop(224),"), True),
    "holdout_fraction": (("E", 75, "os.path.join(args.data_path, 'train' if is_train else 'val')"), 0.0),
    "select": (("E", 223, 'best_acc = max(best_acc, test_stats["acc1"])'), "best_epoch_on_val"),
}


def test_the_bam_vitb_preset_is_the_official_probe():
    from eval.tasks.linear import PRESETS

    assert PRESETS["bam_vitb"] == {key: value for key, (_, value) in BAM_PROBE.items()}


def test_the_official_probe_transcription_matches_its_files():
    import os
    from pathlib import Path

    if not os.environ.get("BAM_OFFICIAL_REPO"):
        pytest.skip("set BAM_OFFICIAL_REPO to a checkout of DanielShalam/BAM to check the transcription")
    root = Path(os.environ["BAM_OFFICIAL_REPO"])
    files = {"L": root / "scripts" / "linear" / "linear.slurm", "E": root / "eval_linear.py"}
    for key, ((where, line, text), _) in {**BAM_PROBE, "tasks": ((("L", 7, "--ntasks=8")), None)}.items():
        assert text in " ".join(files[where].read_text().splitlines()[line - 1].split()), key


def _augmented_probe(backbone_state, root, n):
    """The official probe's training (augmented views through the frozen tiny ViT, a BatchNorm head) in float64."""
    torch.set_default_dtype(torch.float64)
    backbone = build_backbone("vit_small_patch16_224", **TINY_VIT).eval().requires_grad_(False)
    backbone.model.load_state_dict(backbone_state)
    args = argparse.Namespace(image_size=32, seed=0, num_workers=0)
    batches = augmented_batches(backbone, root, list(range(n)), 1, 12, args, CPU)
    torch.manual_seed(0)
    grid = LinearGrid([HeadSpec(0.5, 1, True), HeadSpec(0.05, 1, False)], 32, 3, bn=True)
    losses = []
    train_grid(grid, batches, epochs=2, batch_size=12, on_epoch=lambda epoch, loss: losses.append(loss))
    return grid.state_dict(), losses


def _probe_worker(rank, port, state, root, n, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(_augmented_probe(state, root, n), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_augmented_probe_on_two_processes_trains_the_heads_of_one_process(digit_folders, tmp_path, tiny_vit):
    """Each of 2 gloo processes sends its 6 images of every global batch of 12 through the backbone; the gathered
    batch steps the heads (BatchNorm over all 12): heads and losses equal one process's to 1e-9 in float64."""
    state = {k: v.double() for k, v in tiny_vit.model.state_dict().items()}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_probe_worker, args=(port, state, digit_folders / "train", 36, tmp_path), nprocs=2, join=True)
    dtype = torch.get_default_dtype()
    try:
        heads, losses = _augmented_probe(state, digit_folders / "train", 36)
    finally:
        torch.set_default_dtype(dtype)
    assert heads["heads.0.bn.num_batches_tracked"] == 2 * 3 and heads["heads.0.linear.weight"].dtype == torch.float64
    for rank in range(2):
        got, got_losses = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got_losses == pytest.approx(losses, abs=1e-9)
        for k, v in heads.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-9, msg=k)
