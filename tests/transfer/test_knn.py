import math

import pytest
import torch
import torch.nn.functional as F

from transfer.classification.knn import knn_classify


def _naive(train, train_y, test, k, t, num_classes):
    """DINO's weighted vote, one query at a time, in plain Python."""
    preds = []
    for q in test:
        sims = sorted(((float(q @ x), int(y)) for x, y in zip(train, train_y)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for s, y in sims:
            votes[y] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds


@pytest.mark.parametrize("n_test", [1, 7, 250])
def test_matches_a_naive_vote_for_any_test_size(n_test):
    g = torch.Generator().manual_seed(n_test)
    train = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    train_y = torch.randint(0, 5, (300,), generator=g)
    test = F.normalize(torch.randn(n_test, 16, generator=g), dim=1)
    test_y = torch.randint(0, 5, (n_test,), generator=g)
    want = _naive(train, train_y, test, 20, 0.07, 5)
    got = knn_classify(train, train_y, test, test_y, k=20, temperature=0.07, num_classes=5, chunk=4)
    assert got["top1"] == pytest.approx(100.0 * sum(p == int(y) for p, y in zip(want, test_y)) / n_test)
    for c in range(5):
        mine = [p == c for p, y in zip(want, test_y) if int(y) == c]
        assert got["per_class_top1"][c] == (pytest.approx(100.0 * sum(mine) / len(mine)) if mine else None)


def test_separable_clusters_give_100_percent():
    centres = F.normalize(torch.eye(4, 8), dim=1)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(25)
    feats = F.normalize(centres[y] + 0.05 * torch.randn(100, 8, generator=g), dim=1)
    res = knn_classify(feats[:60], y[:60], feats[60:], y[60:], k=10)
    assert res == {"top1": 100.0, "top5": 100.0, "per_class_top1": [100.0] * 4}
