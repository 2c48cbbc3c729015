"""What the front door hands every task: resolved device, folders, data, and the backbone to evaluate."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bam.backbones import Backbone
from transfer.features import FeatureCache


@dataclass
class TaskContext:
    device: torch.device
    output_dir: Path
    data_root: Path
    is_sample: bool
    load_backbone: Callable[[], Backbone]  # the checkpoint's backbone, or a random-init baseline of --arch
    model_info: dict[str, Any] = field(default_factory=dict)  # filled by load_backbone: checkpoint sha256, arch, ...
    feature_cache: FeatureCache = field(default_factory=lambda: FeatureCache(None))  # off unless --cache-features

    def model_id(self) -> dict[str, Any]:
        """What identifies the evaluated weights (for feature-cache keys); call after ``load_backbone``."""
        keys = ("checkpoint_sha256", "checkpoint_format", "arch", "arch_kwargs", "random_init", "seed")
        return {k: self.model_info.get(k) for k in keys}
