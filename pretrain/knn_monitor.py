"""Online k-NN accuracy of the backbone during pretraining, on a labelled fraction, sharded over ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from bam.backbones import Backbone
from bam.distributed import all_gather_rows, get_dist_info
from transfer.knn import knn_classify


@torch.no_grad()
def extract(backbone: Backbone, dataset, device: torch.device, batch_size: int, num_workers: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    info = get_dist_info()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    feats, labels = [], []
    for images, target in loader:
        feats.append(F.normalize(backbone(images.to(device)).float(), dim=-1))
        labels.append(target.to(device))
    return all_gather_rows(torch.cat(feats)), all_gather_rows(torch.cat(labels))


def fraction_subset(dataset, fraction: float, seed: int):
    if fraction >= 1.0:
        return dataset
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(dataset), generator=g)[: max(1, int(len(dataset) * fraction))].sort().values
    return Subset(dataset, keep.tolist())


def online_knn(backbone: Backbone, train_set, val_set, device: torch.device, batch_size: int, num_workers: int,
               k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    was_training = backbone.training
    backbone.eval()
    train_feats, train_labels = extract(backbone, train_set, device, batch_size, num_workers)
    val_feats, val_labels = extract(backbone, val_set, device, batch_size, num_workers)
    backbone.train(was_training)
    return knn_classify(train_feats, train_labels, val_feats, val_labels, k=k, temperature=temperature)
