"""Benchmark a Mask R-CNN training step (torchvision engine) for ViT-S/16 and ResNet-50.

    python bench/detection_step.py                     # CPU, 2 images of 512x512, the full-size model settings
    python bench/detection_step.py --device cuda --size 1024 --batch 4

Figures per backbone, both measured in this run on the same images: images/s of a full training step (forward,
backward, SGD step), and the model's feature extractor alone (``model.backbone``: the backbone and its feature
pyramid, forward + backward, no optimizer step), as a share of the step; the rest of the step is the detector's
RPN, RoI heads, losses and the optimizer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam import build_backbone  # noqa: E402
from transfer.coco.mask_rcnn import build_mask_rcnn  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device, repeats):
    step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def targets_for(batch, size, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        boxes, masks = [], torch.zeros(6, size, size, dtype=torch.uint8)
        for i in range(6):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            w, h = torch.randint(size // 16, size // 3, (2,), generator=g).tolist()
            boxes.append([x0, y0, x0 + w, y0 + h])
            masks[i, y0:y0 + h, x0:x0 + w] = 1
        out.append({"boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                    "labels": torch.randint(1, 81, (6,), generator=g).to(device), "masks": masks.to(device)})
    return out


def measure(arch, images, targets, device, args) -> tuple[float, float]:
    """(seconds per training step, seconds per backbone + pyramid forward/backward) on the same images."""
    torch.manual_seed(0)
    model = build_mask_rcnn(build_backbone(arch).to(device), 80, min_size=args.size, max_size=args.size)
    model = model.to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    batch = torch.stack(images)

    def step():
        optimizer.zero_grad(set_to_none=True)
        sum(model(images, targets).values()).backward()
        optimizer.step()

    def backbone_only():
        model.zero_grad(set_to_none=True)
        sum(v.float().mean() for v in model.backbone(batch).values()).backward()

    return timed(step, device, args.repeats), timed(backbone_only, device, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    images = [torch.rand(3, args.size, args.size, device=device) for _ in range(args.batch)]
    targets = targets_for(args.batch, args.size, device)
    print(f"Mask R-CNN training step, {args.batch} images of {args.size}x{args.size}, 80 classes, {device}, "
          f"{torch.get_num_threads()} threads")
    for arch in ("vit_small_patch16_224", "resnet50"):
        t_step, t_backbone = measure(arch, images, targets, device, args)
        print(f"{arch:<24s} step {t_step:6.2f} s  {args.batch / t_step:6.2f} images/s | model.backbone fwd+bwd, "
              f"timed alone, {t_backbone:6.2f} s ({t_backbone / t_step:.0%} of the step)")


if __name__ == "__main__":
    main()
