"""ADE20K semantic segmentation through mmsegmentation: the evaluated backbone inside mmseg's UperNet
(``models``), the mmcv-lite stand-ins it needs (``mmseg_compat``) and the recipes in ``transfer/configs/ade20k``."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "ade20k"
