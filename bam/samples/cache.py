"""Where generated samples live, and how they are written without ever leaving a half-made folder behind."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bam.checkpoint import current_umask

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$BAM_CACHE``, else ``$XDG_CACHE_HOME/bam``, else ``~/.cache/bam``. Called by entry points only."""
    if os.environ.get("BAM_CACHE"):
        return Path(os.environ["BAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bam"


def ensure_generated(target: Path, generate: Callable[[Path], None]) -> Path:
    """Run ``generate(tmp)`` once into a temporary sibling folder, then rename it to ``target`` (atomic)."""
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: a shared cache must be readable as the umask says
    try:
        logger.info("generating the built-in sample into %s (once)", target)
        generate(tmp)
        (tmp / ".complete").touch()
        if target.exists() and not (target / ".complete").is_file():  # left by an interrupted older run
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / ".complete").is_file():
                raise
            shutil.rmtree(tmp)  # another process (a rank of the same job) finished first: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
