"""DAVIS-2017 on disk: sequences, frames, palette annotations, prediction PNGs and overlays."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from bam.images import MEAN
from transfer.davis.scoring import DavisInputError

logger = logging.getLogger(__name__)
# DINO's and BAM's eval_video_segmentation.py normalise DAVIS frames with 0.228 in the red channel
# (DanielShalam/BAM eval_video_segmentation.py:248 color_normalize, copied from DINO's): the protocol's value.
DAVIS_STD = (0.228, 0.224, 0.225)


@dataclass
class Sequence:
    name: str
    frames: list[Path]  # JPEGs in order
    first_annotation: Path  # the annotation of frames[0]


def sequence_names(root: Path, subset: str = "val", names: list[str] | None = None) -> list[str]:
    """The sequences of ``ImageSets/2017/<subset>.txt``, or ``names`` when given."""
    if names:
        return names
    listing = root / "ImageSets" / "2017" / f"{subset}.txt"
    if not listing.is_file():
        raise DavisInputError(f"{listing} is missing; point --data at a DAVIS-2017 root or pass --sequences a,b")
    found = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not found:
        raise DavisInputError(f"{listing} lists no sequences")
    return found


def load_sequence(root: Path, name: str) -> Sequence:
    """Check that a sequence has frames and a first-frame annotation; fail with one line naming the path."""
    img_dir = root / "JPEGImages" / "480p" / name
    frames = sorted(img_dir.glob("*.jpg"))
    if not frames:
        raise DavisInputError(f"{img_dir}: no frames (*.jpg) for sequence {name}; check --data and --sequences")
    first = root / "Annotations" / "480p" / name / f"{frames[0].stem}.png"
    if not first.is_file():
        raise DavisInputError(f"{first}: the first-frame annotation of {name} is missing; propagation needs it")
    check_frames_match_annotations(root, name)
    return Sequence(name, frames, first)


def check_frames_match_annotations(root: Path, name: str) -> None:
    """Scoring compares every frame with its annotation: a frame without one, or one without a frame, is named."""
    img_dir, ann_dir = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
    frames, annotations = {p.stem for p in img_dir.glob("*.jpg")}, {p.stem for p in ann_dir.glob("*.png")}
    if frames - annotations:
        missing = sorted(frames - annotations)
        raise DavisInputError(f"{ann_dir / (missing[0] + '.png')}: missing ({len(missing)} of the {len(frames)} frames "
                              f"of {name} have no annotation); scoring needs one per frame")
    if annotations - frames:
        missing = sorted(annotations - frames)
        raise DavisInputError(f"{img_dir / (missing[0] + '.jpg')}: missing ({len(missing)} annotations of {name} have "
                              "no frame); check JPEGImages/480p")


def warn_about_id_gaps(path: Path, labels: np.ndarray) -> None:
    """The official scoring counts objects 1..max id; an absent id scores as a perfect (empty == empty) object."""
    ids = {int(i) for i in np.unique(labels)} - {0, 255}
    absent = sorted(set(range(1, max(ids, default=0) + 1)) - ids)
    if absent:
        logger.warning("%s: object ids %s are absent from the first frame (ids %s present); the official protocol "
                       "scores each absent id as a perfect object (J = F = 1), which inflates the mean: renumber the "
                       "objects 1..%d", path, absent, sorted(ids), len(ids))


def read_first_annotation(path: Path) -> tuple[np.ndarray, list[int]]:
    """Labels (as stored: 255 marks void) and palette of a first-frame annotation."""
    with Image.open(path) as im:
        if im.mode != "P":
            raise DavisInputError(f"{path}: annotations must be palette PNGs (index = object id), found mode {im.mode}")
        return np.array(im), im.getpalette()


def frame_size(h: int, w: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """DINO's evaluation size: the short side to ``short_side``, the long side floored to a ``multiple``."""
    if h == w:
        return short_side, short_side
    long_side = int((short_side * max(h, w) / min(h, w)) // multiple * multiple)
    return (short_side, long_side) if h < w else (long_side, short_side)


def read_frame(path: Path, size: tuple[int, int], std: tuple[float, float, float] = DAVIS_STD) -> torch.Tensor:
    """A frame as ``[3, H, W]``, resized (bilinear, OpenCV as DINO), normalised with ImageNet's mean and ``std``."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DavisInputError(f"{path}: cannot read this frame")
    img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(std)[:, None, None]
    return (x - mean) / std


def original_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width


def write_indexed_png(path: Path, labels: np.ndarray, palette: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(palette)
    im.save(path)


def write_overlay(path: Path, frame: Path, truth: Path, prediction: Path, palette: list[int]) -> None:
    """Side by side at half size: ground truth over the frame | prediction over the frame."""
    rgb = np.array(Image.open(frame).convert("RGB"), dtype=np.float32)
    colours = np.array(palette[:768], dtype=np.float32).reshape(256, 3)
    panels = []
    for mask_path in (truth, prediction):
        labels = np.array(Image.open(mask_path))
        blend = rgb.copy()
        fg = labels > 0
        blend[fg] = 0.45 * rgb[fg] + 0.55 * colours[labels[fg]]
        panels.append(blend)
    both = np.concatenate(panels, axis=1).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(both).resize((both.shape[1] // 2, both.shape[0] // 2), Image.BILINEAR).save(path)
