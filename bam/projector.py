"""The projection MLP that maps backbone features to the space where BAM compares views."""
from __future__ import annotations

import torch
import torch.nn as nn

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
_NORMS = {"none": None, "bn": nn.BatchNorm1d, "ln": nn.LayerNorm}


class Projector(nn.Module):
    """``n_layers`` linear layers ``in_dim -> hidden_dim -> ... -> out_dim``; norm + activation between layers.

    The official ViT recipe is 3 layers, 4096 hidden, 4096 out, GELU, no norm. ``last_norm`` adds a
    non-affine BatchNorm after the last layer (as SimCLR/MoCo v3 projectors do for ResNets).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 4096, n_layers: int = 3,
                 norm: str = "none", activation: str = "gelu", last_norm: bool = False):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown projector activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
        if norm not in _NORMS:
            raise ValueError(f"unknown projector norm {norm!r}; known: {sorted(_NORMS)}")
        if n_layers < 1:
            raise ValueError(f"projector needs n_layers >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == n_layers - 1
            layers.append(nn.Linear(d_in, d_out, bias=not (last and last_norm)))
            if not last:
                if _NORMS[norm] is not None:
                    layers.append(_NORMS[norm](d_out))
                layers.append(_ACTIVATIONS[activation]())
        if last_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
