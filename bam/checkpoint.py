"""Checkpoint files: the one place that names them, writes them atomically and loads them safely.

Our checkpoints are plain dicts of tensors, numbers, strings, lists and dicts (the config is a dict, never an
argparse.Namespace), so they load with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT_TAG = "bam-ssl"
FORMAT_VERSION = 1
LATEST = "checkpoint.pth"


def latest_path(output_dir: str | os.PathLike) -> Path:
    """The file training rewrites every epoch and resumes from (also what a requeued job looks for)."""
    return Path(output_dir) / LATEST


def epoch_path(output_dir: str | os.PathLike, epoch: int) -> Path:
    """The kept copy of epoch ``epoch`` (1-based count of finished epochs)."""
    return Path(output_dir) / f"checkpoint{epoch:04d}.pth"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A crash or kill at any moment leaves either the previous file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values: equal weights, equal digest (ranks, runs)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Types third-party checkpoints pickle next to their tensors (DINO, MoCo v3, MAE and official BAM save
# their argparse.Namespace). Nothing here can run code when unpickled.
SAFE_GLOBALS = [argparse.Namespace]


class UnsafeCheckpointError(RuntimeError):
    pass


def load_file(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """Load a ``.pth``/``.pt``/``.pkl`` file with ``weights_only=True`` (plus :data:`SAFE_GLOBALS`).

    A file whose pickle needs anything else is refused with :class:`UnsafeCheckpointError`, unless
    ``trust=True`` (the user vouches for the file; its pickle may then run arbitrary code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check --checkpoint")
    if trust:
        logger.warning("loading %s with weights_only=False: its pickle can run arbitrary code", path)
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the offending global ("Unsupported global: GLOBAL posix.system ..."); garbage has none
        why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if why is None:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (the unpickler failed)") from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle needs code beyond plain tensors and containers ({why}). "
            f"If you trust this file, pass --trust-checkpoint (load_backbone(..., trust=True))") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
