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
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

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


def save_atomic(obj: Any, path: str | os.PathLike, write: Callable[[Any, BinaryIO], Any] | None = None) -> Path:
    """``torch.save`` (or ``write(obj, file)``: bytes someone else serialised) to a temporary file in the same
    folder, fsync, then ``os.replace``.

    A crash or kill at any moment leaves either the previous file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: colleagues read checkpoints as the umask says
        with os.fdopen(fd, "wb") as f:
            (write or torch.save)(obj, f)  # torch.save looked up now, not when this module was imported
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves that a kill interrupted (``.<name>.<random>.tmp``, see
    :func:`save_atomic`): call at the start of a run that owns ``folder``, before it saves anything."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temporary file(s) of interrupted saves in %s", len(stale), folder)
    return stale


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


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    return len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _describe(head: bytes) -> str:
    """What a file that is no readable checkpoint seems to hold, for the error message."""
    text = head[:40]
    if text and all(32 <= b < 127 or b in (9, 10, 13) for b in text):
        return f"a text file starting {text.decode().splitlines()[0][:30]!r}"
    if head.startswith(b"PK"):
        return "a zip archive PyTorch cannot read (truncated or damaged)"
    if head.startswith(b"\x80"):
        return "a pickle PyTorch cannot read (truncated or damaged)"
    return "neither a PyTorch zip/pickle nor a safetensors file"


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e!r})"
                         f"; fetch the file again") from None


def load_file(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint: ``.safetensors`` (recognised by its header) through the safetensors library, any other
    ``.pth``/``.pt``/``.pth.tar``/``.pkl`` with ``torch.load(weights_only=True)`` (plus :data:`SAFE_GLOBALS`).

    A file whose pickle needs anything else is refused with :class:`UnsafeCheckpointError`, unless
    ``trust=True`` (the user vouches for the file; its pickle may then run arbitrary code). An empty, text or
    otherwise unreadable file gives a one-line ValueError naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check --checkpoint")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download or save; fetch or copy it again")
    with open(path, "rb") as f:
        head = f.read(64)
    if _looks_like_safetensors(head, size):
        return _load_safetensors(path, map_location)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} is named .safetensors but holds {_describe(head)}; fetch the file again")
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
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: it holds {_describe(head)} "
                             f"(the unpickler failed)") from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle needs code beyond plain tensors and containers ({why}). "
            f"If you trust this file, pass --trust-checkpoint (load_backbone(..., trust=True))") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, KeyError, ... on foreign bytes
        found = _describe(head)
        if not found.startswith("a text file"):  # torch's reason helps only for binary files (e.g. truncated zip)
            found += f" ({str(e).split('. ')[0].splitlines()[0] if str(e).strip() else type(e).__name__})"
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: it holds {found}; check the path, or fetch "
                         f"the file again") from None
