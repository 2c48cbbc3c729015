"""Images every task shares: ImageNet's statistics, the evaluation transform, and labelled ImageFolder trees
(``<root>/<class>/<image>``) read with one-line errors."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torchvision.datasets import ImageFolder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's and timm's defaults
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnreadableImageError(ValueError):
    pass


def open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder error means the same thing to the user
        raise UnreadableImageError(f"{path}: unreadable image ({type(e).__name__}: {e}); remove or replace it") \
            from None


def check_image_folder(root: str | Path, flag: str = "--data") -> Path:
    """Fail with one line unless ``root`` is an ImageFolder tree (class sub-folders holding images)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root} does not exist; expected an ImageFolder tree <root>/<class>/<image>")
    classes = [d for d in root.iterdir() if d.is_dir()]
    if not classes:
        raise ValueError(f"{flag} {root} has no class folders; expected <root>/<class>/<image> (one folder is fine)")
    if not any(f.suffix.lower() in IMG_EXTENSIONS for d in classes for f in d.iterdir()):
        raise ValueError(f"{flag} {root} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    for d in sorted(classes):  # each stops at its first image: cheap on ImageNet too
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in d.rglob("*")):
            raise ValueError(f"{flag}: the class folder {d} holds no images ({', '.join(IMG_EXTENSIONS)}); add its "
                             "images or remove it")
    return root


def eval_transform(size: int) -> T.Compose:
    """Resize the short side to ``size * 8/7`` and centre-crop ``size`` (224 -> 256 -> 224), then normalise."""
    return T.Compose([T.ToImage(), T.Resize(int(round(size * 8 / 7)), interpolation=T.InterpolationMode.BICUBIC,
                                             antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


def labelled_folder(root: str | Path, transform) -> ImageFolder:
    """An ImageFolder of the image files under ``root`` (known extensions only), read with readable errors."""
    return ImageFolder(str(root), transform=transform, loader=open_rgb,
                       is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS))


class EvalImageFolder(ImageFolder):
    """A labelled ImageFolder with the evaluation transform and readable errors."""

    def __init__(self, root: str | Path, size: int):
        super().__init__(str(root), transform=eval_transform(size), loader=open_rgb,
                         is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS))


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
