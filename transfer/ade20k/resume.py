"""Resuming ADE20K training: mmengine's resume, guarded, on atomic checkpoints, with a save at the preemption signal.

"The same command is the resume": a rerun finds ``<work_dir>/last_checkpoint`` and goes on from it when the checkpoint
was written by the same run (:func:`resume_point`); otherwise it starts over.

What mmengine 0.10.7's ``Runner.resume`` restores (``runner.py``: ``resume``, ``load_checkpoint``): the weights, the
iteration counter, the optimizer state (AdamW moments, SGD momentum), every parameter scheduler, the message hub (the
logs' smoothing windows, runtime info), and the position in the data: ``IterBasedTrainLoop.run`` draws and discards
as many batches as were trained ("Advance dataloader N steps"), so the InfiniteSampler's index stream and the
DataLoader workers (seeded per rank and worker from the run's seed by mmengine's ``worker_init_fn``) are where the
uninterrupted run had them. That skip reads and transforms every skipped batch (no forward pass): a resume late in
the 160k recipe spends the data-loading time of the iterations already done.

What it does not restore: the global random generators; the Runner seeds them afresh from ``randomness``. torch's
draws dropout (the heads' ``dropout_ratio``) and drop path, so :class:`ResumeHook` puts its state (and CUDA's) into
every checkpoint and back before the first resumed iteration. numpy's and python's draw the augmentations, in the main
process when ``num_workers=0``: there the skipped batches draw what the uninterrupted run drew for them, and with
workers the workers are re-seeded as above, so neither needs saving. With that, a resumed run equals an uninterrupted
one bit for bit on CPU (measured on the built-in sample, random augmentations and dropout included, 1 process with 0
or 2 workers and 2 gloo processes: every logged loss and every metric identical; ``tests/eval/test_run_ade20k.py``).
That needs the rerun to have the uninterrupted run's number of processes and workers: with others it still resumes
(same recipe, same global batch, same index stream) but draws other augmentations from there on. On CUDA it is as
deterministic as an uninterrupted run (the 160k recipe turns ``cudnn_benchmark`` on).

Neither does mmengine check that a checkpoint belongs to the run (it resumes whatever ``last_checkpoint`` names and
loads weights leniently), nor write atomically (``LocalBackend.put`` is ``open(path, 'wb').write``: a kill
mid-save leaves a truncated file). Here: checkpoints carry ``bam_run_id`` (the evaluated weights and the recipe) and
only a match is resumed; the exact key set is asserted on load; the ``bam_atomic`` file backend writes through
:func:`bam.checkpoint.save_atomic`. Checkpoints load with ``weights_only=True`` (torch's default, what mmengine's
loader calls): mmengine's message hub holds ``HistoryBuffer`` objects and numpy numbers such a load refuses, so they
are stored as tensors and Python numbers and rebuilt on load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.dist import barrier, is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import is_model_wrapper

from bam.checkpoint import save_atomic
from bam.training import SaveNow

logger = logging.getLogger(__name__)

RUN_ID = "bam_run_id"
RNG = "bam_torch_rng"
POINTER = "last_checkpoint"  # mmengine's CheckpointHook name for the file that names the latest checkpoint
ATOMIC_BACKEND = {"backend": "bam_atomic"}  # backend_args for CheckpointHook / Runner.save_checkpoint
# what a rerun may change without changing the run: where it writes, how many workers read
VOLATILE = ("work_dir",)
VOLATILE_LOADER = ("num_workers", "persistent_workers")


@register_backend("bam_atomic", force=True)
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose ``put`` writes a temporary file and renames it over the target."""

    def put(self, obj: bytes, filepath: str | Path) -> None:
        save_atomic(obj, filepath, write=lambda data, f: f.write(data))


def run_identity(cfg: dict, weights: dict, seed: int) -> dict:
    """What makes two runs the same run: the evaluated weights (``TaskContext.model_id()``), the recipe (the resolved
    config with the global batch, less where it writes and how many workers read; as a sha256) and the seed."""
    recipe = {k: v for k, v in cfg.items() if k not in VOLATILE}
    for name in ("train_dataloader", "val_dataloader"):
        if name in recipe:
            recipe[name] = {k: v for k, v in recipe[name].items() if k not in VOLATILE_LOADER}
    text = json.dumps(recipe, sort_keys=True, default=str)
    return json.loads(json.dumps({"weights": weights, "recipe_sha256": hashlib.sha256(text.encode()).hexdigest(),
                                  "seed": seed}, default=str))


def _read_meta(path: Path) -> dict | None:
    try:  # mmap: the tensors stay on disk, only the small pickle is read
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]
    except Exception as e:  # noqa: BLE001 - an old mmengine pickle, a foreign or damaged file: not resumable
        logger.warning("%s is not a checkpoint this task can resume (%s)", path, str(e).splitlines()[0][:120])
        return None


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The file ``last_checkpoint`` names (looked up in ``work_dir``, so a moved output folder still resumes); when
    that pointer is missing or names no file, the highest ``iter_N.pth`` (a kill can only cut the pointer's one-line
    rewrite, never a checkpoint, which is written atomically)."""
    pointer = work_dir / POINTER
    if pointer.is_file():
        named = work_dir / Path(pointer.read_text().strip()).name
        if named.name and named.is_file():
            return named
    numbered = [(int(m.group(1)), p) for p in work_dir.glob("iter_*.pth") if (m := re.fullmatch(r"iter_(\d+)\.pth",
                                                                                                 p.name))]
    return max(numbered)[1] if numbered else None


def resume_point(work_dir: Path, run_id: dict) -> tuple[Path, int] | None:
    """``(checkpoint, iterations it holds)`` to resume in ``work_dir``, or None: no checkpoint, or one that belongs to
    another run (other weights, recipe or seed), which is left in place and overwritten as this run saves."""
    path = latest_checkpoint(work_dir)
    if path is None:
        return None
    meta = _read_meta(path)
    if meta is None:
        return None
    if meta.get(RUN_ID) != run_id:
        logger.warning("%s belongs to another run (other weights, recipe or seed): starting over", path)
        return None
    return path, int(meta["iter"])


def plain_message_hub(state: dict) -> dict:
    """mmengine's ``MessageHub.state_dict()`` as a ``weights_only`` load reads it: each ``HistoryBuffer`` as a dict of
    two tensors and its length, numpy numbers as Python numbers."""
    scalars = {}
    for key, buffer in state["log_scalars"].items():
        values, counts = buffer.data
        scalars[key] = {"log_history": torch.from_numpy(np.array(values)), "count_history":
                        torch.from_numpy(np.array(counts)), "max_length": buffer.max_length}
    info = {k: v.item() if isinstance(v, np.generic) else v for k, v in state["runtime_info"].items()}
    return {**state, "log_scalars": scalars, "runtime_info": info}


def message_hub_from_plain(state: dict) -> dict:
    """The inverse of :func:`plain_message_hub` (what ``MessageHub.load_state_dict`` expects)."""
    scalars = {k: HistoryBuffer(v["log_history"].numpy(), v["count_history"].numpy(), v["max_length"])
               for k, v in state["log_scalars"].items()}
    return {**state, "log_scalars": scalars}


def torch_rng_state() -> dict:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_torch_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_for_resume(runner: Any) -> str:
    """Save ``iter_<N>.pth`` (N = iterations done) through the runner (rank 0 writes, atomically) and point
    ``last_checkpoint`` at it, unless the CheckpointHook has just saved this iteration; returns its path."""
    done = runner.iter + 1  # called from after_train_iter: the loop counts this iteration after the hooks
    path = str(Path(runner.work_dir) / f"iter_{done}.pth")
    if runner.message_hub.get_info("last_ckpt") != path:
        runner.save_checkpoint(runner.work_dir, Path(path).name, meta={"epoch": runner.epoch, "iter": done},
                               by_epoch=False, backend_args=ATOMIC_BACKEND)
        runner.message_hub.update_info("last_ckpt", path)
        if is_main_process():
            save_atomic(path, Path(runner.work_dir) / POINTER, write=lambda text, f: f.write(text.encode()))
    barrier()  # every rank waits for rank 0's file before any of them lets a signal end it
    return path


class ResumeHook(Hook):
    """Makes mmengine's checkpoints resumable as described above, and saves one at a preemption signal:
    after each training iteration it asks ``save_now.due()`` (collective: every rank answers alike), and when a signal
    came, saves and calls ``save_now.release()``, which passes the signal on (the default action ends the process).
    Runs after the CheckpointHook and the LoggerHook of the same iteration."""

    priority = "LOWEST"

    def __init__(self, run_id: dict, save_now: SaveNow | None = None):
        self.run_id, self.save_now = run_id, save_now
        self._rng: dict | None = None

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        checkpoint["meta"][RUN_ID] = self.run_id
        checkpoint["meta"][RNG] = torch_rng_state()
        checkpoint["message_hub"] = plain_message_hub(checkpoint["message_hub"])

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        expected = set(model.state_dict())
        found = {re.sub(r"^module\.", "", k) for k in checkpoint["state_dict"]}
        if found != expected:  # mmengine's load only logs a mismatch: refuse it here, naming the keys
            raise ValueError(f"the checkpoint to resume does not fit the model: missing "
                             f"{sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]}")
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = message_hub_from_plain(checkpoint["message_hub"])
        self._rng = checkpoint["meta"].get(RNG)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        if self._rng is not None:  # after mmengine's skip and this iteration's batch: as the uninterrupted run here
            set_torch_rng_state(self._rng)
            self._rng = None

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if self.save_now is not None and self.save_now.due():
            path = save_for_resume(runner)
            if is_main_process():
                logger.warning("preemption signal: saved %s at iteration %d", path, runner.iter + 1)
            self.save_now.release()
