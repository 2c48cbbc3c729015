"""``eval/run.py --task knn`` on a tiny train/val ImageFolder, checked against knn_classify on the same features."""
import json

import pytest
import torch

from bam.formats import backbone_checkpoint, load_backbone
from bam.images import EvalImageFolder
from eval.run import main
from transfer.classification.knn import knn_classify
from transfer.features import extract

from ..conftest import assert_flag_error, assert_one_line_error


@pytest.fixture
def folders(digit_folders):
    return digit_folders


def test_knn_task_equals_knn_classify_on_the_same_features(folders, tmp_path, tiny_vit):
    ckpt = tmp_path / "tiny.pth"
    torch.save(backbone_checkpoint(tiny_vit), ckpt)
    out = tmp_path / "out"
    argv = ["--task", "knn", "--data", str(folders), "--checkpoint", str(ckpt), "--output-dir", str(out),
            "--image-size", "32", "--k", "5,20", "--num-workers", "0"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["metrics"]) == {"top1_k5", "top5_k5", "top1_k20", "top5_k20"}
    assert res["num_train"] == 36 and res["num_val"] == 12 and res["checkpoint_format"] == "bam"
    backbone = load_backbone(ckpt).eval()
    tr = extract(backbone, EvalImageFolder(folders / "train", 32), torch.device("cpu"), 8, 0, "train")
    va = extract(backbone, EvalImageFolder(folders / "val", 32), torch.device("cpu"), 8, 0, "val")
    want = knn_classify(*tr, *va, k=5, temperature=0.07, num_classes=3)
    assert res["metrics"]["top1_k5"] == pytest.approx(want["top1"]) and res["metrics"]["top5_k5"] == 100.0


def test_knn_bad_input(folders, tmp_path, caplog, capsys):
    base = ["--task", "knn", "--data", str(folders), "--output-dir", str(tmp_path / "o"), "--image-size", "32",
            "--num-workers", "0"]
    for flags, match in [(["--k", "ten"], "argument --k: 'ten' is not an int"),
                         (["--k", "20,0"], "argument --k: 0 must be >= 1"),
                         (["--knn-temperature", "0"], "argument --knn-temperature: 0 must be > 0"),
                         (["--knn-temperature", "-0.07"], "argument --knn-temperature: -0.07 must be > 0"),
                         (["--knn-temperature", "nan"], "argument --knn-temperature: 'nan' is not a number"),
                         (["--batch-size", "0"], "argument --batch-size: 0 must be >= 1")]:
        assert_flag_error(main, [*base, *flags], capsys, match)
    assert not (tmp_path / "o").exists()  # refused before the first byte
    (folders / "val" / "3").mkdir()
    (folders / "val" / "0" / next(iter(sorted((folders / "val" / "0").iterdir()))).name).rename(
        folders / "val" / "3" / "x.png")
    assert_one_line_error(main, base, caplog, "hold different class folders")
    for d in (folders / "val").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    assert_one_line_error(main, base, caplog, "has no class folders")


def test_knn_under_torchrun_shards_extraction_and_equals_one_process(tmp_path, tiny_checkpoint):
    """2 gloo processes each extract half of the built-in sample's images; the gathered features (cached, in the
    dataset's order) equal one process's to 1e-5 and every metric is the same."""
    from .test_run_coco import _torchrun

    def argv(name):
        return ["--task", "knn", "--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / name),
                "--cache-dir", str(tmp_path / f"cache-{name}"), "--cache-features", "--image-size", "32",
                "--num-workers", "0", "--k", "5,20"]

    assert main(argv("one")) == 0
    done = _torchrun(argv("two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("joined process group") == 2 and done.stdout.count("knn -- ") == 1  # rank 0 talks
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["metrics"] == one["metrics"]
    assert two["per_class_top1"] == one["per_class_top1"]
    cached = {n: sorted((tmp_path / f"cache-{n}" / "features").glob("*.pt")) for n in ("one", "two")}
    assert len(cached["one"]) == 2 and [f.name for f in cached["one"]] == [f.name for f in cached["two"]]  # same keys
    for f, g in zip(cached["one"], cached["two"]):  # train/ and val/
        a, b = torch.load(f, weights_only=True), torch.load(g, weights_only=True)
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["slots"], b["slots"], atol=1e-5), (a["slots"] - b["slots"]).abs().max()


@pytest.mark.parametrize("task,extra", [("linear", ["--n-blocks", "1", "--lrs", "0.1,1", "--epochs", "3",
                                                    "--batch-size", "64", "--extract-batch-size", "64"]),
                                        ("semisup", ["--fractions", "0.1", "--logreg-c", "0.1,1",
                                                     "--extract-batch-size", "64"])])
def test_cached_linear_and_logreg_under_torchrun_equal_one_process(task, extra, tmp_path, tiny_checkpoint):
    """The frozen protocols on 2 gloo processes: each extracts half the images, each then trains the same heads
    (logistic regression) on all of them; rank 0 writes. The metrics are one process's."""
    from .test_run_coco import _torchrun

    def argv(name):
        return ["--task", task, "--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / name),
                "--cache-dir", str(tmp_path / "cache"), "--image-size", "32", "--num-workers", "0", *extra]

    assert main(argv("one")) == 0
    done = _torchrun(argv("two"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["metrics"] == one["metrics"]


def test_a_folder_in_use_stops_every_rank_at_once(tmp_path, tiny_checkpoint):
    """Rank 0 finds --output-dir locked by another run: both ranks stop in one line, none waits for the others."""
    import fcntl

    from .test_run_coco import _torchrun

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".bam.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on elsewhere")
        held.flush()
        done = _torchrun(["--task", "knn", "--checkpoint", str(tiny_checkpoint), "--output-dir", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--image-size", "32", "--num-workers", "0"],
                         timeout=120)
    assert done.returncode != 0
    assert "is in use by a running job (pid 1 on elsewhere)" in done.stderr
    assert "rank 0 of 2 failed (ValueError: --output-dir" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".bam.lock"]
