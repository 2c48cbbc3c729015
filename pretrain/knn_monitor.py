"""Online k-NN accuracy of the backbone during pretraining, on a labelled fraction, sharded over ranks."""
from __future__ import annotations

import torch
from torch.utils.data import Subset

from bam.backbones import Backbone
from transfer.classification.knn import knn_classify
from transfer.features import extract


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
