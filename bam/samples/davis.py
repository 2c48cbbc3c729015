"""A DAVIS-2017-layout sample made from scikit-image's photographs and textures.

Objects with exact masks (the horse silhouette, coins segmented from ``coins``, shapes cut from photographs)
move, turn, scale and occlude one another over real backgrounds, filmed by a slowly panning camera. Frames are
480x854 JPEGs; annotations are palette PNGs (index = object id) with DAVIS's colour map. Deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import data
from skimage.filters import threshold_otsu

H, W = 480, 854
VERSION = 1


def davis_palette() -> list[int]:
    """DAVIS's (PASCAL VOC's) colour map, computed: index bits spread over the high bits of R, G and B."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def tinted(gray: np.ndarray, tint: tuple[float, float, float]) -> np.ndarray:
    return np.clip(gray[..., None].astype(np.float32) * np.array(tint, np.float32), 0, 255).astype(np.uint8)


def _backgrounds() -> dict[str, np.ndarray]:
    """Backgrounds larger than a frame, so the camera can pan."""
    def tile(img: np.ndarray) -> np.ndarray:
        big = np.concatenate([np.concatenate([img, img[:, ::-1]], 1)] * 2, 0)  # mirrored: no seams
        return cv2.resize(big, (W + 160, H + 120), interpolation=cv2.INTER_LINEAR)
    return {
        "grass": tile(tinted(data.grass(), (0.75, 1.05, 0.6))),
        "gravel": tile(tinted(data.gravel(), (1.0, 0.95, 0.85))),
        "brick": tile(tinted(data.brick(), (1.1, 0.8, 0.7))),
        "astronaut": cv2.resize(data.astronaut(), (W + 160, H + 120)),
        "coffee": cv2.resize(data.coffee(), (W + 160, H + 120)),
    }


def object_library() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(RGB texture, bool mask) of each object, cropped to its mask."""
    out = {}
    horse = ~data.horse()
    fur = cv2.resize(data.chelsea(), horse.shape[::-1])
    out["horse"] = (fur, horse)
    out["horse-left"] = (fur[:, ::-1].copy(), horse[:, ::-1].copy())
    coins = data.coins()
    fg = ndi.binary_fill_holes(ndi.binary_opening(coins > threshold_otsu(coins), iterations=2))
    lab, n = ndi.label(fg)
    sizes = ndi.sum(fg, lab, range(1, n + 1))
    singles = [i + 1 for i in np.argsort(-sizes) if 2000 <= sizes[i] <= 3100][:3]
    for k, (i, tint) in enumerate(zip(singles, [(1.2, 1.0, 0.55), (0.9, 0.9, 1.0), (1.15, 0.8, 0.6)])):
        sl = ndi.find_objects((lab == i).astype(np.int32))[0]
        out[f"coin{k}"] = (tinted(coins[sl], tint), (lab[sl] == i))
    yy, xx = np.mgrid[-1:1:160j, -1:1:160j]
    angle = np.arctan2(yy, xx)
    star = np.hypot(yy, xx) <= 0.55 + 0.4 * np.cos(5 * angle) ** 2
    out["star"] = (cv2.resize(data.coffee()[120:340, 180:400], (160, 160)), star)
    ellipse = (yy / 0.95) ** 2 + (xx / 0.7) ** 2 <= 1
    out["rocket"] = (cv2.resize(data.rocket()[40:330, 260:420], (160, 160)), ellipse)
    face = (yy / 0.9) ** 2 + (xx / 0.8) ** 2 <= 1
    out["cat"] = (cv2.resize(data.chelsea()[20:250, 100:330], (160, 160)), face)
    return out


@dataclass
class Track:
    """An object's path: centre, angle (degrees) and scale as functions of normalised time u in [0, 1]."""
    obj: str
    start: tuple[float, float]  # (x, y) in pixels
    end: tuple[float, float]
    scale: tuple[float, float]
    turn: tuple[float, float] = (0.0, 0.0)
    wobble: float = 0.0  # vertical bounce amplitude (pixels)

    def pose(self, u: float) -> tuple[float, float, float, float]:
        x = self.start[0] + (self.end[0] - self.start[0]) * u
        y = self.start[1] + (self.end[1] - self.start[1]) * u + self.wobble * math.sin(4 * math.pi * u)
        angle = self.turn[0] + (self.turn[1] - self.turn[0]) * u
        return x, y, angle, self.scale[0] + (self.scale[1] - self.scale[0]) * u


# name: (background, frames, camera pan (dx, dy) over the sequence, tracks bottom to top)
SEQUENCES = {
    "horse-grass": ("grass", 26, (120, 30), [Track("horse", (180, 300), (640, 260), (0.9, 1.05), (-8, 6), 12)]),
    "coins-gravel": ("gravel", 24, (-80, 60), [
        Track("coin0", (120, 140), (740, 200), (2.4, 2.4), (0, 200)),
        Track("coin1", (740, 380), (120, 320), (2.2, 2.6), (0, -160)),
        Track("coin2", (300, 440), (560, 60), (2.0, 2.3), (0, 90))]),
    "horse-coins-brick": ("brick", 24, (60, -40), [
        Track("horse-left", (650, 280), (230, 300), (0.8, 0.95), (5, -5)),
        Track("coin1", (120, 120), (760, 390), (2.0, 2.0), (0, 240))]),
    "shapes-astronaut": ("astronaut", 22, (100, 80), [
        Track("star", (200, 240), (640, 200), (1.2, 1.6), (0, 140)),
        Track("rocket", (680, 330), (260, 250), (1.3, 1.1), (-20, 25), 25)]),
    "cat-coffee": ("coffee", 20, (-60, -50), [Track("cat", (300, 250), (560, 230), (1.0, 1.7), (-10, 10), 10)]),
}


def _place(texture: np.ndarray, mask: np.ndarray, pose: tuple[float, float, float, float]):
    """Warp an object onto the frame: linear for the texture, nearest for the mask (so the mask is exact)."""
    x, y, angle, scale = pose
    h, w = mask.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (x - w / 2, y - h / 2)
    tex = cv2.warpAffine(texture, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    msk = cv2.warpAffine(mask.astype(np.uint8), m, (W, H), flags=cv2.INTER_NEAREST) > 0
    return tex, msk


def render_sequence(name: str, backgrounds: dict, objects: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    bg_name, n_frames, (pan_x, pan_y), tracks = SEQUENCES[name]
    bg = backgrounds[bg_name]
    frames, labels = [], []
    for t in range(n_frames):
        u = t / (n_frames - 1)
        ox, oy = int(80 + pan_x / 2 * (2 * u - 1)), int(60 + pan_y / 2 * (2 * u - 1))
        frame = bg[oy:oy + H, ox:ox + W].copy()
        label = np.zeros((H, W), np.uint8)
        for obj_id, track in enumerate(tracks, start=1):
            tex, msk = _place(*objects[track.obj], track.pose(u))
            frame[msk] = tex[msk]
            label[msk] = obj_id  # later tracks are drawn on top: they occlude earlier ones
        frames.append(frame)
        labels.append(label)
    return frames, labels


README = """# Built-in DAVIS-layout sample (generated, not DAVIS)

This folder was generated by `bam/samples/davis.py` from images that scikit-image ships (horse silhouette,
coins, grass, gravel, brick, astronaut, coffee, chelsea, rocket). It is NOT the DAVIS-2017 data set: scores on
it show that the pipeline works and let you compare checkpoints on a toy problem, nothing more.

Layout as DAVIS-2017: JPEGImages/480p/<seq>/00000.jpg, Annotations/480p/<seq>/00000.png (palette PNG,
index = object id), ImageSets/2017/val.txt. Sequences: {sequences}.
"""


def generate(root: Path) -> None:
    """Write the sample into ``root`` (deterministic: same pixels every time)."""
    palette = davis_palette()
    backgrounds, objects = _backgrounds(), object_library()
    for name in SEQUENCES:
        frames, labels = render_sequence(name, backgrounds, objects)
        img_dir, ann_dir = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for t, (frame, label) in enumerate(zip(frames, labels)):
            Image.fromarray(frame).save(img_dir / f"{t:05d}.jpg", quality=92)
            png = Image.fromarray(label, mode="P")
            png.putpalette(palette)
            png.save(ann_dir / f"{t:05d}.png")
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("".join(f"{n}\n" for n in SEQUENCES))
    (sets / "train.txt").write_text("".join(f"{n}\n" for n in SEQUENCES))
    (root / "README.md").write_text(README.format(sequences=", ".join(SEQUENCES)))


def sample_dirname() -> str:
    return f"davis-sample-v{VERSION}"
