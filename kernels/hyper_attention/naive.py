"""Pure-PyTorch ground truth of HyperAttention: the estimator written as one dense weighted softmax.

Every HyperAttention output row is a softmax over all keys with a per-entry weight W_ij >= 0:

    y_i = sum_j W_ij exp(s_ij) v_j / sum_j W_ij exp(s_ij),   lse_i = log sum_j W_ij exp(s_ij)

W_ij = 1 for keys computed exactly (the query's own sortLSH block, the exact causal leaves), W_ij =
c_ij * T_k / m for keys reached only through the m uniform samples (c_ij = how often key j was drawn
for query i's head; samples in the query's own block are excluded, so no key is counted twice), and
W_ij = 0 otherwise (future keys, unsampled keys). This file builds W densely, O(T^2), from the same
`HyperPlan` (hyperplanes and samples) as the fast paths, and is differentiable with plain autograd.
It is for tests and small inputs; the math is in README.md next to this file.

Shapes: B batch, Hq query heads, Hkv key/value heads (GQA as `repeat_kv`), T tokens, D head dim.
"""

from __future__ import annotations

import math

import torch

from .common import HyperPlan, check_hyper_inputs, draw_plan, lsh_codes, num_lsh_blocks

__all__ = ["hyper_weights", "naive_hyper_attention", "noncausal_weights", "weighted_softmax_attention"]


def noncausal_weights(q_codes: torch.Tensor, k_codes: torch.Tensor, samples: torch.Tensor | None,
                      block_size: int) -> torch.Tensor:
    """Weights of one unmasked sub-problem: (B, Hq, T_q), (B, Hkv, T_k), (B, Hq, m) -> (B, Hq, T_q, T_k).

    Codes are the LSH sort keys; samples are positions in the stable-sorted key order.
    """
    heads_q, t_q = q_codes.shape[1:]
    heads_kv, t_k = k_codes.shape[1:]
    group = heads_q // heads_kv
    num_blocks = num_lsh_blocks(t_k, block_size)
    q_rank = torch.argsort(torch.argsort(q_codes, dim=-1, stable=True), dim=-1)  # sorted position of each row
    k_order = torch.argsort(k_codes, dim=-1, stable=True)
    k_rank = torch.argsort(k_order, dim=-1)
    q_block = q_rank * num_blocks // t_q
    k_block = (k_rank * num_blocks // t_k).repeat_interleave(group, dim=1)
    in_block = q_block[..., :, None] == k_block[..., None, :]
    weights = in_block.to(torch.float64)
    if samples is not None and samples.shape[-1] > 0:
        sample_rows = torch.gather(k_order.repeat_interleave(group, dim=1), -1, samples)  # (B, Hq, m)
        counts = torch.zeros(*sample_rows.shape[:2], t_k, dtype=torch.float64, device=samples.device)
        counts.scatter_add_(-1, sample_rows, torch.ones_like(sample_rows, dtype=torch.float64))
        weights = weights + (~in_block) * counts[..., None, :] * (t_k / samples.shape[-1])
    return weights


def hyper_weights(q: torch.Tensor, k: torch.Tensor, plan: HyperPlan, *, causal: bool,
                  block_size: int) -> torch.Tensor:
    """The dense weight matrix W (B, Hq, T_q, T_k), float64, of the HyperAttention estimator."""
    batch, heads_q, t_q, _ = q.shape
    t_k = k.shape[2]
    if not causal:
        if not plan.approximate:
            return torch.ones(batch, heads_q, t_q, t_k, dtype=torch.float64, device=q.device)
        samples = plan.samples[0][:, :, 0] if plan.samples else None
        return noncausal_weights(lsh_codes(q, plan.projections), lsh_codes(k, plan.projections), samples,
                                 block_size)
    schedule = plan.schedule
    n, n_pad = schedule.seq_len, schedule.padded_len
    pad = (0, 0, 0, n_pad - n)
    q_codes = lsh_codes(torch.nn.functional.pad(q, pad), plan.projections)
    k_codes = lsh_codes(torch.nn.functional.pad(k, pad), plan.projections)
    weights = torch.zeros(batch, heads_q, n_pad, n_pad, dtype=torch.float64, device=q.device)
    leaf = schedule.leaf_len
    causal_leaf = torch.ones(leaf, leaf, dtype=torch.float64, device=q.device).tril()
    for start in range(0, n_pad, leaf):
        weights[:, :, start:start + leaf, start:start + leaf] = causal_leaf
    for level in range(schedule.num_levels):
        half = schedule.half_len(level)
        for sub in range(schedule.num_sub(level)):
            lo, mid, hi = 2 * half * sub, 2 * half * sub + half, 2 * half * (sub + 1)
            samples = plan.samples[level][:, :, sub] if plan.samples else None
            weights[:, :, mid:hi, lo:mid] = noncausal_weights(q_codes[:, :, mid:hi], k_codes[:, :, lo:mid],
                                                              samples, block_size)
    return weights[:, :, :n, :n]


def weighted_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y = softmax(q k^T * scale + log W) v and its log-normaliser, in float64 or float32 (>= input)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    k = k.to(compute).repeat_interleave(group, dim=1)
    v = v.to(compute).repeat_interleave(group, dim=1)
    logits = torch.matmul(q.to(compute), k.transpose(-1, -2)) * scale + torch.log(weights).to(compute)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse[..., None]), v)
    return out.to(q.dtype), lse


def naive_hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                          block_size: int = 256, sample_size: int = 256, lsh_num_projs: int = 7,
                          min_seq_len: int = 4096, scale: float | None = None, seed: int | None = None,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense O(T^2) HyperAttention: same arguments and same random plan as `hyper_attention`.

    Returns (y (B, Hq, T_q, Dv) in q.dtype, lse (B, Hq, T_q) in float32 or float64).
    """
    check_hyper_inputs(q, k, v, causal=causal, block_size=block_size, sample_size=sample_size,
                       lsh_num_projs=lsh_num_projs, min_seq_len=min_seq_len, scale=scale, seed=seed,
                       generator=generator, backend="torch")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan = draw_plan(q, k, causal=causal, block_size=block_size, sample_size=sample_size,
                     lsh_num_projs=lsh_num_projs, min_seq_len=min_seq_len, seed=seed, generator=generator)
    weights = hyper_weights(q, k, plan, causal=causal, block_size=block_size)
    return weighted_softmax_attention(q, k, v, weights, scale)
