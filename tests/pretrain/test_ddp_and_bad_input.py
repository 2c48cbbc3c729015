import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bam import build_backbone
from bam.ema import make_teacher
from bam.loss import BAMLoss
from bam.projector import Projector
from pretrain.engine import Schedules, train_one_epoch
from pretrain.main import main
from pretrain.model import BAMModel, build_optimizer
from pretrain.monitor import Monitor

from ..conftest import assert_flag_error, assert_one_line_error, tiny_args

W, B = 2, 4  # ranks, images per rank


def _model():
    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch16_224", depth=1, embed_dim=16, num_heads=2, patch_size=8, img_size=16)
    return BAMModel(backbone, Projector(16, 32, 16)).double()


def _crops():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(W * B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)] + \
           [torch.randn(W * B, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]


def _step(model, crops, tmp):
    student = model.module if hasattr(model, "module") else model
    teacher = make_teacher(student)
    optimizer = build_optimizer("adamw", student)
    schedules = Schedules(lr=[1e-3], wd=[0.04], momentum=[0.9], reg=[0.05])
    train_one_epoch(model, teacher, BAMLoss(4, top_k=6), [(crops, None, None)], optimizer,
                    torch.amp.GradScaler("cpu", enabled=False), schedules, 0, torch.device("cpu"), None, 3.0,
                    Monitor(Path(tmp), enabled=False), 1, False, "none")
    return student.state_dict(), teacher.state_dict()


def _worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        local = [c[rank * B:(rank + 1) * B] for c in _crops()]
        student, teacher = _step(model, local, tmp)
        torch.save({"student": student, "teacher": teacher}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_step_equals_one_process_step(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=W, join=True)
    student, teacher = _step(_model(), _crops(), tmp_path)
    for rank in range(W):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in student.items():
            assert torch.allclose(got["student"][k], v, atol=1e-6, rtol=0), k
        for k, v in teacher.items():
            assert torch.allclose(got["teacher"][k], v, atol=1e-6, rtol=0), k
    assert not torch.equal(student["projector.mlp.0.weight"], _model().state_dict()["projector.mlp.0.weight"])


def _fails(argv, caplog, match):
    assert_one_line_error(main, argv, caplog, match)


def test_bad_input_fails_with_one_line(tiny_folder, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    for flags, match in [({"temperature": 0.0}, "argument --temperature: 0.0 must be > 0"),
                         ({"reg": -0.05}, "argument --reg: -0.05 must be > 0"),
                         ({"epochs": 0}, "argument --epochs: 0 must be >= 1"),
                         ({"batch_size_per_gpu": 1}, "--batch-size-per-gpu/--batch_size_per_gpu: 1 must be >= 2"),
                         ({"knn_train_fraction": 1.5},
                          "--knn-train-fraction/--knn_train_fraction: 1.5 must be > 0 and <= 1")]:
        assert_flag_error(main, tiny_args(tiny_folder, out, **flags), capsys, match)
    assert not out.exists()
    _fails(tiny_args(tmp_path / "nope", out), caplog, "nope does not exist; expected an ImageFolder tree")
    (tmp_path / "empty").mkdir()
    _fails(tiny_args(tmp_path / "empty", out), caplog, "has no class folders")
    _fails(tiny_args(tiny_folder, out, batch_size_per_gpu=64), caplog, "fewer than one global batch of 64")
    _fails(tiny_args(tiny_folder, out, arch="vit_gigantic"), caplog, "--arch vit_gigantic is unknown; known:")
    (tmp_path / "file").write_text("x")
    _fails(tiny_args(tiny_folder, tmp_path / "file" / "out"), caplog, "cannot write to --output-dir")
    _fails(tiny_args(tiny_folder, tiny_folder / "run"), caplog, "is inside --data")
    assert not (tiny_folder / "run").exists()
    # a positive temperature so small that the attention overflows: the loss check stops the run
    _fails(tiny_args(tiny_folder, out, temperature=1e-45), caplog, "the loss is nan at step 0 (epoch 0, iteration 0)")


def test_an_unreadable_image_is_named(tiny_folder, tmp_path, caplog):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "2" / "broken.png").write_bytes(b"not a png")
    for workers in (0, 1):
        _fails(tiny_args(data, tmp_path / f"out{workers}", num_workers=workers), caplog,
               "broken.png: unreadable image (UnidentifiedImageError")


def test_config_files_set_defaults_and_unknown_keys_fail(tiny_folder, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 7\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        main(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert "unknown keys ['learning_rate']" in err and "lr" in err
    from pretrain.main import parse_args
    cfg.write_text("epochs: 7\nlr: 0.1\n")
    args = parse_args(["--config", str(cfg), "--lr", "0.2"])
    assert (args.epochs, args.lr) == (7, 0.2)  # the file sets defaults, the command line wins
    with pytest.raises(SystemExit):
        main(["--epoch", "3"])
    assert "valid flags" in capsys.readouterr().err


def test_a_rerun_with_another_recipe_is_refused_before_anything_is_written(tiny_folder, tmp_path, caplog):
    import json

    from bam.formats import backbone_checkpoint

    out = tmp_path / "run"
    assert main(tiny_args(tiny_folder, out, epochs=2, stop_after_epochs=1)) == 0
    config, checkpoint = (out / "config.yaml").read_bytes(), (out / "checkpoint.pth").read_bytes()
    assert_one_line_error(main, tiny_args(tiny_folder, out, epochs=2, temperature=0.3, lr=1e-3), caplog,
                          "was trained with another recipe (lr: 0.0003 -> 0.001; temperature: 0.2 -> 0.3)")
    assert (out / "config.yaml").read_bytes() == config and (out / "checkpoint.pth").read_bytes() == checkpoint
    # a save killed mid-way left its temporary file: the next start removes it
    (out / ".checkpoint.pth.abc123.tmp").write_bytes(b"half a checkpoint")
    caplog.clear()
    assert main(tiny_args(tiny_folder, out, epochs=3, temperature=0.3, force_recipe_change="true",
                          stop_after_epochs=1)) == 0
    assert "resuming from" in caplog.text and "--force-recipe-change: resuming" in caplog.text
    assert not list(out.glob(".*.tmp"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["recipe_change"] for r in records if r["kind"] == "recipe_change"] == [{"temperature": [0.2, 0.3]}]
    caplog.clear()
    assert main(tiny_args(tiny_folder, out, epochs=3, temperature=0.3)) == 0  # --epochs may change: it extends
    assert "2 of 3 epochs done" in caplog.text
    # a backbone-only file where the run's checkpoint should be
    torch.save(backbone_checkpoint(build_backbone("vit_small_patch16_224", depth=1, embed_dim=16, num_heads=2,
                                                  patch_size=8, img_size=16)), out / "checkpoint.pth")
    assert_one_line_error(main, tiny_args(tiny_folder, out, epochs=3, temperature=0.3), caplog,
                          "is not a pretraining checkpoint (no model, optimizer, scaler, epoch, config, rng")
