import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bam.checkpoint import load_file
from bam.formats import load_backbone
from pretrain.main import main, parse_args
from pretrain.trainer import make_schedules

from ..conftest import tiny_args

REPO = Path(__file__).resolve().parents[2]


def _weights(out):
    ckpt = load_file(Path(out) / "checkpoint.pth")
    return ckpt["model"], ckpt.get("teacher"), ckpt


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main(tiny_args(tiny_folder, out)) == 0
    return out


def test_a_run_writes_checkpoint_config_logs_and_results(uninterrupted):
    results = json.loads((uninterrupted / "results.json").read_text())
    assert results["task"] == "pretrain" and results["epochs"] == 3
    assert isinstance(results["knn_top1_before"], float) and isinstance(results["knn_top1_after"], float)
    assert Path(results["checkpoint"]) == uninterrupted / "checkpoint.pth"
    assert (uninterrupted / "config.yaml").is_file()
    records = [json.loads(line) for line in (uninterrupted / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "lr", "weight_decay", "reg", "teacher_momentum", "images_per_s", "data_time"} <= set(train[0])
    assert len([r for r in records if r["kind"] == "epoch"]) == 3
    # the checkpoint is evaluable as it is: load_backbone picks the teacher's backbone
    ckpt = load_file(uninterrupted / "checkpoint.pth")
    backbone = load_backbone(uninterrupted / "checkpoint.pth")
    assert backbone.checkpoint_format == "bam"
    _assert_same(backbone.model.state_dict(), ckpt["teacher_backbone"])


def test_contrastive_crop_boxes_are_computed_saved_and_tensorboard_written(tiny_folder, tmp_path):
    out = tmp_path / "ccrop"
    assert main(tiny_args(tiny_folder, out, ccrop_alpha=0.6, loc_interval=1, warmup_epochs=1, epochs=2,
                          tensorboard="true", box_thresh=0.5)) == 0
    boxes = load_file(out / "checkpoint.pth")["boxes"]
    assert boxes.shape == (32, 4) and ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert not torch.equal(boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(32, 1))  # attention moved them
    assert any((out / "tensorboard").iterdir())


def test_training_moves_the_student_and_the_teacher(tiny_folder, tmp_path):
    out = tmp_path / "one"
    assert main(tiny_args(tiny_folder, out, epochs=1)) == 0  # 4 steps
    start = tmp_path / "zero"
    assert main(tiny_args(tiny_folder, start, epochs=1, lr=0.0)) == 0  # same init, no learning
    moved, teacher, _ = _weights(out)
    still, teacher0, _ = _weights(start)
    w = "backbone.model.blocks.0.mlp.fc1.weight"
    assert not torch.equal(moved[w], still[w])
    assert not torch.equal(teacher[w], teacher0[w]) and not torch.equal(teacher[w], moved[w])


def test_bf16_autocast_and_gradient_checkpointing_run_on_cpu(tiny_folder, tmp_path):
    out = tmp_path / "bf16"
    assert main(tiny_args(tiny_folder, out, epochs=1, amp="bf16", grad_checkpointing="true", optimizer="lars")) == 0
    model, _, ckpt = _weights(out)
    assert all(v.dtype == torch.float32 for v in model.values())  # autocast leaves the weights in float32
    assert ckpt["config"]["amp"] == "bf16" and ckpt["epoch"] == 1


def test_schedules_at_known_steps(tiny_folder, tmp_path):
    args = parse_args(tiny_args(tiny_folder, tmp_path, lr=0.002, epochs=10, warmup_epochs=2, reg=0.05,
                                reg_start=0.1, reg_warmup_epochs=4, teacher_momentum=0.996))
    s = make_schedules(args, steps=5, global_batch=128)
    peak = 0.002 * 128 / 256
    final = peak * 1e-3
    # 10 warm-up steps to the peak, then 40 cosine steps towards final: the last is step 39 of the cosine
    assert s.lr[0] == 0 and s.lr[5] == pytest.approx(peak / 2) and s.lr[10] == pytest.approx(peak)
    assert s.lr[-1] == pytest.approx(final + (peak - final) * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert s.wd[0] == pytest.approx(0.04) and s.wd[-1] == pytest.approx(0.4, rel=1e-3)
    assert s.momentum[0] == pytest.approx(0.996)
    assert s.momentum[-1] == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi * 49 / 50)))
    assert s.reg[0] == pytest.approx(0.1) and s.reg[19] == pytest.approx(0.05) and s.reg[-1] == 0.05


def test_resume_in_process_equals_an_uninterrupted_run(tiny_folder, tmp_path, uninterrupted):
    out = tmp_path / "resumed"
    assert main(tiny_args(tiny_folder, out, stop_after_epochs=1)) == 0
    assert load_file(out / "checkpoint.pth")["epoch"] == 1 and not (out / "results.json").exists()
    assert main(tiny_args(tiny_folder, out)) == 0  # finds the checkpoint, goes on from epoch 1
    a, ta, ca = _weights(uninterrupted)
    b, tb, cb = _weights(out)
    _assert_same(a, b)
    _assert_same(ta, tb)
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()


def _wait_until_training(out: Path, epoch: int, timeout: float = 120) -> None:
    """Return once a run writing ``out/log.jsonl`` logs a training step of ``epoch`` (or after ``timeout``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = out / "log.jsonl"
        if log.is_file() and any('"kind": "train"' in line and f'"epoch": {epoch}' in line
                                 for line in log.read_text().splitlines()):
            return
        time.sleep(0.02)


def test_a_killed_run_resumes_to_the_same_weights(tiny_folder, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    argv = [sys.executable, str(REPO / "pretrain" / "main.py"), *tiny_args(tiny_folder, out, num_workers=1,
                                                                            epochs=3)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_training(out, epoch=1)  # kill it during epoch 2, once epoch 1's checkpoint is on disk
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert load_file(out / "checkpoint.pth")["epoch"] == 1  # the last good checkpoint is intact
    assert subprocess.run(argv, capture_output=True).returncode == 0
    _assert_same(_weights(uninterrupted)[0], _weights(out)[0])


def test_torchrun_with_two_processes_matches_one_process(tiny_folder, tmp_path, uninterrupted):
    """2 ranks x 4 images see exactly the images of the 1-process batches of 8 (same crops: they are seeded per
    image), start from the same weights and average their gradients: the runs end with the same weights."""
    out = tmp_path / "ddp"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            str(REPO / "pretrain" / "main.py"), *tiny_args(tiny_folder, out, batch_size_per_gpu=4)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("k-NN (k=20, T=0.07) after training") == 1  # only rank 0 talks
    ddp, ddp_teacher, ckpt = _weights(out)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 3 * 32 // 8 and len(ckpt["rng"]) == 2
    single, single_teacher, _ = _weights(uninterrupted)
    for k in single:
        assert torch.allclose(ddp[k], single[k], atol=1e-4), k
        assert torch.allclose(ddp_teacher[k], single_teacher[k], atol=1e-4), k


class _Requeued(Exception):
    """What submitit's handler does after the save: here, leave the run."""


def test_a_signal_mid_epoch_saves_there_and_the_same_command_resumes_to_the_same_weights(
        tiny_folder, tmp_path, uninterrupted, monkeypatch):
    """SIGUSR1 during step 5 (epoch 1, its 2nd of 4 batches): the step finishes, the checkpoint records epoch 1 and
    2 batches done with every generator, the signal then reaches the previous handler; the rerun skips the 2
    batches already trained and ends bit-equal with the uninterrupted run."""
    from pretrain.monitor import Monitor

    log = Monitor.log

    def log_then_signal(self, step, values, kind="train"):
        log(self, step, values, kind=kind)
        if kind == "train" and step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)

    def requeue(signum, frame):
        raise _Requeued

    out = tmp_path / "signalled"
    old = signal.signal(signal.SIGUSR1, requeue)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Monitor, "log", log_then_signal)
            with pytest.raises(_Requeued):
                main(tiny_args(tiny_folder, out))
    finally:
        signal.signal(signal.SIGUSR1, old)
    saved = load_file(out / "checkpoint.pth")
    assert (saved["epoch"], saved["iteration"], saved["step"]) == (1, 2, 6)
    assert main(tiny_args(tiny_folder, out)) == 0
    resumed = load_file(out / "checkpoint.pth")
    assert (resumed["epoch"], resumed["iteration"]) == (3, 0)
    _assert_same(_weights(uninterrupted)[0], resumed["model"])
    _assert_same(_weights(uninterrupted)[1], resumed["teacher"])


def test_a_plain_process_saves_at_sigusr1_then_ends_and_the_rerun_finishes_the_same(tiny_folder, tmp_path,
                                                                                    uninterrupted):
    """Without a launcher (torchrun, a shell) the signal's own default follows the save: the process ends."""
    out = tmp_path / "usr1"
    argv = [sys.executable, str(REPO / "pretrain" / "main.py"), *tiny_args(tiny_folder, out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_training(out, epoch=1)  # signal it once it trains epoch 1
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGUSR1, err[-2000:]
    assert "SIGUSR1: state saved; passing the signal on" in err
    saved = load_file(out / "checkpoint.pth")
    assert saved["epoch"] * 4 + saved["iteration"] >= 5  # at least the step it was trained in
    assert subprocess.run(argv, capture_output=True).returncode == 0
    _assert_same(_weights(uninterrupted)[0], _weights(out)[0])
