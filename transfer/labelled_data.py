"""The labelled ImageFolder layout every classification protocol reads: ``<data>/train/<class>/``,
``<data>/val/<class>/``; the built-in photo-crop sample in that layout."""
from __future__ import annotations

from pathlib import Path

from pretrain.data import EvalImageFolder, check_image_folder
from transfer.samples import photos
from transfer.samples.cache import ensure_generated


def photos_sample(cache_dir: Path) -> Path:
    return ensure_generated(cache_dir / photos.sample_dirname(), photos.generate)


def labelled_splits(data_root: Path, image_size: int) -> tuple[EvalImageFolder, EvalImageFolder]:
    """``train/`` and ``val/`` with the evaluation transform; one-line errors for a bad layout."""
    train_root = check_image_folder(data_root / "train", "--data (train/)")
    val_root = check_image_folder(data_root / "val", "--data (val/)")
    train_set, val_set = EvalImageFolder(train_root, image_size), EvalImageFolder(val_root, image_size)
    if train_set.classes != val_set.classes:
        raise ValueError(f"{train_root} and {val_root} hold different class folders; they must match")
    if len(train_set.classes) < 2:
        raise ValueError(f"--data (train/) {train_root} holds one class ({train_set.classes[0]!r}); classification "
                         "needs at least 2 class folders")
    return train_set, val_set
