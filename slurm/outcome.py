"""submitit's result files, read without running code from them.

submitit writes ``<job>_<task>_result.pkl`` as a pickle of ``("success", value)`` or ``("error", traceback)``.
Plain ``pickle.load`` on such a file runs whatever a crafted one asks for, so it is read by an unpickler that
resolves no global at all: our jobs return plain data (a dict of numbers and strings, see
:class:`slurm.launch.FrontDoorJob`), and anything else is refused as unreadable.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to import {module}.{name} from a job result (plain data only)")


def read_outcome(path: str | Path) -> tuple[str, Any] | None:
    """``(outcome, value)`` of a result file: outcome ``"success"`` or ``"error"``; None when it holds anything but
    plain data (then nothing in it was run)."""
    data = Path(path).read_bytes()
    try:
        outcome = _PlainDataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError):
        return None
    if not (isinstance(outcome, tuple) and len(outcome) == 2 and outcome[0] in ("success", "error")):
        return None
    return outcome
