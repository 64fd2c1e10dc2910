"""The Hedgehog feature map of LoLCATs: phi(x) = [softmax(x W) || softmax(-x W)], one W per query head.

Shapes: x (B, H, T, D) -> phi (B, H, T, 2F), with W (H, D, F). Two separate softmaxes over F, so each
feature vector sums to 2 (not the single softmax over [2x, -2x] of flash-linear-attention's Hedgehog;
reference/lolcats.md §2.2). No bias, no 1/sqrt(D) inside. Computed in fp32 whatever the input dtype,
because the hybrid attention that consumes it accumulates in fp32.
"""

from __future__ import annotations

import torch
from torch import nn


class HedgehogFeatureMap(nn.Module):
    """Per-head learnable projection W (H, D, F) followed by the two-sided softmax.

    Identity init (the paper's `--lk_zero_init`): W[h, i, i] = 1 for i < min(D, F), so at init
    phi(x) = [softmax(x[:F]) || softmax(-x[:F])].
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        if feature_dim <= 0:
            raise ValueError(f"feature_dim: must be positive, got {feature_dim}")
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        # fp32 master weights even when the model runs in bf16 (lolcats.md §9.8).
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            n = min(self.head_dim, self.feature_dim)
            idx = torch.arange(n, device=self.weight.device)
            self.weight[:, idx, idx] = 1.0

    @property
    def num_features(self) -> int:
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x: expected (B, {self.num_heads}, T, {self.head_dim}), got {tuple(x.shape)}; "
                "repeat GQA key heads to the query heads before the key feature map"
            )
        proj = torch.einsum("bhtd,hdf->bhtf", x.float(), self.weight.float())
        return torch.cat([torch.softmax(proj, dim=-1), torch.softmax(-proj, dim=-1)], dim=-1).clamp(min=1e-12)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim} (x2 features)"
