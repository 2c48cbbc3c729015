import signal
import subprocess
import sys
import time

import pytest
import torch

from bam import checkpoint
from bam.checkpoint import epoch_path, latest_path, load_file, save_atomic


def test_file_names_are_owned_here(tmp_path):
    assert latest_path(tmp_path) == tmp_path / "checkpoint.pth"
    assert epoch_path(tmp_path, 7) == tmp_path / "checkpoint0007.pth"


def test_round_trip_loads_with_weights_only(tmp_path):
    obj = {"config": {"lr": 0.1, "crops": [2, 6]}, "w": torch.arange(3.0), "epoch": 4}
    save_atomic(obj, tmp_path / "sub" / "c.pth")
    got = load_file(tmp_path / "sub" / "c.pth")
    assert got["config"] == obj["config"] and torch.equal(got["w"], obj["w"])


def test_a_failing_save_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    save_atomic({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2}, path)
    assert load_file(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


SAVER = """
import sys, torch
from bam.checkpoint import save_atomic
big = torch.randn(4_000_000)
i = 0
while True:
    i += 1
    save_atomic({"step": i, "w": big}, sys.argv[1])
    print(i, flush=True)
"""


def test_a_kill_during_saves_never_corrupts_the_last_good_file(tmp_path):
    path = tmp_path / "c.pth"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few saves complete, then kill at an arbitrary moment
            proc.stdout.readline()
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    got = load_file(path)
    assert got["step"] >= 3 and got["w"].shape == (4_000_000,)
