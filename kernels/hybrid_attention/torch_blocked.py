"""The hybrid attention in O(T * w), vectorised over chunks in plain PyTorch: the fast path on CPU and the
fallback on GPUs without the Triton kernels.

Same math as naive.chunked_hybrid_attention (chunk size = window size, so keys two or more chunks back
are always linear), but every chunk is computed at once instead of in a Python loop:
  * the local part: queries of chunk i against the keys of chunks i-1 and i, (B, H, nC, C, 2C), masked
    into window (gamma * exp(s - c_n), c_n the max over the window only) and linear (phi_q . phi_k) terms;
  * the older part: an exclusive prefix sum of per-chunk states sum phi_k v^T (B, H, nC, F, D), shifted
    by two chunks.
Differentiable by autograd. Extra memory: the (nC, C, 2C) local scores and one F x D state per chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .naive import check_hybrid_inputs, window_start


def _chunks(x: torch.Tensor, chunk: int, num_chunks: int) -> torch.Tensor:
    """(B, H, T, X) -> (B, H, nC, C, X), zero-padded at the end."""
    pad = num_chunks * chunk - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(x.shape[0], x.shape[1], num_chunks, chunk, x.shape[-1])


def _with_previous(x: torch.Tensor) -> torch.Tensor:
    """(B, H, nC, C, X) -> (B, H, nC, 2C, X): chunk i-1 (zeros for i = 0) followed by chunk i."""
    previous = F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    return torch.cat([previous, x], dim=3)


def blocked_hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_feat: torch.Tensor,
                             k_feat: torch.Tensor, gamma: torch.Tensor, window_size: int = 64,
                             window_kind: str = "sliding") -> torch.Tensor:
    """Arguments and result as quadratic_hybrid_attention: q (B, Hq, T, D), k and v (B, Hkv, T, D),
    features (B, Hq, T, F), gamma (Hq,) -> (B, Hq, T, D) in q.dtype."""
    batch, num_heads, _, num_tokens, head_dim, _ = check_hybrid_inputs(
        q, k, v, q_feat, k_feat, gamma, window_size, window_kind)
    out_dtype = q.dtype
    if num_tokens == 0:
        return q.new_zeros(q.shape)
    work = torch.promote_types(q.dtype, torch.float32)
    groups = num_heads // k.shape[1]
    q, q_feat, k_feat, gamma = q.to(work), q_feat.to(work), k_feat.to(work), gamma.to(work)
    k, v = k.to(work).repeat_interleave(groups, 1), v.to(work).repeat_interleave(groups, 1)
    chunk = window_size
    num_chunks = math.ceil(num_tokens / chunk)

    qc, qfc = _chunks(q, chunk, num_chunks), _chunks(q_feat, chunk, num_chunks)
    kc, vc, kfc = _chunks(k, chunk, num_chunks), _chunks(v, chunk, num_chunks), _chunks(k_feat, chunk, num_chunks)
    k2, v2, kf2 = _with_previous(kc), _with_previous(vc), _with_previous(kfc)

    # Absolute positions: query (nC, C, 1), key (nC, 1, 2C); keys before 0 or after the query are masked.
    base = torch.arange(num_chunks, device=q.device).view(-1, 1, 1) * chunk
    query_pos = base + torch.arange(chunk, device=q.device).view(1, -1, 1)
    key_pos = base - chunk + torch.arange(2 * chunk, device=q.device).view(1, 1, -1)
    start = window_start(query_pos, window_size, window_kind)
    window_mask = (key_pos >= start) & (key_pos <= query_pos) & (key_pos >= 0)
    linear_mask = (key_pos < start) & (key_pos >= 0)

    scores = (qc @ k2.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    scores = scores.masked_fill(~window_mask, float("-inf"))
    window_max = scores.amax(dim=-1, keepdim=True)
    weights = gamma.view(1, -1, 1, 1, 1) * torch.exp(scores - window_max)
    weights = weights + (qfc @ kf2.transpose(-1, -2)).masked_fill(~linear_mask, 0.0)

    # Older keys: exclusive prefix over chunks <= i - 2.
    chunk_kv = kfc.transpose(-1, -2) @ vc                     # (B, H, nC, F, D)
    chunk_k = kfc.sum(dim=3)                                  # (B, H, nC, F)
    kv_state = F.pad(chunk_kv.cumsum(dim=2), (0, 0, 0, 0, 2, 0))[:, :, :num_chunks]
    k_state = F.pad(chunk_k.cumsum(dim=2), (0, 0, 2, 0))[:, :, :num_chunks]

    numerator = weights @ v2 + qfc @ kv_state
    denominator = weights.sum(dim=-1, keepdim=True) + (qfc * k_state.unsqueeze(3)).sum(-1, keepdim=True)
    out = (numerator / denominator).reshape(batch, num_heads, num_chunks * chunk, head_dim)[:, :, :num_tokens]
    return out.to(out_dtype)
