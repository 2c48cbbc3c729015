"""A trainable task killed with SIGKILL (no handler runs, nothing is saved on the way out) loses only the steps since
its last checkpoint: the file on disk is that complete checkpoint, and the same command ends with the weights of the
run that was never killed."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from eval.run import main

from .test_run_coco import REPO
from .trainable import TRAINABLE, trainable

# the same command, SIGKILLed inside its first checkpoint write: the temporary file is complete and synced, the
# os.replace that would make it the checkpoint never happens
KILLED_IN_WRITE = """
import os, runpy, signal, sys
replace = os.replace
def killed_before_replacing(src, dst):
    if os.path.basename(dst) == "checkpoint.pth":
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)
os.replace = killed_before_replacing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("task", TRAINABLE)
def test_a_run_killed_between_and_during_checkpoint_writes_resumes_to_the_uninterrupted_weights(
        task, tmp_path, tiny_checkpoint, one_thread, caplog):
    run = trainable(task, tmp_path, tiny_checkpoint)
    assert main(run.command(tmp_path / "whole")) == 0
    out = tmp_path / "killed"
    command = [str(REPO / "eval" / "run.py"), *run.command(out)]
    checkpoint = out / run.checkpoint
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # between the first checkpoint and the second
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    first = run.steps_done(torch.load(checkpoint, weights_only=True))
    assert 0 < first < run.total_steps and not (out / "results.json").exists()

    kept = checkpoint.read_bytes()
    again = subprocess.run([sys.executable, "-c", KILLED_IN_WRITE, *command], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == -signal.SIGKILL, again.stderr[-3000:]
    assert run.resumed_at(again.stderr) == [first]  # it started from the checkpoint the kill left
    (partial,) = checkpoint.parent.glob(f".{checkpoint.name}.*.tmp")  # its next one, written, not yet in place
    assert checkpoint.read_bytes() == kept  # the checkpoint it was replacing is intact

    caplog.clear()
    assert main(run.command(out)) == 0  # the same command again
    assert "removed 1 temporary file(s) of interrupted saves" in caplog.text and not partial.exists()
    assert run.resumed_at(caplog.text) == [first]
    run.assert_same_outcome(tmp_path / "whole", out)
