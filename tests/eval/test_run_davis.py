"""The front door on a tiny DAVIS-layout folder: results.json, official CSVs, --predictions, bad input."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bam.results import sha256
from eval.run import TASKS, main

from ..conftest import assert_flag_error, assert_one_line_error

FAST = ["--short-side", "64", "--long-multiple", "32", "--no-overlays"]


def test_davis_end_to_end_with_a_checkpoint_then_scoring_its_predictions(davis_root, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(["--task", "davis", "--data", str(davis_root), "--checkpoint", str(tiny_checkpoint),
                 "--output-dir", str(out), *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "davis" and res["checkpoint_format"] == "bam" and res["random_init"] is False
    assert res["checkpoint_sha256"] == sha256(tiny_checkpoint)
    assert res["data"] == {"root": str(davis_root.resolve()), "builtin_sample": False}
    assert set(res["metrics"]) == {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}
    assert set(res["per_object"]) == {"alpha_1", "beta_1", "beta_2"}
    assert res["config"]["topk"] == 5 and "torch" in res["versions"] and res["seconds"] > 0
    # predictions: every frame, original size, the dataset's palette; frame 0 is the ground truth
    frames = sorted((out / "beta").glob("*.png"))
    assert len(frames) == 6
    with Image.open(frames[3]) as im:
        assert im.mode == "P" and im.size == (96, 64)
    first_pred = np.array(Image.open(frames[0]))
    assert np.array_equal(first_pred, np.array(Image.open(davis_root / "Annotations/480p/beta/00000.png")))
    # the official CSV carries the same numbers, rounded to 3 decimals
    header, values = (out / "global_results-val.csv").read_text().splitlines()
    assert header == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert values == ",".join(f"{res['metrics'][k]:.3f}" for k in header.split(","))

    # --predictions scores any folder of PNGs without a model: the same numbers
    scored = tmp_path / "scored"
    assert main(["--task", "davis", "--data", str(davis_root), "--predictions", str(out),
                 "--output-dir", str(scored)]) == 0
    again = json.loads((scored / "results.json").read_text())
    assert again["metrics"] == res["metrics"] and again["checkpoint"] is None


def test_random_init_baseline_is_labelled_and_resnets_use_their_last_feature_map(davis_root, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(["--task", "davis", "--data", str(davis_root), "--arch", "resnet18", "--sequences", "alpha",
                 "--output-dir", str(out), *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["random_init"] is True and res["arch"] == "resnet18" and res["sequences"] == ["alpha"]
    assert "RANDOMLY INITIALISED" in caplog.text and "last feature map (stride 32)" in caplog.text


def _fails(argv, caplog, match):
    assert_one_line_error(main, argv, caplog, match)


def test_bad_input_gives_one_line_and_no_results(davis_root, tmp_path, caplog):
    out = tmp_path / "out"
    base = ["--task", "davis", "--data", str(davis_root), "--output-dir", str(out), *FAST]
    out.mkdir()
    earlier = '{"task": "davis", "metrics": {"J&F-Mean": 0.5}}\n'
    (out / "results.json").write_text(earlier)  # a good earlier result: no failed run may touch it
    (davis_root / "Annotations/480p/beta/00000.png").rename(davis_root / "gt0.png")
    _fails(base, caplog, "beta/00000.png: the first-frame annotation of beta is missing")
    (davis_root / "gt0.png").rename(davis_root / "Annotations/480p/beta/00000.png")

    Image.open(davis_root / "Annotations/480p/beta/00000.png").convert("RGB").save(davis_root / "rgb.png")
    (davis_root / "Annotations/480p/beta/00000.png").rename(davis_root / "keep.png")
    (davis_root / "rgb.png").rename(davis_root / "Annotations/480p/beta/00000.png")
    _fails(base, caplog, "annotations must be palette PNGs")
    (davis_root / "keep.png").replace(davis_root / "Annotations/480p/beta/00000.png")

    (davis_root / "ImageSets/2017/val.txt").write_text("alpha\nbeta\ngamma\n")
    _fails(base, caplog, "gamma: no frames (*.jpg) for sequence gamma")
    assert (out / "results.json").read_text() == earlier
    (davis_root / "ImageSets/2017/val.txt").write_text("alpha\nbeta\n")

    _fails([*base, "--predictions", str(tmp_path / "nowhere")], caplog, "is not a folder")
    if not torch.cuda.is_available():
        _fails([*base, "--device", "cuda"], caplog, "--device cuda was asked for but CUDA is not available")
    _fails([*base, "--checkpoint", str(tmp_path / "missing.pth")], caplog, "missing.pth does not exist")
    _fails(["--task", "davis", "--data", str(tmp_path / "nope")], caplog, "is not a folder")
    assert (out / "results.json").read_text() == earlier


def test_unknown_task_and_flag_name_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["--task", "segment-anything"])
    err = capsys.readouterr().err
    assert "invalid choice: 'segment-anything' (choose from " in err
    assert all(f"'{name}'" in err for name in TASKS)
    with pytest.raises(SystemExit):
        main(["--task", "davis", "--top-k", "3"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --top-k 3" in err and "--topk" in err and "--n-last-frames" in err


def test_help_lists_tasks_and_their_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--task davis" in out and "--size-mask-neighborhood" in out and "davis: DAVIS-2017" in out


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_or_refused_run_leaves_the_earlier_outputs_as_they_were(davis_root, tiny_checkpoint, tmp_path,
                                                                         caplog, capsys):
    from bam.results import run_lock

    out = tmp_path / "out"
    argv = ["--task", "davis", "--data", str(davis_root), "--checkpoint", str(tiny_checkpoint), "--output-dir",
            str(out), "--short-side", "64", "--long-multiple", "32"]
    assert main(argv) == 0
    earlier = _files(out)
    assert "results.json" in earlier and "beta/00003.png" in earlier and "overlays/beta.png" in earlier
    # fails half-way: alpha is propagated, then a frame of beta cannot be read
    frame = davis_root / "JPEGImages/480p/beta/00003.jpg"
    good = frame.read_bytes()
    frame.write_text("not a JPEG")
    assert_one_line_error(main, [*argv, "--topk", "3"], caplog, "00003.jpg: cannot read this frame")
    frame.write_bytes(good)
    assert _files(out) == earlier and not (out / ".partial-davis").exists()
    # refused before anything runs: bad numbers, a second run into the same folder, a folder inside the data
    for flags, match in [(["--topk", "0"], "argument --topk: 0 must be >= 1"),
                         (["--temperature", "0"], "argument --temperature: 0 must be > 0"),
                         (["--temperature", "-0.1"], "argument --temperature: -0.1 must be > 0"),
                         (["--n-blocks", "0"], "argument --n-blocks: 0 must be >= 1")]:
        assert_flag_error(main, [*argv, *flags], capsys, match)
    with run_lock(out):
        assert_one_line_error(main, argv, caplog, "is in use by a running job (pid ")
    inside = davis_root / "Annotations" / "480p"
    before = _files(inside)
    assert_one_line_error(main, [*argv[:-6], "--output-dir", str(inside)], caplog, "is inside --data")
    assert _files(inside) == before and _files(out) == earlier


def test_frame_sizes_the_patches_do_not_tile_are_refused_before_any_work(davis_root, tiny_checkpoint, tmp_path,
                                                                          caplog):
    """The fixture's frames are 96 wide and 64 high, the tiny ViT's patch 8. Hand-computed sizes: --short-side 60
    gives height 60 and width 60 x 96 / 64 = 90 floored to a multiple of 32: 64; --short-side 64 with --long-multiple
    30 gives width 96 floored to 90, with 200 to 0. Each is one line naming the flags and sizes that work, before a
    frame is read: no staging folder, the earlier outputs as they were."""
    out = tmp_path / "out"
    argv = ["--task", "davis", "--data", str(davis_root), "--checkpoint", str(tiny_checkpoint), "--output-dir",
            str(out), *FAST]
    assert main(argv) == 0
    earlier = _files(out)
    untiled = "which the patches (8 x 8) of vit_small_patch16_224 do not tile: give multiples of 8"
    for flags, match in [
        (["--short-side", "60"], "--short-side 60 --long-multiple 32 resize the frames of alpha to height 60, "
                                 f"width 64, {untiled} (e.g. --short-side 56 --long-multiple 32)"),
        (["--long-multiple", "30"], "--short-side 64 --long-multiple 30 resize the frames of alpha to height 64, "
                                    f"width 90, {untiled} (e.g. --short-side 64 --long-multiple 32)"),
        (["--long-multiple", "200"], "--long-multiple 200 floors the long side of alpha's frames (96 at --short-side "
                                     "64) to 0: give at most 96")]:
        assert_one_line_error(main, [*argv, *flags], caplog, match)
        assert _files(out) == earlier and not (out / ".partial-davis").exists()
    # a ResNet's last feature map is not tiled by patches: any size runs (its stride floors it, as before)
    assert main([*argv[:4], "--arch", "resnet18", "--sequences", "alpha", "--output-dir", str(tmp_path / "cnn"),
                 *FAST, "--short-side", "60"]) == 0


def test_non_finite_weights_are_refused_or_recorded(davis_root, tiny_vit, tmp_path, caplog):
    from bam.formats import backbone_checkpoint

    with torch.no_grad():
        tiny_vit.model.blocks[1].attn.proj.weight[0, 0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save(backbone_checkpoint(tiny_vit), path)
    argv = ["--task", "davis", "--data", str(davis_root), "--checkpoint", str(path), "--output-dir",
            str(tmp_path / "out"), *FAST]
    assert_one_line_error(main, argv, caplog, "non-finite values (NaN/inf) in 1 tensor(s): blocks.1.attn.proj.weight")
    assert not (tmp_path / "out" / "results.json").exists()
    assert main([*argv, "--allow-nonfinite"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "blocks.1.attn.proj.weight" in res["warnings"][0]


def test_frames_and_annotations_that_do_not_pair_up_are_named(davis_root, tmp_path, caplog):
    argv = ["--task", "davis", "--data", str(davis_root), "--output-dir", str(tmp_path / "o"), *FAST]
    ann = davis_root / "Annotations/480p/beta/00003.png"
    ann.rename(tmp_path / "a.png")
    assert_one_line_error(main, argv, caplog, "beta/00003.png: missing (1 of the 6 frames of beta have no annotation)")
    (tmp_path / "a.png").rename(ann)
    jpg = davis_root / "JPEGImages/480p/beta/00003.jpg"
    jpg.rename(tmp_path / "f.jpg")
    assert_one_line_error(main, argv, caplog, "JPEGImages/480p/beta/00003.jpg: missing (1 annotations of beta have "
                                              "no frame)")
    assert not (tmp_path / "o" / "results.json").exists()


def test_absent_object_ids_are_warned_about(davis_root, tmp_path, caplog):
    path = davis_root / "Annotations/480p/beta/00000.png"
    with Image.open(path) as im:
        labels, palette = np.array(im), im.getpalette()
    labels[labels == 2] = 3  # objects 1 and 3: id 2 is absent and would score J = F = 1
    out = Image.fromarray(labels, mode="P")
    out.putpalette(palette)
    out.save(path)
    assert main(["--task", "davis", "--data", str(davis_root), "--output-dir", str(tmp_path / "o"), "--sequences",
                 "beta", *FAST]) == 0
    assert "object ids [2] are absent from the first frame (ids [1, 3] present)" in caplog.text


def test_davis_under_torchrun_shares_the_sequences_and_equals_one_process(tmp_path, tiny_checkpoint):
    """2 gloo processes each propagate their share of the built-in sample's sequences (balanced by frame count);
    rank 0 writes the overlays, scores and writes the CSVs: every PNG and CSV byte and every metric is one
    process's."""
    from .test_run_coco import _torchrun

    def argv(name):
        return ["--task", "davis", "--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / name),
                "--cache-dir", str(tmp_path / "cache"), "--short-side", "64", "--long-multiple", "32",
                "--sequences", "horse-grass,coins-gravel,cat-coffee"]  # 26, 24, 20 frames: 26 + 44

    assert main(argv("one")) == 0
    done = _torchrun(argv("two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("joined process group") == 2 and done.stdout.count("davis -- ") == 1  # rank 0 talks
    assert "3 sequences (70 frames) over 2 processes, balanced by frame count (26 + 44 frames)" in done.stderr
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["metrics"] == one["metrics"] and two["per_object"] == one["per_object"]
    outputs = {n: {k: v for k, v in _files(tmp_path / n).items() if k != "results.json"} for n in ("one", "two")}
    assert outputs["two"] == outputs["one"]
    assert {"horse-grass/00025.png", "cat-coffee/00019.png", "overlays/coins-gravel.png", "global_results-val.csv",
            "per-sequence_results-val.csv"} <= set(outputs["one"])


def _two_ranks(argv, timeout):
    """Rank 0 and rank 1 of ``eval/run.py`` as srun starts them: independent processes that share a process group's
    environment, none stopped when another exits (torchrun stops them all). [(returncode, stderr)] per rank."""
    from .test_run_coco import REPO

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(REPO / "eval" / "run.py"), *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errors)]
    finally:
        for p in procs:
            p.kill()


def test_a_rank_that_fails_stops_every_rank_and_leaves_the_earlier_outputs(davis_root, tiny_checkpoint, tmp_path):
    """beta, the sequence rank 1 propagates, has an unreadable frame: rank 1 fails, and rank 0 (which propagated
    alpha) stops at once with rank 1's error, not at its next collective (gloo: a lost-peer error; NCCL: a wait for
    the process group's 30-minute timeout); the staging folder is gone and the earlier outputs are untouched."""
    out = tmp_path / "out"
    argv = ["--task", "davis", "--data", str(davis_root), "--checkpoint", str(tiny_checkpoint), "--output-dir",
            str(out), *FAST]
    assert main(argv) == 0
    earlier = _files(out)
    (davis_root / "JPEGImages/480p/beta/00003.jpg").write_text("not a JPEG")
    (code0, err0), (code1, err1) = _two_ranks([*argv, "--topk", "3"], timeout=120)
    assert code1 != 0 and "beta/00003.jpg: cannot read this frame" in err1
    assert code0 != 0 and "rank 1 of 2 failed (DavisInputError: " in err0 and "cannot read this frame" in err0
    assert _files(out) == earlier and not (out / ".partial-davis").exists()
