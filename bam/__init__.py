"""BAM: Balanced self-Attention Matching (Shalam & Korman, ECCV 2024) — method, backbones, checkpoints."""
from bam.backbones import Backbone, build_backbone
from bam.formats import load_backbone
from bam.loss import BAMLoss

__all__ = ["BAMLoss", "Backbone", "build_backbone", "load_backbone"]
__version__ = "0.1.0"
