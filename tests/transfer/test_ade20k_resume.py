"""Resuming ADE20K training: which checkpoint a rerun resumes, atomic writes, weights_only-loadable message hubs, and
the one-line error for a batch the processes cannot share. (A resumed run equals an uninterrupted one, and a signal
saves: tests/eval/test_run_ade20k.py.)"""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("mmseg", reason="the 'seg' extra: pip install -e '.[seg]'")
from mmengine.fileio import get_file_backend  # noqa: E402
from mmengine.logging import HistoryBuffer, MessageHub  # noqa: E402

from transfer.ade20k import resume  # noqa: E402
from transfer.ade20k.train import per_process_batch  # noqa: E402

RUN = {"weights": {"checkpoint_sha256": "ab"}, "recipe_sha256": "cd", "seed": 0}


def _checkpoint(path, run_id, iteration):
    torch.save({"meta": {"iter": iteration, resume.RUN_ID: run_id}, "state_dict": {"w": torch.zeros(2)}}, path)


def test_only_this_runs_checkpoint_is_resumed(tmp_path, caplog):
    assert resume.resume_point(tmp_path, RUN) is None  # nothing there
    _checkpoint(tmp_path / "iter_4.pth", RUN, 4)
    _checkpoint(tmp_path / "iter_8.pth", RUN, 8)
    (tmp_path / "last_checkpoint").write_text("/elsewhere/moved/iter_4.pth")  # the pointer's name, in this folder
    assert resume.resume_point(tmp_path, RUN) == (tmp_path / "iter_4.pth", 4)
    (tmp_path / "last_checkpoint").write_text("")  # a kill cut the pointer's rewrite: the highest iter_N.pth
    assert resume.resume_point(tmp_path, RUN) == (tmp_path / "iter_8.pth", 8)
    other = {**RUN, "recipe_sha256": "ef"}
    assert resume.resume_point(tmp_path, other) is None
    assert "belongs to another run (other weights, recipe or seed): starting over" in caplog.text
    (tmp_path / "iter_8.pth").write_bytes(b"PK\x03\x04 truncated")
    assert resume.resume_point(tmp_path, RUN) is None and "not a checkpoint this task can resume" in caplog.text


def test_run_identity_ignores_where_and_how_many_workers_but_not_the_recipe():
    cfg = {"work_dir": "/a", "train_dataloader": {"batch_size": 16, "num_workers": 4, "persistent_workers": True},
           "optim_wrapper": {"optimizer": {"lr": 6e-5}}}
    same = {**cfg, "work_dir": "/b", "train_dataloader": {"batch_size": 16, "num_workers": 0}}
    weights = {"checkpoint_sha256": "ab", "arch": "vit_small_patch16_224"}
    assert resume.run_identity(cfg, weights, 0) == resume.run_identity(same, weights, 0)
    assert resume.run_identity(cfg, weights, 0) != resume.run_identity(cfg, weights, 1)
    assert resume.run_identity(cfg, weights, 0) != resume.run_identity(cfg, {**weights, "checkpoint_sha256": "x"}, 0)
    other_lr = {**cfg, "optim_wrapper": {"optimizer": {"lr": 1e-4}}}
    assert resume.run_identity(cfg, weights, 0) != resume.run_identity(other_lr, weights, 0)


def test_atomic_backend_leaves_the_previous_file_when_a_write_dies(tmp_path, monkeypatch):
    backend = get_file_backend(str(tmp_path), backend_args=resume.ATOMIC_BACKEND)
    assert isinstance(backend, resume.AtomicLocalBackend)
    target = tmp_path / "iter_2.pth"
    backend.put(b"good", target)
    assert target.read_bytes() == b"good"

    def killed(*args):
        raise KeyboardInterrupt  # as a signal arriving between the write and the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        backend.put(b"half", target)
    assert target.read_bytes() == b"good" and sorted(p.name for p in tmp_path.iterdir()) == ["iter_2.pth"]


def test_message_hub_round_trips_through_a_weights_only_load(tmp_path):
    hub = MessageHub(f"resume-test-{os.getpid()}")
    for i, value in enumerate([2.5, 2.25, 2.0]):
        hub.update_scalar("train/loss", value, count=2)
        hub.update_info("iter", i, resumed=True)
    hub.update_info("eta", np.float64(12.5), resumed=True)
    state = hub.state_dict()
    with pytest.raises(Exception, match="Weights only load failed"):  # mmengine's own state: refused
        torch.save(state, tmp_path / "raw.pth")
        torch.load(tmp_path / "raw.pth", weights_only=True)
    torch.save(resume.plain_message_hub(state), tmp_path / "plain.pth")
    loaded = resume.message_hub_from_plain(torch.load(tmp_path / "plain.pth", weights_only=True))
    again = MessageHub(f"resume-test-{os.getpid()}-again")
    again.load_state_dict(loaded)
    buffer = again.get_scalar("train/loss")
    assert isinstance(buffer, HistoryBuffer) and buffer.data[0].tolist() == [2.5, 2.25, 2.0]
    assert buffer.data[1].tolist() == [2, 2, 2] and buffer.max_length == hub.get_scalar("train/loss").max_length
    assert again.get_info("eta") == 12.5 and again.get_info("iter") == 2


def test_a_batch_the_processes_cannot_share_is_one_line_naming_the_flag():
    assert per_process_batch(16, 1) == 16 and per_process_batch(16, 8) == 2
    with pytest.raises(ValueError, match=r"^--batch-size 16 is the global batch and must be a multiple of the 3 "
                                         r"processes[^\n]*$"):
        per_process_batch(16, 3)
