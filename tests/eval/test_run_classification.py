"""``eval/run.py --task linear | finetune | semisup`` (and the feature cache shared with ``--task knn``) on a tiny
labelled ImageFolder, checked against the pieces they are built from."""
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bam.formats import load_backbone
from bam.images import EvalImageFolder
from eval.run import main
from transfer.features import extract

from ..conftest import assert_flag_error, assert_one_line_error
from ..preemption import Preempted, sigusr1_at_call

COMMON = ["--image-size", "32", "--num-workers", "0"]
FP32 = ["--amp", "none"]  # fine-tuning's default is MAE's fp16 autocast, which needs CUDA


def _run(task, data, out, checkpoint, *extra):
    argv = ["--task", task, "--data", str(data), "--output-dir", str(out), "--checkpoint", str(checkpoint), *COMMON,
            *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


LINEAR = ["--n-blocks", "1,2", "--lrs", "0.01,1", "--epochs", "5", "--batch-size", "16", "--holdout-fraction", "0.25",
          "--extract-batch-size", "8"]


def test_linear_task_reports_the_head_selected_on_held_out_images(digit_folders, tmp_path, tiny_checkpoint):
    res = _run("linear", digit_folders, tmp_path / "lin", tiny_checkpoint, *LINEAR)
    heads = res["heads"]
    assert len(heads) == 8 and res["selected_on"] == "holdout"  # 2 lrs x {1, 2} blocks x avgpool off/on
    assert {(h["lr"], h["n_blocks"], h["avgpool"]) for h in heads} == \
        {(lr, n, p) for lr in (0.01, 1.0) for n in (1, 2) for p in (False, True)}
    best_held = max(h["holdout_top1"] for h in heads)
    chosen = next(h for h in heads if h["holdout_top1"] == best_held)
    assert res["selected_head"] == chosen["name"] and res["metrics"]["top1"] == chosen["val_top1"]
    assert res["metrics"]["top1_best_on_val"] == max(h["val_top1"] for h in heads)
    assert res["num_train"] == 27 and res["num_holdout"] == 9 and res["num_val"] == 12
    assert res["config"]["epochs"] == 5 and res["config"]["bn_head"] is False  # resolved values recorded
    head = torch.load(tmp_path / "lin" / "linear_head.pth", weights_only=True)
    assert head["spec"]["n_blocks"] == chosen["n_blocks"] and head["classes"] == ["0", "1", "2"]
    assert head["state_dict"]["linear.weight"].shape == (3, 32 * (chosen["n_blocks"] + chosen["avgpool"]))
    assert len((tmp_path / "lin" / "log.jsonl").read_text().splitlines()) == 5


def test_feature_cache_is_shared_by_knn_and_linear_and_changes_nothing(digit_folders, tmp_path, tiny_checkpoint,
                                                                       caplog):
    cache = ["--cache-features", "--cache-dir", str(tmp_path / "cache")]
    knn = _run("knn", digit_folders, tmp_path / "knn", tiny_checkpoint, "--k", "5", *cache)
    assert "features cached" in caplog.text
    caplog.clear()
    cached = _run("linear", digit_folders, tmp_path / "a", tiny_checkpoint, *LINEAR, *cache)
    assert caplog.text.count("features from the cache") == 2  # train and val: no re-extraction
    fresh = _run("linear", digit_folders, tmp_path / "b", tiny_checkpoint, *LINEAR)
    assert cached["metrics"] == fresh["metrics"] and cached["heads"] == fresh["heads"]
    again = _run("knn", digit_folders, tmp_path / "knn2", tiny_checkpoint, "--k", "5")
    assert knn["metrics"] == again["metrics"]
    caplog.clear()
    (digit_folders / "train" / "0" / sorted((digit_folders / "train" / "0").iterdir())[0].name).unlink()
    _run("knn", digit_folders, tmp_path / "knn3", tiny_checkpoint, "--k", "5", *cache)  # other images: a new key
    assert caplog.text.count("features from the cache") == 1 and "features cached" in caplog.text


def test_knn_faiss_backend_gives_the_same_numbers(digit_folders, tmp_path, tiny_checkpoint):
    pytest.importorskip("faiss", reason="faiss-cpu is in the test extra; install it to run this test")
    a = _run("knn", digit_folders, tmp_path / "t", tiny_checkpoint, "--k", "1,5,20")
    b = _run("knn", digit_folders, tmp_path / "f", tiny_checkpoint, "--k", "1,5,20", "--knn-backend", "faiss")
    assert a["metrics"] == b["metrics"]


def test_finetune_task_trains_and_writes_a_checkpoint(digit_folders, tmp_path, tiny_checkpoint):
    res = _run("finetune", digit_folders, tmp_path / "ft", tiny_checkpoint, "--epochs", "2", "--batch-size", "12",
               "--warmup-epochs", "1", "--preset", "vit_small", *FP32)
    assert set(res["metrics"]) == {"top1", "top5"} and len(res["history"]) == 2
    assert res["config"]["layer_decay"] == 0.75 and res["config"]["mixup"] == 0.8  # preset, then the recipe
    assert res["effective"] == {"batch_size": 12, "accum_iter": 1, "processes": 1, "lr": pytest.approx(5e-4 * 12 / 256),
                                "steps": 6}
    state = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and state["model"]["head.weight"].shape == (3, 32)


def _imagenet_names(root):
    """Rename ``<split>/<c>/<i>.png`` to ``<split>/<c>/<c>_<i>.png``, the naming SimCLR split files rely on."""
    for f in sorted(root.glob("*/*/*.png")):
        f.rename(f.parent / f"{f.parent.name}_{f.name}")


def test_semisup_logreg_equals_scikit_learn_on_the_same_features(digit_folders, tmp_path, tiny_checkpoint):
    _imagenet_names(digit_folders)
    chosen = [sorted((digit_folders / "train" / c).iterdir())[i].name for c in "012" for i in (0, 3, 5)]
    split = tmp_path / "25percent.txt"
    split.write_text("\n".join(chosen) + "\n")
    res = _run("semisup", digit_folders, tmp_path / "ss", tiny_checkpoint, "--fractions", "0.25,0.5", "--split-file",
               f"{split},{split}", "--logreg-c", "0.5")
    part = res["subsets"][0]
    assert part["source"].startswith("split file") and part["num_images"] == 9 and part["C_selected_by"] == "given"
    backbone = load_backbone(tiny_checkpoint).eval()
    train_set = EvalImageFolder(digit_folders / "train", 32)
    x, y = extract(backbone, train_set, torch.device("cpu"), 8, 0)
    vx, vy = extract(backbone, EvalImageFolder(digit_folders / "val", 32), torch.device("cpu"), 8, 0)
    keep = [i for i, (p, _) in enumerate(train_set.samples) if p.rsplit("/", 1)[-1] in set(chosen)]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000, random_state=0))
    model.fit(x[keep].numpy(), y[keep].numpy())
    want = 100.0 * np.mean(model.predict(vx.numpy()) == vy.numpy())
    assert res["metrics"]["top1_25pct"] == pytest.approx(want)

    res = _run("semisup", digit_folders, tmp_path / "ss2", tiny_checkpoint, "--fractions", "0.5")
    part = res["subsets"][0]
    assert part["source"].startswith("class-balanced") and part["num_images"] == 18
    assert part["C_selected_by"] == "3-fold stratified cross-validation" and "top1_50pct" in res["metrics"]


def test_semisup_finetune_protocol(digit_folders, tmp_path, tiny_checkpoint):
    res = _run("semisup", digit_folders, tmp_path / "ssft", tiny_checkpoint, "--protocol", "finetune",
               "--fractions", "0.5", "--epochs", "1", "--batch-size", "6", "--warmup-epochs", "0", *FP32)
    assert res["subsets"][0]["num_images"] == 18 and len(res["subsets"][0]["history"]) == 1
    assert (tmp_path / "ssft" / "50pct" / "checkpoint.pth").is_file()


@pytest.mark.parametrize("task", ["finetune", "semisup"])
def test_fine_tuning_on_two_processes_equals_one_process_accumulating_two_micro_batches(task, digit_folders, tmp_path,
                                                                                       tiny_checkpoint):
    """torchrun, 2 gloo processes x 6 images vs 1 process x 2 micro-batches of 6, the same global batch of 12 and the
    full recipe (RandAugment, Mixup/CutMix, drop path): the same views and draws, so the validation figures are equal
    and the training losses agree to float32 rounding."""
    from .test_run_coco import _torchrun

    extra = ["--epochs", "2", "--batch-size", "12", "--warmup-epochs", "1", *FP32]
    if task == "semisup":
        extra += ["--protocol", "finetune", "--fractions", "0.5"]

    def argv(name):
        return ["--task", task, "--data", str(digit_folders), "--output-dir", str(tmp_path / name), "--checkpoint",
                str(tiny_checkpoint), *COMMON, *extra]

    assert main([*argv("one"), "--accum-iter", "2"]) == 0
    done = _torchrun(argv("two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("joined process group") == 2 and done.stdout.count(f"{task} -- ") == 1
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["metrics"] == one["metrics"]
    histories = [(r["history"] if task == "finetune" else r["subsets"][0]["history"]) for r in (one, two)]
    assert len(histories[0]) == 2
    for a, b in zip(*histories):
        assert (a["val_top1"], a["val_top5"]) == (b["val_top1"], b["val_top5"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    if task == "finetune":
        assert (one["effective"]["processes"], two["effective"]["processes"]) == (1, 2)
        assert two["effective"]["accum_iter"] == 1 and one["effective"]["accum_iter"] == 2


def test_the_official_probe_on_two_processes_equals_one_process(digit_folders, tmp_path, tiny_checkpoint):
    """--preset bam_vitb (augmented views, BatchNorm head, best validation epoch) under torchrun, 2 gloo processes:
    the metrics of one process and its head to float32 rounding."""
    from .test_run_coco import _torchrun

    def argv(name):
        return ["--task", "linear", "--data", str(digit_folders), "--output-dir", str(tmp_path / name), "--checkpoint",
                str(tiny_checkpoint), *COMMON, "--preset", "bam_vitb", "--epochs", "3", "--batch-size", "12",
                "--extract-batch-size", "12"]

    assert main(argv("one")) == 0
    done = _torchrun(argv("two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("joined process group") == 2 and done.stdout.count("linear -- ") == 1
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["metrics"] == one["metrics"] and two["heads"] == one["heads"]
    a, b = (torch.load(tmp_path / n / "linear_head.pth", weights_only=True)["state_dict"] for n in ("one", "two"))
    assert a["bn.num_batches_tracked"] == b["bn.num_batches_tracked"] == 3 * 3
    for k in ("linear.weight", "linear.bias", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("mode", [["--preset", "bam_vitb"], ["--no-augment", "--n-blocks", "1,2"]],
                         ids=["augmented", "cached"])
def test_a_signal_mid_epoch_saves_the_probes_and_the_same_command_resumes_them(mode, digit_folders, tmp_path,
                                                                              tiny_checkpoint, monkeypatch, caplog):
    """SIGUSR1 during the 5th step (epoch 2 of 3 steps each) saves after that step and passes the signal on; the
    same command resumes at step 2 of epoch 2 and ends with the uninterrupted run's heads, log and metrics."""
    def argv(name):
        return ["--task", "linear", "--data", str(digit_folders), "--output-dir", str(tmp_path / name), "--checkpoint",
                str(tiny_checkpoint), *COMMON, "--epochs", "3", "--batch-size", "12", "--extract-batch-size", "12",
                "--lrs", "0.1,1", *mode]

    assert main(argv("whole")) == 0
    with sigusr1_at_call(monkeypatch, torch.optim.SGD, "step", 5), pytest.raises(Preempted):
        main(argv("resumed"))
    loop = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["loop"]
    assert (loop["epoch"], loop["iteration"]) == (1, 2) and not (tmp_path / "resumed" / "results.json").exists()
    caplog.clear()
    assert main(argv("resumed")) == 0
    assert "resuming the linear probes from" in caplog.text and "(epoch 2, step 2)" in caplog.text
    whole, resumed = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("whole", "resumed"))
    assert resumed["metrics"] == whole["metrics"] and resumed["heads"] == whole["heads"]
    assert (tmp_path / "resumed" / "log.jsonl").read_text() == (tmp_path / "whole" / "log.jsonl").read_text()
    a, b = (torch.load(tmp_path / n / "linear_head.pth", weights_only=True)["state_dict"] for n in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_classification_bad_input(digit_folders, tmp_path, tiny_checkpoint, caplog, capsys):
    base = ["--data", str(digit_folders), "--output-dir", str(tmp_path / "o"), *COMMON]
    lin = ["--task", "linear", *base, "--checkpoint", str(tiny_checkpoint)]
    for argv, match in [([*lin, "--lrs", "fast"], "argument --lrs: 'fast' is not a float"),
                        ([*lin, "--lrs", "0.1,0"], "argument --lrs: 0 must be > 0"),
                        ([*lin, "--holdout-fraction", "1"], "argument --holdout-fraction: 1 must be >= 0 and < 1"),
                        ([*lin, "--epochs", "0"], "argument --epochs: 0 must be >= 1"),
                        (["--task", "finetune", *base, "--blr", "-1"], "argument --blr: -1 must be > 0"),
                        (["--task", "semisup", *base, "--fractions", "0.1,1.5"],
                         "argument --fractions: 1.5 must be > 0 and <= 1")]:
        assert_flag_error(main, argv, capsys, match)
    assert not (tmp_path / "o").exists()  # refused before the first byte
    assert_one_line_error(main, [*lin, "--device", "gpu"], caplog, "--device gpu is not a device; use cpu, cuda")
    assert_one_line_error(main, [*lin, "--n-blocks", "1,4"], caplog, "asked for the last 4 blocks but")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert_one_line_error(main, ["--task", "linear", *base, "--checkpoint", str(junk)], caplog, str(junk))
    if not torch.cuda.is_available():
        assert_one_line_error(main, [*lin, "--device", "cuda"], caplog, "--device cuda was asked for but CUDA")
        for task in (["finetune"], ["semisup", "--protocol", "finetune"]):  # MAE's fp16, refused before any data
            assert_one_line_error(main, ["--task", *task, *base, "--checkpoint", str(tiny_checkpoint)], caplog,
                                  "--amp fp16 needs CUDA (a grad scaler); use --amp bf16 or --amp none on cpu")
    split = tmp_path / "s.txt"
    split.write_text("0_999.png\n")
    assert_one_line_error(main, ["--task", "semisup", *base, "--fractions", "0.1", "--split-file", str(split)],
                          caplog, "names 1 images missing from the training folder, e.g. 0_999.png")
    assert_one_line_error(main, ["--task", "semisup", *base, "--fractions", "0.1,0.2", "--split-file", str(split)],
                          caplog, "names 1 files for 2 --fractions")
    for f in (digit_folders / "val").glob("*/*"):
        f.unlink()
    for d in (digit_folders / "val").iterdir():
        d.rmdir()
    assert_one_line_error(main, ["--task", "finetune", *base, *FP32], caplog, "has no class folders")
    assert not (tmp_path / "o" / "results.json").exists()


def test_linear_official_bam_preset_trains_on_augmented_views(digit_folders, tmp_path, tiny_checkpoint):
    res = _run("linear", digit_folders, tmp_path / "bam", tiny_checkpoint, "--preset", "bam_vitb", "--epochs", "2",
               "--batch-size", "8", "--extract-batch-size", "8")
    assert [h["name"] for h in res["heads"]] == ["lr=0.002 blocks=1 +avgpool"]
    assert res["config"]["augment"] is True and res["config"]["bn_head"] is True and res["config"]["epochs"] == 2
    head = torch.load(tmp_path / "bam" / "linear_head.pth", weights_only=True)
    assert set(head["state_dict"]) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
                                       "linear.weight", "linear.bias"}
    # the official rule (eval_linear.py): every training image trains, the best validation epoch is reported
    assert res["num_train"] == 36 and res["num_holdout"] == 0 and res["selected_on"] == "best_epoch_on_val"
    assert head["state_dict"]["bn.num_batches_tracked"] == 2 * (36 // 8)  # augmented batches, drop_last
    per_epoch = res["heads"][0]["val_top1_per_epoch"]
    log = [json.loads(line) for line in (tmp_path / "bam" / "log.jsonl").read_text().splitlines()]
    assert len(per_epoch) == 2 and [r["val_top1"] for r in log] == [[v] for v in per_epoch]
    m = res["metrics"]
    assert "top1" not in m and m["top1_best_epoch_on_val"] == max(per_epoch) == per_epoch[m["best_epoch"] - 1]
    assert m["top1_last_epoch"] == per_epoch[-1]


def test_the_feature_cache_keys_images_by_content_not_by_name_and_size(digit_folders, tmp_path, tiny_checkpoint,
                                                                       caplog):
    """Two data sets with the same file names, labels and byte sizes (BMP: size depends on the shape only) but other
    pixels: the second must not be served the first one's features."""
    from PIL import Image

    def as_bmp(src, dst, shift):
        for split in ("train", "val"):
            files = sorted((src / split).glob("*/*.png"))
            for i, f in enumerate(files):
                out = dst / split / f.parent.name / f"{f.stem}.bmp"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.open(files[(i + shift) % len(files)]).convert("RGB").save(out)
    a, b = tmp_path / "a", tmp_path / "b"
    as_bmp(digit_folders, a, 0)
    as_bmp(digit_folders, b, 7)  # other images under the same names
    assert sorted(p.stat().st_size for p in a.rglob("*.bmp")) == sorted(p.stat().st_size for p in b.rglob("*.bmp"))
    cache = ["--cache-features", "--cache-dir", str(tmp_path / "cache")]
    _run("knn", a, tmp_path / "ka", tiny_checkpoint, "--k", "5", *cache)
    caplog.clear()
    on_b = _run("knn", b, tmp_path / "kb", tiny_checkpoint, "--k", "5", *cache)
    assert "features from the cache" not in caplog.text and caplog.text.count("features cached") == 2
    assert on_b["metrics"] == _run("knn", b, tmp_path / "kb2", tiny_checkpoint, "--k", "5")["metrics"]
    digests = json.loads((tmp_path / "cache" / "features" / "file_digests.json").read_text())
    assert len(digests) == 2 * 48  # every image hashed once, by its bytes


def test_non_finite_features_are_an_error_not_a_score(digit_folders, tmp_path, tiny_vit, caplog):
    from bam.formats import backbone_checkpoint

    with torch.no_grad():
        tiny_vit.model.cls_token.fill_(float("inf"))
    path = tmp_path / "inf.pth"
    torch.save(backbone_checkpoint(tiny_vit), path)
    argv = ["--task", "knn", "--data", str(digit_folders), "--output-dir", str(tmp_path / "o"), "--checkpoint",
            str(path), *COMMON]
    assert_one_line_error(main, argv, caplog, "non-finite values (NaN/inf) in 1 tensor(s): cls_token")
    assert_one_line_error(main, [*argv, "--allow-nonfinite"], caplog, "the backbone gave non-finite features")
    assert not (tmp_path / "o" / "results.json").exists()


def test_an_empty_class_folder_and_a_single_class_are_named(digit_folders, tmp_path, caplog):
    import shutil

    base = ["--data", str(digit_folders), "--output-dir", str(tmp_path / "o"), *COMMON]
    empty = digit_folders / "train" / "2"
    kept = tmp_path / "kept"
    shutil.move(str(empty), kept)
    empty.mkdir()
    assert_one_line_error(main, ["--task", "knn", *base], caplog, f"--data (train/): the class folder {empty} holds "
                                                                  "no images")
    empty.rmdir()
    shutil.move(str(kept), empty)
    for split in ("train", "val"):
        for c in ("1", "2"):
            shutil.rmtree(digit_folders / split / c)
    for task in ("semisup", "linear"):
        assert_one_line_error(main, ["--task", task, *base], caplog, "holds one class ('0'); classification needs at "
                                                                     "least 2 class folders")
    assert not (tmp_path / "o").exists()
