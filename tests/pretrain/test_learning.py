"""The default run's learning check: k-NN accuracy after training rises over the random init (about 3 minutes)."""
import json

from pretrain.main import main


def test_default_run_learns_on_the_builtin_sample(tmp_path):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--tensorboard", "false"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["builtin_sample"] is True and "not ImageNet" in res["note"]
    before, after = res["knn_top1_before"], res["knn_top1_after"]
    # 400 validation crops (1 point = 4 images); measured on this machine type: 76.0 -> 80.75
    assert after >= before + 3.0, (before, after)
