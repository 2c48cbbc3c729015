"""Benchmark k-NN classification: a 100k x 384 bank, 10k queries, 1000 classes, k = 20 and 200.

    python bench/knn.py                  # CPU
    python bench/knn.py --device cuda    # the same on a GPU (faiss then searches on the CPU unless faiss-gpu)

Figures (time, queries/s, ratio to the baseline measured in the same run, and whether top-1 agrees):
  - baseline: our rewrite (not the official code) of DINO's ``knn_classifier`` in eval_knn.py of
    facebookresearch/dino, line for line on one process: 100 queries per chunk, votes through a
    ``[chunk * k, classes]`` one-hot matrix, top-1 and top-5 counted;
  - ours, ``transfer.classification.knn.knn_classify``, torch backend (blocked matmul + top-k + scatter_add vote);
  - ours with the faiss backend (exact ``IndexFlatIP``), when faiss is installed.
Features are random unit vectors with class structure (cluster centres + noise), so accuracy is well above chance.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transfer.classification.knn import knn_classify  # noqa: E402


@torch.no_grad()
def dino_knn(train_features, train_labels, test_features, test_labels, k, temperature, num_classes):
    """Our line-for-line rewrite of DINO's eval_knn.knn_classifier (chunks of 100, one-hot votes), one process."""
    top1 = top5 = 0.0
    num_test, chunk = test_features.shape[0], 100
    retrieval_one_hot = torch.zeros(k, num_classes, device=train_features.device)
    for idx in range(0, num_test, chunk):
        features = test_features[idx:min(idx + chunk, num_test)]
        targets = test_labels[idx:min(idx + chunk, num_test)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features.t())
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(temperature).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k)).sum().item()
    return {"top1": 100.0 * top1 / num_test, "top5": 100.0 * top5 / num_test}


def timed(fn, device):
    fn() if device.type == "cuda" else None  # warm-up on GPU only: a CPU run is long enough
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", default="20,200")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(args.classes, args.dim, generator=g), dim=1)
    train_y = torch.randint(0, args.classes, (args.bank,), generator=g)
    test_y = torch.randint(0, args.classes, (args.queries,), generator=g)
    train = F.normalize(centres[train_y] + 0.17 * torch.randn(args.bank, args.dim, generator=g), dim=1)
    test = F.normalize(centres[test_y] + 0.17 * torch.randn(args.queries, args.dim, generator=g), dim=1)
    train, train_y, test, test_y = (t.to(device) for t in (train, train_y, test, test_y))
    print(f"k-NN: bank {args.bank} x {args.dim}, {args.queries} queries, {args.classes} classes, {device}, "
          f"{torch.get_num_threads()} threads")
    try:
        import faiss  # noqa: F401
        backends = ["torch", "faiss"]
    except ImportError:
        backends = ["torch"]
        print("faiss not installed: pip install -e '.[faiss]' for its figure")
    for k in (int(v) for v in args.k.split(",")):
        base_t, base = timed(lambda k=k: dino_knn(train, train_y, test, test_y, k, 0.07, args.classes), device)
        print(f"k={k:<4d} {'rewrite of DINO knn_classifier':<31s} {base_t:7.2f} s  {args.queries / base_t:9.0f} "
              f"queries/s  top-1 {base['top1']:.2f}  top-5 {base['top5']:.2f}  (baseline)")
        for backend in backends:
            def ours(k=k, backend=backend):
                return knn_classify(train, train_y, test, test_y, k=k, temperature=0.07, num_classes=args.classes,
                                    backend=backend)
            t, res = timed(ours, device)
            print(f"k={k:<4d} {'ours, ' + backend:<31s} {t:7.2f} s  {args.queries / t:9.0f} queries/s  "
                  f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  x{base_t / t:.1f} vs baseline")


if __name__ == "__main__":
    main()
