"""One video through the protocol: the backbone's patch features of its frames, the first annotation's labels
propagated through them (``propagation``), and the predicted masks written as the official palette PNGs."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bam.backbones import Backbone
from bam.images import STD
from transfer.davis.data import (
    DAVIS_STD,
    Sequence,
    frame_size,
    original_size,
    read_first_annotation,
    read_frame,
    write_indexed_png,
)
from transfer.davis.propagation import pil_nearest_resize, propagate_labels, soft_to_mask


@torch.no_grad()
def extract_features(backbone: Backbone, frames: list[Path], size: tuple[int, int], n_blocks: int, batch: int,
                     device: torch.device, progress: tqdm | None = None,
                     std: tuple[float, float, float] = DAVIS_STD) -> torch.Tensor:
    """``[T, h, w, n_blocks*D]`` patch features of every frame (CLS dropped), on ``device``."""
    out = []
    with ThreadPoolExecutor(2) as pool:  # decode and resize the next frames while the backbone runs
        images = pool.map(lambda p: read_frame(p, size, std), frames)
        for start in range(0, len(frames), batch):
            x = torch.stack([next(images) for _ in frames[start:start + batch]]).to(device)
            layers = backbone.get_intermediate_layers(x, n_blocks)
            h, w = layers[-1]["hw"]
            out.append(torch.cat([layer["patch"] for layer in layers], dim=-1).reshape(len(x), h, w, -1))
            if progress is not None:
                progress.update(len(x))
    return torch.cat(out)


def propagate_sequence(backbone: Backbone, seq: Sequence, out_dir: Path, args,
                       device: torch.device, progress: tqdm | None = None) -> None:
    """Write ``out_dir/<seq>/<frame>.png`` for every frame (frame 0 = its ground truth); ``args`` holds the davis
    task's options (short side, blocks, neighbourhood, top-k, temperature, normalisation)."""
    raw_first, palette = read_first_annotation(seq.first_annotation)
    first = np.where(raw_first == 255, 0, raw_first)  # void is background, as in the scoring
    height, width = original_size(seq.frames[0])
    size = frame_size(height, width, args.short_side, args.long_multiple)
    std = DAVIS_STD if args.normalize == "official" else STD
    feats = extract_features(backbone, seq.frames, size, args.n_blocks, args.frames_per_batch, device, progress,
                             std)
    h, w = feats.shape[1:3]
    small = pil_nearest_resize(torch.from_numpy(first.astype(np.int64)), (h, w))
    one_hot = torch.nn.functional.one_hot(small, int(first.max()) + 1).permute(2, 0, 1).float()
    soft = propagate_labels(feats, one_hot.to(device), args.n_last_frames, args.size_mask_neighborhood, args.topk,
                            args.temperature)
    seq_dir = out_dir / seq.name
    write_indexed_png(seq_dir / f"{seq.frames[0].stem}.png", raw_first, palette)
    for t in range(1, len(seq.frames)):
        mask = soft_to_mask(soft[t], backbone.feature_stride, (height, width))
        write_indexed_png(seq_dir / f"{seq.frames[t].stem}.png", mask.cpu().numpy(), palette)
