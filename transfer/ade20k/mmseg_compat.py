"""mmsegmentation 1.2.2 on mmcv-lite: the two compiled ``mmcv.ops`` symbols mmseg imports when it is imported.

mmcv-lite ships ``mmcv/ops/*.py`` without the compiled ``mmcv._ext``, so ``import mmcv.ops`` fails, and mmseg
imports from it at import time. Every ``mmcv.ops`` import in mmseg 1.2.2 (and mmengine 0.10.7) is handled:

- ``point_sample`` (``mmseg/models/utils/point_sample.py``, ``mmseg/utils/mask_classification.py``,
  ``mmseg/models/decode_heads/san_head.py``): PointRend / Mask2Former / SAN only; UperNet never calls it. mmcv's own
  version is pure PyTorch (a ``grid_sample`` wrapper), so the stand-in below is a faithful copy, not a stub.
- ``sigmoid_focal_loss`` (``mmseg/models/losses/focal_loss.py``): mmseg's FocalLoss calls the compiled kernel only
  for CUDA tensors and its own pure-PyTorch ``py_sigmoid_focal_loss`` otherwise; the stand-in raises, naming the fix.
- ``CrissCrossAttention`` (``cc_head.py``), ``PSAMask`` (``psa_head.py``): mmseg guards these with ``except
  ModuleNotFoundError`` (not ``ImportError``) and then refuses to build CCNet / PSANet, so asking the stand-in module
  for them raises ``ModuleNotFoundError``, the condition those guards expect.
- ``DeformConv2d``, ``ModulatedDeformConv2d``, ``SyncBatchNorm`` (mmengine's optimizer constructor and
  ``revert_sync_batchnorm``, mmseg's ``ForceDefaultOptimWrapperConstructor``): imported only when
  ``mmengine.utils.dl_utils.mmcv_full_available()`` finds ``mmcv._ext``, which mmcv-lite lacks: never reached.

``ensure_mmcv_ops()`` must run before the first ``import mmseg``; it changes nothing when a full mmcv (with compiled
ops) is installed.
"""
from __future__ import annotations

import importlib
import logging
import sys
import types

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False, **kwargs) -> torch.Tensor:
    """Bilinear samples of ``input: [N, C, H, W]`` at ``points: [N, P, 2]`` or ``[N, Hg, Wg, 2]`` -> ``[N, C, P]`` or
    ``[N, C, Hg, Wg]``.

    Points are (x, y) in ``[0, 1]``, relative to the feature map's extent (``align_corners=False``: 0 and 1 are the
    outer edges of the corner pixels, so pixel ``j`` has its centre at ``(j + 0.5) / W``); outside the map the
    input is zero-padded. Same contract as ``mmcv.ops.point_sample`` (``grid_sample`` of ``2 * points - 1``).
    """
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return output.squeeze(3) if add_dim else output


def sigmoid_focal_loss(*args, **kwargs) -> torch.Tensor:
    """The compiled CUDA kernel mmcv-lite lacks; mmseg's FocalLoss only reaches it for CUDA tensors."""
    raise NotImplementedError("mmcv.ops.sigmoid_focal_loss is a compiled op that mmcv-lite does not ship: install "
                              "the full mmcv 2.1 built for this torch/CUDA to use FocalLoss on a GPU")


_STAND_INS = {"point_sample": point_sample, "sigmoid_focal_loss": sigmoid_focal_loss}
_GUARDED_ABSENT = ("CrissCrossAttention", "PSAMask")  # mmseg: try: from mmcv.ops import X; except ModuleNotFoundError


def _absent(name: str):
    if name in _GUARDED_ABSENT:
        raise ModuleNotFoundError(f"mmcv-lite has no compiled mmcv.ops.{name}", name="mmcv.ops")
    raise AttributeError(f"module 'mmcv.ops' (mmcv-lite stand-in) has no attribute {name!r}")


def ensure_mmcv_ops() -> str:
    """Make ``from mmcv.ops import point_sample, sigmoid_focal_loss`` work; returns ``"mmcv"`` (the real compiled
    ops import) or ``"compat"`` (mmcv-lite: a module ``mmcv.ops`` holding the stand-ins was put in ``sys.modules``).
    Idempotent."""
    import mmcv

    existing = sys.modules.get("mmcv.ops")
    if existing is not None and getattr(existing, "__bam_compat__", False):
        return "compat"
    try:
        ops = importlib.import_module("mmcv.ops")
    except (ImportError, OSError) as e:  # ModuleNotFoundError: mmcv._ext; OSError: a compiled op built elsewhere
        logger.debug("mmcv.ops does not import (%s): using pure-PyTorch stand-ins", e)
    else:
        missing = [name for name in _STAND_INS if not hasattr(ops, name)]
        for name in missing:
            setattr(ops, name, _STAND_INS[name])
        return "mmcv" if not missing else "compat"
    ops = types.ModuleType("mmcv.ops", "mmcv-lite stand-ins installed by transfer.ade20k.mmseg_compat")
    ops.__bam_compat__ = True
    ops.__getattr__ = _absent
    for name, fn in _STAND_INS.items():
        setattr(ops, name, fn)
    sys.modules["mmcv.ops"] = ops
    mmcv.ops = ops
    return "compat"
