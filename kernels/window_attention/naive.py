"""Sliding-window softmax attention plus `num_sinks` always-visible first tokens, in pure PyTorch.

The baseline every trained conversion must beat (peers report it rivals many linearized models): query n
attends, with an ordinary softmax, to keys n-w < i <= n and to the first `num_sinks` tokens i < num_sinks.
Shapes: q (B, Hq, T, D); k, v (B, Hkv, T, D) with Hq % Hkv == 0 -> (B, Hq, T, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sliding_window_sink_mask(num_tokens: int, window_size: int, num_sinks: int,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query n may attend key i."""
    if window_size <= 0:
        raise ValueError(f"window_size: must be positive, got {window_size}")
    if num_sinks < 0:
        raise ValueError(f"num_sinks: must be >= 0, got {num_sinks}")
    n = torch.arange(num_tokens, device=device).unsqueeze(1)
    i = torch.arange(num_tokens, device=device).unsqueeze(0)
    return (i <= n) & ((n - i < window_size) | (i < num_sinks))


def sliding_window_sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int = 64,
                                  num_sinks: int = 4, scale: float | None = None) -> torch.Tensor:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v: expected (B, Hq, T, D) and two (B, Hkv, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of the {k.shape[1]} key/value heads")
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = sliding_window_sink_mask(q.shape[2], window_size, num_sinks, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def chunked_sliding_window_sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int = 64,
                                          num_sinks: int = 4, scale: float | None = None) -> torch.Tensor:
    """Same result as sliding_window_sink_attention in O(T * (w + sinks)): each chunk of w queries attends to
    the sinks plus the keys from w-1 before the chunk to its end, with a small mask."""
    num_tokens, w = q.shape[2], window_size
    if num_tokens <= 2 * w + num_sinks:
        return sliding_window_sink_attention(q, k, v, window_size, num_sinks, scale)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs = []
    for start in range(0, num_tokens, w):
        end = min(start + w, num_tokens)
        lo = max(start - w + 1, 0)
        sinks = torch.arange(min(num_sinks, lo), device=q.device)  # sinks not already inside [lo, end)
        keys = torch.cat([sinks, torch.arange(lo, end, device=q.device)])
        n = torch.arange(start, end, device=q.device).unsqueeze(1)
        i = keys.unsqueeze(0)
        mask = (i <= n) & ((n - i < w) | (i < num_sinks))
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, keys], v[:, :, keys],
                                                   attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=2)
