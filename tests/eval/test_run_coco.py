"""``eval/run.py --task coco`` on a small generated COCO-format set: training, COCOeval, resume, export, errors."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bam.samples import coco as coco_sample
from eval.run import main

from ..conftest import assert_one_line_error
from ..preemption import Preempted, sigusr1_at_call

REPO = Path(__file__).resolve().parents[2]
FAST = ["--iters", "4", "--batch-size", "2", "--min-size", "64", "--max-size", "64", "--proposals", "100,50,50,20",
        "--roi-batch", "16", "--detections-per-image", "10", "--num-workers", "0", "--checkpoint-period", "2",
        "--warmup-iters", "2", "--steps", "3", "--lr", "0.001"]


@pytest.fixture
def coco_root(tmp_path, monkeypatch):
    monkeypatch.setattr(coco_sample, "SPLITS", {"train2017": (6, 0), "val2017": (3, 1)})
    root = tmp_path / "coco"
    root.mkdir()
    coco_sample.generate(root)
    return root


def test_coco_task_trains_evaluates_and_resumes(coco_root, tmp_path, tiny_checkpoint, caplog):
    out = tmp_path / "out"
    argv = ["--task", "coco", "--data", str(coco_root), "--checkpoint", str(tiny_checkpoint), "--output-dir", str(out),
            *FAST]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    names = [f"{t}/{m}" for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    assert list(res["metrics"]) == names
    assert all(v is None or 0.0 <= v <= 100.0 for v in res["metrics"].values())
    assert res["categories"] == ["coin", "horse", "shape"] and res["engine"] == "torchvision"
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["iter"] == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iter"] == 4 and set(log[-1]) >= {"loss", "loss_mask", "loss_box_reg", "lr"}
    caplog.clear()
    assert main(argv) == 0  # the same run again: resumes at its last iteration, trains nothing
    assert "resuming detection training" in caplog.text and "(iteration 4)" in caplog.text
    assert json.loads((out / "results.json").read_text())["metrics"] == res["metrics"]


class _Killed(Exception):
    pass


def test_a_run_stopped_mid_epoch_or_signalled_resumes_at_its_place_to_the_uninterrupted_weights(
        coco_root, tmp_path, tiny_checkpoint, monkeypatch):
    """6 training images in batches of 2: 3 iterations an epoch, checkpoints every 2. Stopped after the checkpoint of
    iteration 4 (epoch 1, one batch in), the same command goes on with epoch 1's second batch and the saved
    generators. SIGUSR1 during iteration 5 saves after it (mid-epoch, between periodic checkpoints) and passes the
    signal on; the same command resumes there. Both end with the weights of the run that was never stopped."""
    from bam import training
    from transfer.coco import train as coco_train

    def argv(out):
        return ["--task", "coco", "--data", str(coco_root), "--checkpoint", str(tiny_checkpoint), "--output-dir",
                str(out), *FAST, "--iters", "6", "--steps", "5", "--eval-batch-size", "3"]

    assert main(argv(tmp_path / "whole")) == 0
    save = coco_train.save_atomic

    def save_then_die(state, path):
        save(state, path)
        if state["iter"] == 4:
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(coco_train, "save_atomic", save_then_die)
        with pytest.raises(_Killed):
            main(argv(tmp_path / "stopped"))
    with sigusr1_at_call(monkeypatch, training, "optimizer_step", 5), pytest.raises(Preempted):
        main(argv(tmp_path / "signalled"))
    assert torch.load(tmp_path / "signalled" / "checkpoint.pth", weights_only=True)["iter"] == 5
    whole = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)
    for name in ("stopped", "signalled"):
        assert main(argv(tmp_path / name)) == 0
        resumed = torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)
        assert whole["iter"] == resumed["iter"] == 6
        for k, v in whole["model"].items():
            assert torch.equal(v, resumed["model"][k]), (name, k)


def test_export_only_writes_detectron2_weights(coco_root, tmp_path, tiny_checkpoint):
    out = tmp_path / "exp"
    assert main(["--task", "coco", "--data", str(coco_root), "--checkpoint", str(tiny_checkpoint), "--output-dir",
                 str(out), "--export-only"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["detectron2_weights"] == str(out / "detectron2_weights.pkl") and res["metrics"] == {}


def test_coco_bad_input(coco_root, tmp_path, tiny_checkpoint, caplog):
    base = ["--task", "coco", "--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / "o"), *FAST]
    try:
        import detectron2  # noqa: F401
    except ImportError:
        assert_one_line_error(main, [*base, "--data", str(coco_root), "--engine", "detectron2"], caplog,
                              "detectron2 is not installed and is not on PyPI")
    assert_one_line_error(main, [*base, "--data", str(coco_root), "--proposals", "1,2"], caplog,
                          "--proposals '1,2' must be four integers")
    assert_one_line_error(main, [*base, "--data", str(coco_root), "--arch", "caformer_s18", "--checkpoint", ""],
                          caplog, "caformer_s18: the torchvision detection engine takes ViTs and ResNets")
    ann = coco_root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    kept = data["categories"]
    data["categories"] = kept[1:]  # annotations of the first category now name an unlisted id
    ann.write_text(json.dumps(data))
    assert_one_line_error(main, [*base, "--data", str(coco_root)], caplog,
                          f"annotations use category ids [{kept[0]['id']}] that 'categories' does not list")
    assert not (tmp_path / "o").exists()  # checked before training: nothing written
    data["categories"] = [*kept, {"id": 9, "name": "unicorn"}]
    ann.write_text(json.dumps(data))
    assert_one_line_error(main, [*base, "--data", str(coco_root)], caplog, "categories without instances: unicorn")
    (coco_root / "train2017" / "000001.jpg").unlink()
    assert_one_line_error(main, [*base, "--data", str(coco_root)], caplog,
                          "1 image files missing from " + str(coco_root / "train2017") + ", e.g. 000001.jpg")
    ann.write_text(json.dumps({"images": []}))
    assert_one_line_error(main, [*base, "--data", str(coco_root)], caplog,
                          "is not a COCO instances file (no annotations, categories)")
    ann.write_text("{not json")
    assert_one_line_error(main, [*base, "--data", str(coco_root)], caplog, "is not JSON")
    ann.unlink()
    assert_one_line_error(main, [*base, "--data", str(coco_root)], caplog, "instances_train2017.json does not exist")


def _torchrun(argv, timeout=300):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "eval" / "run.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_coco_under_torchrun_trains_with_ddp_and_shards_evaluation(coco_root, tmp_path, tiny_checkpoint):
    out = tmp_path / "ddp"
    done = _torchrun(["--task", "coco", "--data", str(coco_root), "--checkpoint", str(tiny_checkpoint),
                      "--output-dir", str(out), *FAST])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("joined process group") == 2 and done.stdout.count("coco -- ") == 1  # rank 0 talks
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and len(res["metrics"]) == 12
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["iter"] == 4 and state["run_id"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in state["model"])  # the plain model's names, as one process


def test_a_single_process_task_refuses_torchrun_before_joining_a_group(tmp_path, monkeypatch, caplog):
    """A task whose spec says it runs in one process (none of ours today) is refused under torchrun's environment
    with one line, before any process group is joined (no rank waits) and before anything is written."""
    import dataclasses

    import eval.run as front_door
    from eval.tasks import task_spec as real_spec

    monkeypatch.setattr(front_door, "task_spec", lambda name: dataclasses.replace(real_spec(name), distributed=False))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--task", "knn", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--task knn runs in one process; start it without torchrun" in caplog.text
    assert not (tmp_path / "o").exists() and not torch.distributed.is_initialized()
