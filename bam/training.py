"""The one training-loop toolkit: pretraining, fine-tuning, COCO detection and the linear grid step through it.

A loop builds its model and optimizer, then per step::

    with autocast(device, amp_dtype):
        loss = criterion(model(x), y)
    value = finite_loss(loss, f"step {step}", last_good)   # NonFiniteLossError names the step and the checkpoint
    optimizer_step(loss, optimizer, scaler, clip_grad, model.parameters())  # accumulate=True: backward only

and saves ``training_state(...)`` atomically through :func:`bam.checkpoint.save_atomic`; ``restore_training_state``
puts it back (weights, optimizer, grad scaler, every random generator), so a resumed run draws what an
uninterrupted one would have drawn. :class:`SaveNow` turns a preemption signal into a save at the next step boundary.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
import signal
import threading
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(ValueError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


def amp_dtype(amp: str, device: torch.device, flag: str = "--amp") -> torch.dtype | None:
    """The autocast dtype of ``--amp none|bf16|fp16``. fp16 needs CUDA (its GradScaler): on any other device every
    loop refuses it with this one error, before anything is trained."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"{flag} {amp!r}: expected one of {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"{flag} fp16 needs CUDA (a grad scaler); use {flag} bf16 or {flag} none on {device.type}")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context for full precision."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that scales only for fp16 (a no-op one otherwise, so every loop calls it the same way)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def finite_loss(loss: torch.Tensor, where: str, last_good: object, hint: str = "") -> float:
    """``loss.item()``, or :class:`NonFiniteLossError`: ``the loss is nan at <where>; stopping. The last good
    checkpoint is <last_good>`` (then ``hint``, e.g. what to lower)."""
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the loss is {value} at {where}; stopping. The last good checkpoint is "
                                 f"{last_good}{'; ' + hint if hint else ''}")
    return value


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None,
                   clip_grad: float = 0.0, parameters: Iterable[torch.nn.Parameter] | None = None,
                   accumulate: bool = False) -> None:
    """(Scaled) backward; then, unless ``accumulate``, the optional gradient-norm clip of ``parameters`` (unscaled
    first), the step, the scaler's update and the gradients cleared. ``accumulate=True`` only adds this
    micro-batch's gradients to those before (MAE's ``accum_iter``: divide each micro-batch's loss by their number)."""
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if accumulate:
        return
    if clip_grad > 0:
        if parameters is None:
            raise ValueError("optimizer_step: clipping needs the parameters")
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys (numpy's ``SeedSequence``): independent streams for, e.g.,
    ``(seed, epoch, index)``."""
    return int(np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1)[0])


class SeededSamples(torch.utils.data.Dataset):
    """``dataset`` whose item ``i`` is loaded with the python, numpy and torch generators seeded from ``(seed, i)``.

    An image's augmentation then depends on its index and ``seed`` only, not on which rank, DataLoader worker or
    micro-batch loads it: a global batch split over 8 processes, or over 16 accumulation steps of one, is made of
    the same views, and a resumed epoch draws the views the uninterrupted one would have.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_everything(derived_seed(self.seed, index))
        return self.dataset[index]


class GlobalBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of every global batch of an epoch (a batch sampler).

    The epoch is ``torch.randperm(n)`` from ``seed`` cut into ``n // batch`` global batches (the rest is dropped);
    rank ``r`` of ``world`` takes the ``r``-th contiguous share of each and cuts it into ``accum`` micro-batches, so
    the micro-batch ``k = r * accum + j`` of a step is the same images whatever ``world`` x ``accum`` makes the
    step. ``first_step`` skips the steps trained before the checkpoint a run resumes from.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1, accum: int = 1,
                 first_step: int = 0):
        if batch % (world * accum):
            raise ValueError(f"a global batch of {batch} does not split into {world} process(es) x {accum} "
                             "micro-batch(es)")
        self.n, self.batch, self.seed, self.rank, self.world, self.accum = n, batch, seed, rank, world, accum
        self.micro, self.steps, self.first_step = batch // (world * accum), n // batch, first_step

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        for step in range(self.first_step, self.steps):
            start = step * self.batch + self.rank * self.accum * self.micro
            for j in range(self.accum):
                yield order[start + j * self.micro:start + (j + 1) * self.micro]

    def __len__(self) -> int:
        return max(self.steps - self.first_step, 0) * self.accum

    def micro_index(self, step: int, j: int) -> int:
        """The index of this rank's ``j``-th micro-batch of ``step`` among all the epoch's micro-batches."""
        return (step * self.world + self.rank) * self.accum + j


class SkipFirst(torch.utils.data.Sampler):
    """``sampler``'s indices without the first ``skip``: the part of an epoch trained before the checkpoint a run
    resumes from, so the resumed epoch goes on with the images the uninterrupted one would have seen next."""

    def __init__(self, sampler: torch.utils.data.Sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def seed_everything(seed: int) -> None:
    """torch, python and numpy generators (Mixup, RandAugment, random erasing, drop path draw from them)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """Every global random generator's state, as plain data a ``weights_only`` load reads back."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), np_state[2], np_state[3], np_state[4]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   **extra: Any) -> dict:
    """What a resume needs: weights, optimizer, grad scaler, random generators, plus the loop's own ``extra``
    (epoch or iteration, history, the run's identity)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(), **extra}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def restore_training_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler | None) -> None:
    """The inverse of :func:`training_state` (the random generators too, when the state holds them)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:
        set_rng_state(state["rng"])


def keep_signals_for_the_main_process(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the workers ignore the preemption signals. SLURM signals every process of a
    job; a worker that a SIGTERM ends takes the main process down with it ("DataLoader worker ... is killed") before
    :class:`SaveNow` can save. The workers still end with their main process (they watch it)."""
    for sig in SaveNow.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class SaveNow:
    """The "save now" hook of a preemption signal.

    Inside ``with SaveNow() as save_now:`` the signals SLURM and submitit send before they stop a job (SIGUSR1,
    SIGUSR2: submitit's preemption signal, SIGTERM) are only recorded. The loop asks ``save_now.due()`` at each step
    boundary (a collective under a process group: every rank answers the same) and, when it is, writes its state and
    calls ``save_now.release()``: the signal then goes to the handler that was there before, at a point where the
    checkpoint on disk is complete (submitit's requeues and exits, the default one ends the process, submitit's
    SIGTERM bypass lets training go on). Every signal recorded is passed on, in the order they came: a preemption
    sends SIGTERM and USR2 a moment apart, often within one step, and the one that requeues must not be lost.
    Outside the main thread it does nothing.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGTERM") if hasattr(signal, name))

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.pending: list[int] = []  # recorded, not yet passed on; in the order they came
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SaveNow:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Restore the handlers; a signal that came after the loop's last look is passed on now (the loop's last
        checkpoint is on disk), unless an error is leaving the loop."""
        if self.pending and exc_type is None:
            self.release()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum: int, frame: Any) -> None:
        if signum not in self.pending:
            self.pending.append(signum)

    def due(self) -> bool:
        """Whether a signal asks for a checkpoint now (on every rank, when any rank received one)."""
        flag = bool(self.pending)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            value = torch.tensor([1.0 if flag else 0.0], device=device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            flag = bool(value.item())
        return flag

    def release(self) -> None:
        """Hand the recorded signals, in the order they came, to the handlers installed before (after the state is
        saved). No signal here: another rank's, this one goes on until its own arrives."""
        signals, self.pending = self.pending, []
        for signum in signals:
            previous = self._previous.get(signum, signal.SIG_DFL)
            logger.warning("%s: state saved; passing the signal on", signal.Signals(signum).name)
            if callable(previous):
                previous(signum, None)  # submitit: requeue and exit; its SIGTERM bypass: return and go on
            elif previous == signal.SIG_DFL:
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)
                self._previous = {}
                os.kill(os.getpid(), signum)
