"""A short pretraining run on the built-in sample must raise k-NN accuracy clearly above the random init.

The default run (``python pretrain/main.py``, 16 epochs, several minutes on 2 cores) is measured by
bench/pretrain_learning.py; this is a smaller run of the same entry point (under a minute on 2 idle cores) whose
margin a broken loss or optimizer does not reach.
"""
import json

import pytest
import torch

from pretrain.main import main

# Half the default width (48), a quarter of its epochs (4), a higher learning rate and no EMA teacher, so that the
# k-NN reads the student (in 6 epochs of this setting the teacher at momentum 0.9 gained 2.5 points, the student
# 6.5). Also run by bench/pretrain_learning.py.
SMALL_RUN = ["--epochs", "4", "--warmup-epochs", "1", "--lr", "1e-3", "--teacher", "false", "--tensorboard", "false",
             "--arch-kwargs", '{"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 4, "img_size": 32}']
# One intra-op thread: on a shared 2-core machine two threads per process oversubscribe the cores (the two data
# workers already use one each) and a step of this small model gets several times slower, not faster.
SMALL_RUN_THREADS = 1


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(SMALL_RUN_THREADS)
    yield
    torch.set_num_threads(threads)


def test_short_run_learns_on_the_builtin_sample(tmp_path, one_thread):
    out = tmp_path / "run"
    assert main([*SMALL_RUN, "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["builtin_sample"] is True and "not ImageNet" in res["note"]
    before, after = res["knn_top1_before"], res["knn_top1_after"]
    # 400 validation crops (1 point = 4 images). Measured with seeds 0, 1, 2: +5.5, +4.75, +8.75 points. Broken, the
    # same run fails: --lr 1e-12 76.5 -> 76.75, a zero loss 76.5 -> 76.5, near-uniform targets (--reg 100) -> 71.5.
    assert after >= before + 3.0, (before, after)
