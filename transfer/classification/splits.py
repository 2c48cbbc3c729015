"""Which training images a protocol uses: class-balanced subsets and SimCLR-style split files."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


def balanced_subset(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of ``round(fraction * n_c)`` images of every class (at least 1), drawn by a seeded permutation.

    Deterministic for a given (targets, fraction, seed); returned sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    targets_t = torch.as_tensor(list(targets))
    g = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for c in torch.unique(targets_t).tolist():
        members = torch.nonzero(targets_t == c).flatten()
        n = max(1, round(fraction * len(members)))
        keep += members[torch.randperm(len(members), generator=g)[:n]].tolist()
    return sorted(keep)


def holdout_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a class-balanced ``fraction`` held out, every class keeping at least one image."""
    targets = list(targets)
    if fraction == 0:
        return list(range(len(targets))), []
    counts: dict[int, int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    held = set(balanced_subset(targets, fraction, seed))
    for c, n in counts.items():  # a class with one image keeps it for training
        if n == 1:
            held -= {i for i, t in enumerate(targets) if t == c}
    return [i for i in range(len(targets)) if i not in held], sorted(held)


def read_split_file(path: str | os.PathLike, samples: Sequence[tuple[str, int]], class_to_idx: dict[str, int]
                    ) -> list[int]:
    """Indices into an ImageFolder's ``samples`` of the images a SimCLR split file names.

    One file name per line (``n01440764_10026.JPEG``); the class is the part before the first ``_`` (the
    ImageNet synset), the image is ``<train>/<class>/<name>``. Every named image must exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--split-file {path} does not exist")
    by_name = {os.path.basename(p): i for i, (p, _) in enumerate(samples)}
    index, missing, unknown_class = [], [], set()
    for line in path.read_text().splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        cls = name.split("_", 1)[0]
        if cls not in class_to_idx:
            unknown_class.add(cls)
            continue
        i = by_name.get(name)
        if i is None or samples[i][1] != class_to_idx[cls]:
            missing.append(name)
        else:
            index.append(i)
    if unknown_class:
        raise ValueError(f"--split-file {path} names images of classes with no training folder: "
                         f"{', '.join(sorted(unknown_class)[:5])}{' ...' if len(unknown_class) > 5 else ''}")
    if missing:
        raise FileNotFoundError(f"--split-file {path} names {len(missing)} images missing from the training folder, "
                                f"e.g. {', '.join(missing[:3])} (expected <train>/<class>/<name>)")
    if not index:
        raise ValueError(f"--split-file {path} names no images")
    return sorted(set(index))
