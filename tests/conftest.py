import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from bam import build_backbone
from bam.formats import backbone_checkpoint

# The tiny ViT every test uses: depth 2, width 32, patch 8, 32-pixel images.
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_small_patch16_224", **TINY_VIT).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_vit):
    """The tiny ViT saved in our checkpoint format (``load_backbone`` reads it with no other argument)."""
    path = tmp_path / "tiny.pth"
    torch.save(backbone_checkpoint(tiny_vit), path)
    return path


@pytest.fixture
def one_thread(monkeypatch):
    """torch on one thread, here and in the processes the test starts ($OMP_NUM_THREADS): runs compared bit for bit
    then do not depend on how many CPUs each process was given, and a shared machine is not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _capture_info_logs(caplog):
    caplog.set_level(logging.INFO)


def _working_dir_state(root: Path) -> dict[str, tuple[int, int]]:
    """The working folder's visible entries (files with size and mtime) and every file under its outputs/."""
    state = {}
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        st = entry.stat()
        state[entry.name] = (st.st_size, st.st_mtime_ns) if entry.is_file() else (0, 0)
    if (root / "outputs").is_dir():
        for dirpath, _, files in os.walk(root / "outputs"):
            for name in files:
                st = os.stat(os.path.join(dirpath, name))
                state[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(autouse=True)
def _never_touch_the_working_dir():
    """A test writes only below its temporary folders: a user's outputs/ (the README's first command) must survive
    the test suite run from the same folder."""
    root = Path.cwd()
    before = _working_dir_state(root)
    yield
    after = _working_dir_state(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test wrote into the working folder {root}: {changed[:5]}"


def assert_one_line_error(main, argv, caplog, match):
    """``main(argv)`` exits with 2 after logging exactly one one-line error that contains ``match``."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert match in errors[0], errors[0]


def assert_flag_error(main, argv, capsys, match):
    """argparse refuses ``argv`` before anything runs: exit 2 and an error line that names the flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert match in error, error


def make_digit_folders(root, train_per_class=12, val_per_class=4):
    """A labelled ``train/`` + ``val/`` ImageFolder of scikit-learn digits 0-2 (12 + 4 per class, 32x32 RGB; up to
    178 per class in all)."""
    digits = load_digits()
    n = train_per_class
    for split, sl in (("train", slice(0, n)), ("val", slice(n, n + val_per_class))):
        for label in range(3):
            (root / split / str(label)).mkdir(parents=True)
            for i in np.flatnonzero(digits.target == label)[sl]:
                img = Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((32, 32)).convert("RGB")
                img.save(root / split / str(label) / f"{i}.png")
    return root


@pytest.fixture
def digit_folders(tmp_path):
    return make_digit_folders(tmp_path / "digits")


# The tiny pretraining run every pretraining and launch test uses.
TINY_ARCH = '{"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8, "img_size": 16}'


def tiny_args(data, out, **overrides):
    """Flags for a pretraining run that takes seconds: a 1-block ViT on 16-pixel crops."""
    flags = {"data": data, "output_dir": out, "arch_kwargs": TINY_ARCH, "batch_size_per_gpu": 8, "epochs": 3,
             "warmup_epochs": 1, "global_size": 16, "local_size": 8, "n_local": 2, "proj_hidden_dim": 32,
             "proj_out_dim": 16, "top_k": 8, "num_workers": 0, "tensorboard": "false", "log_freq": 1,
             "knn_train": data, "knn_val": data, **overrides}
    argv = []
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", *(str(v).split() if k in ("global_scale", "local_scale") else [str(v)])]
    return argv


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """32 real digits in 4 class folders, 24 pixels, RGB."""
    root = tmp_path_factory.mktemp("tiny_images")
    digits = load_digits()
    for label in range(4):
        (root / str(label)).mkdir()
        for i in np.flatnonzero(digits.target == label)[:8]:
            img = Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((24, 24)).convert("RGB")
            img.save(root / str(label) / f"{i}.png")
    return root
