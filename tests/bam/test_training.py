"""bam.training, the loop toolkit every trainer uses, against hand-computed steps and the signals it defers."""
import os
import random
import signal

import numpy as np
import pytest
import torch

from bam.training import (
    GlobalBatches,
    NonFiniteLossError,
    SaveNow,
    SeededSamples,
    amp_dtype,
    finite_loss,
    optimizer_step,
    restore_training_state,
    rng_state,
    set_rng_state,
    training_state,
)


def test_one_amp_rule_for_every_loop():
    cpu = torch.device("cpu")
    assert amp_dtype("none", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="--amp fp16 needs CUDA .* use --amp bf16 or --amp none on cpu"):
        amp_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="--amp 'fp8'"):
        amp_dtype("fp8", cpu)


def test_a_nonfinite_loss_names_the_step_and_the_last_good_checkpoint():
    assert finite_loss(torch.tensor(0.5), "step 3", "ckpt.pth") == 0.5
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 3 \(epoch 0\); stopping. The last good "
                                                 r"checkpoint is ckpt.pth; lower --lr"):
        finite_loss(torch.tensor(float("nan")), "step 3 (epoch 0)", "ckpt.pth", "lower --lr")
    assert issubclass(NonFiniteLossError, ValueError)  # the front doors' one-line error path


def test_optimizer_step_clips_the_gradient_norm_then_steps():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([w], lr=0.1)
    loss = (w * torch.tensor([3.0, 4.0])).sum()  # gradient (3, 4), norm 5
    optimizer_step(loss, optimizer, torch.amp.GradScaler("cpu", enabled=False), clip_grad=1.0, parameters=[w])
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.1 * 0.6, 2.0 - 0.1 * 0.8]))  # the clipped (0.6, 0.8)
    loss = (w * torch.tensor([3.0, 4.0])).sum()
    optimizer_step(loss, optimizer)  # no scaler, no clip: the plain gradient
    assert torch.allclose(w.detach(), torch.tensor([0.94 - 0.3, 1.92 - 0.4]))


def test_a_training_state_restores_weights_optimizer_and_every_generator():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimizer_step(model(torch.randn(4, 3)).sum(), optimizer)
    state = training_state(model, optimizer, None, epoch=2)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    other = torch.nn.Linear(3, 2)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    restore_training_state(state, other, other_optimizer, None)
    assert torch.equal(other.weight, model.weight) and state["epoch"] == 2
    assert other_optimizer.state_dict()["state"][0]["step"] == 1
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    set_rng_state(rng_state())  # a state survives a round trip through plain data


class _Passed(Exception):
    pass


def test_save_now_defers_a_signal_to_the_step_boundary_then_passes_it_on():
    def previous(signum, frame):
        raise _Passed(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with SaveNow() as save_now:
            assert not save_now.due()
            os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not acted on: the step goes on
            assert save_now.pending == [signal.SIGUSR1] and save_now.due()
            with pytest.raises(_Passed):  # after the save: the handler that was there before
                save_now.release()
            assert save_now.pending == [] and not save_now.due()
        assert signal.getsignal(signal.SIGUSR1) is previous  # the context restores the handlers
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize("order", [("SIGTERM", "SIGUSR2"), ("SIGUSR2", "SIGTERM")])
def test_two_signals_in_one_step_are_both_passed_on(order):
    """A preemption as submitit (and SLURM with a grace time) sends it: SIGTERM and USR2 a moment apart, here both
    within one step. The USR2 that requeues the job must reach its handler whatever the order."""
    signals = [getattr(signal, name) for name in order]
    seen = []
    old = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum)) for sig in signals}
    try:
        with SaveNow() as save_now:
            signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # the step: a long C call, no Python handler runs
            for sig in signals:
                os.kill(os.getpid(), sig)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            assert sorted(save_now.pending) == sorted(signals) and seen == []
            save_now.release()
            assert sorted(seen) == sorted(signals) and save_now.pending == []
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def test_a_signal_after_the_loops_last_look_is_passed_on_when_the_loop_ends():
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with SaveNow():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == []
        assert seen == [signal.SIGUSR1]
        with pytest.raises(RuntimeError), SaveNow():  # an error leaving the loop: the signal is not acted on
            os.kill(os.getpid(), signal.SIGUSR1)
            raise RuntimeError
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_accumulating_two_halves_steps_as_the_whole_batch():
    x, y = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([1.0, 0.0, 2.0, 1.0])
    whole, halves = torch.nn.Parameter(torch.tensor([0.5])), torch.nn.Parameter(torch.tensor([0.5]))
    opt_whole, opt_halves = torch.optim.SGD([whole], lr=0.1), torch.optim.SGD([halves], lr=0.1)
    optimizer_step(((x[:, 0] * whole - y) ** 2).mean(), opt_whole)
    optimizer_step(((x[:2, 0] * halves - y[:2]) ** 2).mean() / 2, opt_halves, accumulate=True)
    assert halves.item() == 0.5 and halves.grad is not None  # no step yet
    optimizer_step(((x[2:, 0] * halves - y[2:]) ** 2).mean() / 2, opt_halves)
    # d/dw mean((w x - y)^2) = mean(2 x (w x - y)) at w = 0.5: (2*1*-0.5 + 2*2*1 + 2*3*-0.5 + 2*4*1) / 4 = 2.0
    assert whole.item() == pytest.approx(0.5 - 0.1 * 2.0) and halves.item() == pytest.approx(whole.item())
    assert halves.grad is None  # cleared after the step


def test_global_batches_split_the_same_steps_over_ranks_and_micro_batches():
    """10 images, batch 4: 2 steps of the seeded permutation (2 images dropped). 2 ranks x 2 micro-batches of 1 and
    1 rank x 4 micro-batches cut each step into the same micro-batches, numbered alike; first_step skips steps."""
    order = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    one = GlobalBatches(10, 4, seed=7, accum=4)
    assert list(one) == [[i] for i in order[:8]] and len(one) == 8
    ranks = [GlobalBatches(10, 4, seed=7, rank=r, world=2, accum=2) for r in range(2)]
    assert list(ranks[0]) == [[order[0]], [order[1]], [order[4]], [order[5]]]
    assert list(ranks[1]) == [[order[2]], [order[3]], [order[6]], [order[7]]]
    for step in range(2):
        for r in range(2):
            for j in range(2):
                assert ranks[r].micro_index(step, j) == one.micro_index(step, 2 * r + j)
    assert list(GlobalBatches(10, 4, seed=7, accum=2, first_step=1)) == [order[4:6], order[6:8]]
    with pytest.raises(ValueError, match="global batch of 4 does not split into 3 process"):
        GlobalBatches(10, 4, seed=7, world=3)


def test_seeded_samples_draw_by_index_whatever_the_order():
    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(1).item(), random.random(), np.random.rand()

    data = SeededSamples(Draw(), seed=3)
    forward = [data[i] for i in range(5)]
    torch.manual_seed(99)
    assert [data[i] for i in reversed(range(5))] == forward[::-1]
    assert len(set(forward)) == 5 and SeededSamples(Draw(), seed=4)[0] != forward[0]


_GROUP_SIGNALLED = r"""
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from bam.training import SaveNow, keep_signals_for_the_main_process

class Slow(Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor(float(i))

signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # the previous handler: stop once the state is saved
init = keep_signals_for_the_main_process if sys.argv[1] == "ignore" else None
with SaveNow() as save_now:
    for step, batch in enumerate(DataLoader(Slow(), batch_size=2, num_workers=2, worker_init_fn=init)):
        if step == 3:
            os.killpg(os.getpgrp(), signal.SIGTERM)  # what SLURM does: every process of the job
            time.sleep(1.0)
            continue  # the signal came while the next batch was fetched: the step boundary is the next one
        if save_now.due():
            print(f"saved after step {step}", flush=True)
            save_now.release()
"""


@pytest.mark.parametrize("workers", ["ignore", "default"])
def test_a_sigterm_to_the_whole_job_reaches_the_save_when_workers_leave_it_to_the_main_process(workers, tmp_path):
    """SIGTERM to the process group, as SLURM sends it: with keep_signals_for_the_main_process the workers go on and
    the loop saves at the next step; with default workers one of them dies first and the loader fails."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _GROUP_SIGNALLED, workers], capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    if workers == "ignore":
        assert done.returncode == 143 and "saved after step" in done.stdout, done.stderr[-2000:]
    else:
        assert "saved after step" not in done.stdout and "exited unexpectedly" in done.stderr, done.stderr[-2000:]
