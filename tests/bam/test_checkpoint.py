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


# ---------------------------------------------------------------------------------- files that are no checkpoint
def _one_line_value_error(path, match):
    with pytest.raises(ValueError) as info:
        load_file(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg


def test_empty_text_and_truncated_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    _one_line_value_error(tmp_path / "empty.pth", "is empty (0 bytes): an interrupted download or save")
    (tmp_path / "readme.pth").write_text("<html>404 Not Found</html>\n")
    _one_line_value_error(tmp_path / "readme.pth", "it holds a text file starting '<html>404 Not Found</html>'")
    save_atomic({"w": torch.arange(1000.0)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    _one_line_value_error(tmp_path / "cut.pth", "a zip archive PyTorch cannot read (truncated or damaged)")


def test_safetensors_go_through_the_safetensors_library(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    weights = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.bin").write_bytes((tmp_path / "model.safetensors").read_bytes())  # recognised by content
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: pytest.fail("torch.load read a safetensors file"))
    for name in ("model.safetensors", "model.bin"):
        got = load_file(tmp_path / name)
        assert set(got) == {"a", "b"} and all(torch.equal(got[k], weights[k]) for k in weights)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x02}q\x00.")
    _one_line_value_error(tmp_path / "pickle.safetensors", "is named .safetensors but holds a pickle")


def test_checkpoints_are_readable_as_the_umask_says_and_stale_temporaries_go(tmp_path):
    import os

    from bam.checkpoint import remove_stale_temporaries, save_atomic

    old = os.umask(0o022)
    try:
        path = save_atomic({"x": torch.zeros(1)}, tmp_path / "checkpoint.pth")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    (tmp_path / ".checkpoint.pth.k1ll3d.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".checkpoint.pth.k1ll3d.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "notes.tmp"]
