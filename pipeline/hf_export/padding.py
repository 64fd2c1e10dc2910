"""The hybrid attention for batches with padding: a key-padding mask and per-row positions.

Same math as naive.py (which this file imports and extends), for rows whose real tokens do not start
at index 0. A padded key contributes nothing (neither to the window softmax nor to the linear state),
and the window of a query is decided by the positions of *real* tokens in its row, so a padded row
computes exactly what the same row computes unpadded (up to float rounding).

* `padded_hybrid_attention`: masked T×T form for any padding pattern (positions = number of real tokens
  before a token in its row);
* `prefill_padded_state` / `padded_hybrid_step`: decoding a LEFT-padded batch with a constant-size state.
  All rows advance together one index per step; row b's real position is index − pads[b], so where the
  window starts differs by row (terrace blocks are aligned to each row's first real token). The shared
  window buffer therefore holds the union of the rows' windows (at most 2w keys); a buffered key that
  is already linear for one row is weighted φqᵀφk for that row, and a key is folded into the fp32 linear
  state once it is linear (or padding) for every row.

Shapes as naive.py: q (B, Hq, T, D), k, v (B, Hkv, T, D), q_feat, k_feat (B, Hq, T, F), gamma (Hq,),
valid (B, T) bool (True = real token), pads (B,) int (left padding of each row).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# naive.py's private helpers are the definition of the weights; padding only changes which keys they see.
from .naive import _hybrid_weights, _repeat_kv, check_hybrid_inputs, check_kv_inputs, check_window, window_start


def padded_hybrid_attention(q, k, v, q_feat, k_feat, gamma, valid: torch.Tensor, window_size: int = 64,
                            window_kind: str = "sliding") -> torch.Tensor:
    """The hybrid attention of rows with padding, materializing (B, Hq, T, T) weights in fp32.

    Args: as naive.quadratic_hybrid_attention, plus valid (B, T) bool, False at padding tokens.
    Returns: (B, Hq, T, D) in q.dtype; the outputs at padding positions are finite but meaningless.
    """
    batch, num_q_heads, _, num_tokens, _, _ = check_hybrid_inputs(q, k, v, q_feat, k_feat, gamma, window_size,
                                                                   window_kind)
    if tuple(valid.shape) != (batch, num_tokens) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape (B, T) = {(batch, num_tokens)}, got "
                         f"{valid.dtype} {tuple(valid.shape)}; pass attention_mask.bool()")
    out_dtype = q.dtype
    q, k, v, q_feat, k_feat, gamma = (t.to(torch.promote_types(t.dtype, torch.float32))
                                      for t in (q, k, v, q_feat, k_feat, gamma))
    k, v = _repeat_kv(k, num_q_heads), _repeat_kv(v, num_q_heads)
    positions = valid.long().cumsum(dim=-1) - 1  # (B, T): the position a token has in its unpadded row
    start = window_start(positions, window_size, window_kind)  # (B, T) first window position of each query
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=q.device).tril()
    key_ok = causal & valid[:, None, :]  # (B, Tq, Tk)
    window_mask = key_ok & (positions[:, None, :] >= start[:, :, None])
    linear_mask = key_ok & (positions[:, None, :] < start[:, :, None])
    # A padding query has no real key of its own: let it see itself so its (unused) output stays finite.
    eye = torch.eye(num_tokens, dtype=torch.bool, device=q.device)
    window_mask = window_mask | (eye & ~valid[:, :, None])
    weights = _hybrid_weights(q, k, q_feat, k_feat, gamma, window_mask[:, None], linear_mask[:, None])
    y = (weights @ v) / weights.sum(dim=-1, keepdim=True)
    return y.to(out_dtype)


def check_left_padding(valid: torch.Tensor) -> torch.Tensor:
    """pads (B,) long for a left-padded valid mask (B, T); ValueError for any other pattern."""
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a (B, T) bool mask, got {valid.dtype} {tuple(valid.shape)}")
    if bool((valid[:, 1:] < valid[:, :-1]).any()):
        raise ValueError("attention_mask: generation with padding needs LEFT padding (zeros only before the first "
                         "real token of each row); set tokenizer.padding_side = 'left'")
    return (~valid).sum(dim=-1)


@dataclass
class PaddedHybridState:
    """Decoding state of a left-padded batch after `num_tokens` indices; its size does not depend on them.

    Attributes:
        kv: (B, Hq, F, D) fp32, Σ φk vᵀ over the keys folded out of the window buffer (padding adds zero).
        k_sum: (B, Hq, F) fp32, Σ φk over the same keys.
        window_k, window_v: (B, Hkv, W', D) keys/values of indices first_index .. num_tokens − 1.
        window_k_feat: (B, Hq, W', F) their features.
        pads: (B,) long, left padding of each row (row b's real position = index − pads[b]).
        pads_cpu: the same on the CPU, to plan evictions without a device synchronization.
        first_index, num_tokens: index of window column 0, and indices seen so far.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    window_k: torch.Tensor
    window_v: torch.Tensor
    window_k_feat: torch.Tensor
    pads: torch.Tensor
    pads_cpu: torch.Tensor
    first_index: int
    num_tokens: int

    def nbytes(self) -> int:
        return sum(value.numel() * value.element_size() for value in (getattr(self, f.name) for f in fields(self))
                   if isinstance(value, torch.Tensor))


def _row_masks(indices: torch.Tensor, pads: torch.Tensor, query_positions: torch.Tensor, window_size: int,
               window_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(window_mask, linear_mask), bool (B, len(indices)): key index i for the query of each row."""
    key_positions = indices[None, :] - pads[:, None]  # (B, W'); negative = padding
    start = window_start(query_positions, window_size, window_kind)[:, None]
    real = key_positions >= 0
    return real & (key_positions >= start), real & (key_positions < start)


def _evict(state: PaddedHybridState, window_size: int, window_kind: str) -> PaddedHybridState:
    """Fold the leading buffer columns that are linear or padding for every row into the fp32 state."""
    next_index = state.num_tokens
    # First index still in some row's window: pads[b] + max(0, window_start(next position of row b)).
    row_start = window_start(next_index - state.pads_cpu, window_size, window_kind).clamp(min=0) + state.pads_cpu
    keep_from = min(int(row_start.min()), next_index)
    num_evicted = max(0, keep_from - state.first_index)
    if num_evicted == 0:
        return state
    num_q_heads = state.kv.shape[1]
    indices = torch.arange(state.first_index, state.first_index + num_evicted, device=state.kv.device)
    real = (indices[None, :] >= state.pads[:, None]).float()  # (B, E): padding folds in as zero
    evicted_feat = state.window_k_feat[:, :, :num_evicted].float() * real[:, None, :, None]
    evicted_v = _repeat_kv(state.window_v[:, :, :num_evicted].float(), num_q_heads)
    return PaddedHybridState(
        kv=state.kv + evicted_feat.transpose(-1, -2) @ evicted_v,
        k_sum=state.k_sum + evicted_feat.sum(dim=-2),
        window_k=state.window_k[:, :, num_evicted:],
        window_v=state.window_v[:, :, num_evicted:],
        window_k_feat=state.window_k_feat[:, :, num_evicted:],
        pads=state.pads, pads_cpu=state.pads_cpu,
        first_index=state.first_index + num_evicted, num_tokens=state.num_tokens,
    )


def prefill_padded_state(k, v, k_feat, pads: torch.Tensor, window_size: int = 64,
                         window_kind: str = "sliding") -> PaddedHybridState:
    """The state after the T (left-padded) tokens of k, v (B, Hkv, T, D) and k_feat (B, Hq, T, F)."""
    check_window(window_size, window_kind)
    batch, num_q_heads, _, num_tokens, head_dim, feature_dim = check_kv_inputs(k, v, k_feat)
    if tuple(pads.shape) != (batch,):
        raise ValueError(f"pads must have shape (B,) = ({batch},), got {tuple(pads.shape)}")
    pads = pads.to(device=k.device, dtype=torch.long)
    state = PaddedHybridState(
        kv=torch.zeros(batch, num_q_heads, feature_dim, head_dim, dtype=torch.float32, device=k.device),
        k_sum=torch.zeros(batch, num_q_heads, feature_dim, dtype=torch.float32, device=k.device),
        window_k=k, window_v=v, window_k_feat=k_feat, pads=pads, pads_cpu=pads.cpu(),
        first_index=0, num_tokens=num_tokens)
    return _evict(state, window_size, window_kind)


def padded_hybrid_step(q, k, v, q_feat, k_feat, gamma, state: PaddedHybridState, window_size: int = 64,
                       window_kind: str = "sliding") -> tuple[torch.Tensor, PaddedHybridState]:
    """One decoding step (index state.num_tokens) of a left-padded batch; returns (y (B, Hq, 1, D), new state)."""
    check_hybrid_inputs(q, k, v, q_feat, k_feat, gamma, window_size, window_kind)
    if q.shape[2] != 1:
        raise ValueError(f"padded_hybrid_step takes one token: q must be (B, Hq, 1, D), got {tuple(q.shape)}")
    num_q_heads = q.shape[1]
    window_k = torch.cat([state.window_k, k.to(state.window_k.dtype)], dim=2)
    window_v = torch.cat([state.window_v, v.to(state.window_v.dtype)], dim=2)
    window_k_feat = torch.cat([state.window_k_feat, k_feat.to(state.window_k_feat.dtype)], dim=2)

    index = state.num_tokens
    indices = torch.arange(state.first_index, index + 1, device=q.device)
    window_mask, linear_mask = _row_masks(indices, state.pads, index - state.pads, window_size, window_kind)
    q32, q_feat32, gamma32 = q.float(), q_feat.float(), gamma.float()
    keys = _repeat_kv(window_k.float(), num_q_heads)
    values = _repeat_kv(window_v.float(), num_q_heads)
    weights = _hybrid_weights(q32, keys, q_feat32, window_k_feat.float(), gamma32,
                              window_mask[:, None, None, :], linear_mask[:, None, None, :])
    numerator = weights @ values + q_feat32 @ state.kv
    denominator = weights.sum(dim=-1, keepdim=True) + q_feat32 @ state.k_sum.unsqueeze(-1)
    y = (numerator / denominator).to(q.dtype)

    grown = PaddedHybridState(state.kv, state.k_sum, window_k, window_v, window_k_feat, state.pads, state.pads_cpu,
                              state.first_index, index + 1)
    return y, _evict(grown, window_size, window_kind)
