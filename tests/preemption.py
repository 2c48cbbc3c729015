"""A preemption signal delivered in-process at a chosen call, and what submitit's handler does with it."""
import contextlib
import os
import signal


class Preempted(Exception):
    """What submitit's handler does at the signal, in-process: stop the run (it requeues the job)."""


@contextlib.contextmanager
def sigusr1_at_call(monkeypatch, owner, name: str, call: int):
    """``owner.name`` (e.g. ``torch.optim.SGD.step``) sends this process SIGUSR1 at its ``call``-th call; the
    handler installed before the run raises :class:`Preempted` once the loop passes the signal on. Yields the list
    of calls made."""
    original, calls = getattr(owner, name), []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)

    def preempted(signum, frame):
        raise Preempted

    previous = signal.signal(signal.SIGUSR1, preempted)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, signalled)
            yield calls
    finally:
        signal.signal(signal.SIGUSR1, previous)
