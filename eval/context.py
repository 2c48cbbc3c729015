"""What the front door hands every task: resolved device, folders, data, and the backbone to evaluate."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bam.backbones import Backbone


@dataclass
class TaskContext:
    device: torch.device
    output_dir: Path
    data_root: Path
    is_sample: bool
    load_backbone: Callable[[], Backbone]  # the checkpoint's backbone, or a random-init baseline of --arch
