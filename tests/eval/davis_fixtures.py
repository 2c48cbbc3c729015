"""Small DAVIS-layout folders written on the fly for scoring tests."""
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (256 * 3 - 15)


def write_indexed(path: Path, labels: np.ndarray, palette=PALETTE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(palette)
    im.save(path)


def write_sequence(root: Path, name: str, frames: list[np.ndarray]) -> None:
    for t, lab in enumerate(frames):
        write_indexed(root / name / f"{t:05d}.png", lab)


def moving_ellipses(h, w, n_frames, n_objects, rng, jitter=0):
    """Frames of ``n_objects`` ellipses drifting over the image (object k drawn over object k-1)."""
    yy, xx = np.mgrid[:h, :w]
    starts = rng.uniform([0.2 * h, 0.2 * w], [0.8 * h, 0.8 * w], size=(n_objects, 2))
    vel = rng.uniform(-0.02, 0.02, size=(n_objects, 2)) * [h, w]
    axes = rng.uniform(0.08, 0.2, size=(n_objects, 2)) * [h, w]
    frames = []
    for t in range(n_frames):
        lab = np.zeros((h, w), np.uint8)
        for k in range(n_objects):
            cy, cx = starts[k] + vel[k] * t + (rng.normal(0, jitter, 2) if jitter else 0)
            inside = ((yy - cy) / axes[k, 0]) ** 2 + ((xx - cx) / axes[k, 1]) ** 2 <= 1
            lab[inside] = k + 1
        frames.append(lab)
    return frames
