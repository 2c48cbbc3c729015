"""Pretraining data: ImageFolder images, DINO's multi-crop augmentations (torchvision v2), ContrastiveCrop."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.datasets import ImageFolder

from bam.images import IMG_EXTENSIONS, MEAN, STD, open_rgb
from bam.training import SkipFirst

FULL_BOX = (0.0, 0.0, 1.0, 1.0)  # (h_min, w_min, h_max, w_max), fractions of the image


def contrastive_crop_params(height: int, width: int, box: Sequence[float], scale: Sequence[float],
                            ratio: Sequence[float], beta: torch.distributions.Beta | None
                            ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop whose centre is drawn inside ``box`` (ContrastiveCrop).

    The area and aspect ratio are drawn as RandomResizedCrop draws them; the centre is placed at a Beta(a, a)
    position between the box's corners (uniform when ``beta`` is None), clipped so the crop stays in the image.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item()).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            h0, w0, h1, w1 = box
            top0 = min(max(int(height * h0) - h // 2, 0), height - h)
            top1 = min(max(int(height * h1) - h // 2, 0), height - h)
            left0 = min(max(int(width * w0) - w // 2, 0), width - w)
            left1 = min(max(int(width * w1) - w // 2, 0), width - w)
            u, v = (beta.sample((2,)).tolist() if beta is not None else torch.rand(2).tolist())
            return top0 + int((top1 - top0) * u), left0 + int((left1 - left0) * v), h, w
    side = min(height, width)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


class MultiCropAugmentation:
    """DINO's multi-crop: 2 global crops and ``n_local`` local crops, crop-major in the returned list.

    Crop placement follows ContrastiveCrop when ``ccrop_alpha`` is set (boxes come with each image; the full
    image until boxes are first computed), else a plain random resized crop. Then flip, colour jitter
    (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur p 1.0 / 0.1 / 0.5 (global 1, global 2,
    local), solarize p 0.2 on the second global crop, ImageNet normalisation.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, global_scale=(0.25, 1.0),
                 local_scale=(0.05, 0.25), n_local: int = 6, ccrop_alpha: float | None = None):
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.n_local = n_local
        self.beta = torch.distributions.Beta(ccrop_alpha, ccrop_alpha) if ccrop_alpha else None
        jitter = [T.RandomHorizontalFlip(0.5), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  T.RandomGrayscale(0.2)]

        def blur(p: float) -> T.Transform:
            return T.RandomApply([T.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=p)

        finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)]
        self.global1 = T.Compose([*jitter, blur(1.0), *finish])
        self.global2 = T.Compose([*jitter, blur(0.1), T.RandomSolarize(128, p=0.2), *finish])
        self.local = T.Compose([*jitter, blur(0.5), *finish])

    def _crop(self, image: torch.Tensor, box, scale, size: int) -> torch.Tensor:
        h, w = image.shape[-2:]
        top, left, ch, cw = contrastive_crop_params(h, w, box, scale, (3 / 4, 4 / 3), self.beta) if self.beta \
            else T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
        return TF.resized_crop(image, top, left, ch, cw, [size, size],
                               interpolation=T.InterpolationMode.BICUBIC, antialias=True)

    def __call__(self, image: Image.Image, box=FULL_BOX) -> list[torch.Tensor]:
        x = TF.pil_to_tensor(image)
        crops = [self.global1(self._crop(x, box, self.global_scale, self.global_size)),
                 self.global2(self._crop(x, box, self.global_scale, self.global_size))]
        crops += [self.local(self._crop(x, box, self.local_scale, self.local_size)) for _ in range(self.n_local)]
        return crops


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler (shuffled, this rank's shard, tail dropped) that yields ``(epoch, index)``.

    The epoch travels with every index into the worker, where it seeds that image's augmentations: crops depend
    only on (seed, epoch, index), whatever the number of workers, ranks or restarts.
    """

    def __init__(self, dataset, rank: int, world_size: int, seed: int):
        self.inner = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                         seed=seed, drop_last=True)
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        """Yield ``epoch``'s indices, without the first ``skip_batches`` batches (trained before a save at a
        signal): a resumed epoch sees the images the uninterrupted one would have seen next."""
        self.epoch = epoch
        self.skip = skip_batches * batch_size
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in SkipFirst(self.inner, self.skip))

    def __len__(self) -> int:
        return len(SkipFirst(self.inner, self.skip))


class SeededAugmentedFolder(ImageFolder):
    """Items are ``(crops, label, index)`` for keys ``(epoch, index)``; augmentations seeded per image and epoch.

    ``boxes`` (ContrastiveCrop's, ``[N, 4]``) may be a shared-memory tensor updated while workers run.
    """

    def __init__(self, root: str | Path, transform, seed: int, boxes: torch.Tensor | None = None):
        super().__init__(str(root), loader=open_rgb, is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS))
        self.multi_transform = transform
        self.seed = seed
        self.boxes = boxes

    def __getitem__(self, key):
        epoch, index = key
        path, label = self.samples[index]
        image = self.loader(path)
        box = tuple(self.boxes[index].tolist()) if self.boxes is not None else FULL_BOX
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_000_019 + index) % (2 ** 63))
            return self.multi_transform(image, box), label, index
