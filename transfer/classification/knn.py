"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol)."""
from __future__ import annotations

import torch

BACKENDS = ("torch", "faiss")


def _faiss_search(train_features: torch.Tensor, test_features: torch.Tensor, k: int, chunk: int):
    """Exact inner-product search with faiss (``IndexFlatIP``; its GPU index when the features are on CUDA)."""
    try:
        import faiss
    except ImportError:
        raise ValueError("--knn-backend faiss needs faiss: pip install -e '.[faiss]' (faiss-cpu), or faiss-gpu") \
            from None
    bank = train_features.float().cpu().contiguous().numpy()
    index = faiss.IndexFlatIP(bank.shape[1])
    if train_features.is_cuda and hasattr(faiss, "index_cpu_to_all_gpus"):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(bank)
    for start in range(0, test_features.shape[0], chunk):
        sim, idx = index.search(test_features[start:start + chunk].float().cpu().contiguous().numpy(), k)
        yield start, torch.from_numpy(sim).to(test_features.device), torch.from_numpy(idx).to(test_features.device)


def _torch_search(train_features: torch.Tensor, test_features: torch.Tensor, k: int, chunk: int):
    for start in range(0, test_features.shape[0], chunk):
        sim, idx = (test_features[start:start + chunk] @ train_features.t()).topk(k, dim=1)
        yield start, sim, idx


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int | None = None, backend: str = "torch") -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of DINO's temperature-weighted k-NN vote.

    Args:
        train_features: ``[N, D]`` L2-normalised features of the labelled bank.
        train_labels: ``[N]`` integer labels.
        test_features: ``[M, D]`` L2-normalised query features (any M >= 1).
        test_labels: ``[M]``.
        k: neighbours per query (clamped to N); each votes ``exp(cosine / temperature)`` for its label.
        num_classes: default ``max label + 1``.
        chunk: queries per block. Default: torch keeps the ``chunk x N`` similarity block near 512 MB (float32),
            between 64 and 4096 queries; faiss takes 4096 (it blocks its own search; small calls are slow).
        backend: ``"torch"`` (exact, blocked matmul + top-k) or ``"faiss"`` (exact ``IndexFlatIP``).
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test feature")
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}; use one of {', '.join(BACKENDS)}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if num_classes is None else num_classes
    k = min(k, train_features.shape[0])
    if chunk is None:
        chunk = 4096 if backend == "faiss" else max(64, min(4096, 2**27 // train_features.shape[0]))
    search = _faiss_search if backend == "faiss" else _torch_search
    top1 = top5 = 0.0
    per_class_hits = torch.zeros(num_classes, dtype=torch.long)
    for start, sim, idx in search(train_features, test_features, k, chunk):
        labels = test_labels[start:start + sim.shape[0]]
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)
        hits = ranked == labels[:, None]
        top1 += hits[:, :1].sum().item()
        top5 += hits[:, :min(5, num_classes)].sum().item()
        per_class_hits += torch.bincount(labels[hits[:, 0]].cpu(), minlength=num_classes)
    n = test_features.shape[0]
    per_class_n = torch.bincount(test_labels.cpu(), minlength=num_classes)
    per_class = [100.0 * h / c if c else None for h, c in zip(per_class_hits.tolist(), per_class_n.tolist())]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "per_class_top1": per_class}
