"""results.json: what every task writes, and the short table the front door prints."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_PACKAGES = ["torch", "torchvision", "timm", "numpy", "scikit-learn", "scikit-image", "opencv-python", "pillow",
             "pycocotools", "faiss-cpu", "detectron2", "mmengine", "mmcv-lite", "mmsegmentation", "bam-ssl"]


def sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically (a temporary file renamed over the old one)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".json", dir=output_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(results), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def run_lock(output_dir: Path, active: bool = True) -> Iterator[None]:
    """Hold ``output_dir/.bam.lock`` for the run: a second run into the same folder fails at once in one line
    instead of mixing its outputs with this one's. An advisory ``flock``: released when the process ends, however
    it ends, so a killed run leaves no stale lock."""
    if not active:
        yield
        return
    path = output_dir / ".bam.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ValueError(f"--output-dir {output_dir} is in use by a running job ({holder}); wait for it or "
                             "write elsewhere") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
