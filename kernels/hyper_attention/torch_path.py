"""HyperAttention in plain PyTorch with near-linear memory: gathers and batched matmuls, no T x T tensor
except inside the exact causal leaves (T x min_seq_len).

Owns the CPU path and the backward of every path: it is differentiable with ordinary autograd, the
log-sum-exp merge included, so dQ and dK get the gradient of the normaliser (the public code detaches
it, reference §4.3). It computes exactly the estimator of naive.py from the same `HyperPlan`.

Shapes: N batch (batch x sub-problems), Hq / Hkv query / key-value heads, G = Hq // Hkv, T tokens,
D head dim, nb LSH blocks, BQ / BK queries / keys per block (at most; blocks differ by one), m samples.
All math is in float32 (float64 for float64 inputs); outputs are in that compute dtype.
"""

from __future__ import annotations

import math

import torch

from .common import HyperPlan, block_starts, lsh_codes, num_lsh_blocks

__all__ = ["exact_attention_lse", "merge_partials", "noncausal_hyper_torch", "hyper_attention_torch"]


def _masked_softmax_stats(logits: torch.Tensor, keep: torch.Tensor | None):
    """(probabilities, lse) over the last dim, with rows that keep nothing giving p = 0, lse = -inf and
    zero (not NaN) gradients."""
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    unnormalised = torch.exp(logits - row_max)
    total = unnormalised.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, torch.log(safe_total) + row_max, torch.full_like(total, float("-inf")))
    return unnormalised / safe_total, lse.squeeze(-1)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Softmax over the union of two disjoint weighted key sets from their partial (out, lse)."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None], lse


def exact_attention_lse(q, k, v, scale: float, causal: bool):
    """Exact softmax attention with its log-normaliser; GQA by grouping query heads, not repeating keys.

    q (N, Hq, Tq, D), k/v (N, Hkv, Tk, D) -> (N, Hq, Tq, Dv), (N, Hq, Tq). causal aligns query t with key t.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, heads_q, t_q, _ = q.shape
    heads_kv, t_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    q_grouped = q.to(compute).reshape(batch, heads_kv, group * t_q, q.shape[-1])
    logits = torch.matmul(q_grouped, k.to(compute).transpose(-1, -2)) * scale  # (N, Hkv, G*Tq, Tk)
    keep = None
    if causal:
        query_pos = torch.arange(group * t_q, device=q.device) % t_q
        keep = torch.arange(t_k, device=q.device)[None, :] <= query_pos[:, None]
    probs, lse = _masked_softmax_stats(logits, keep)
    out = torch.matmul(probs, v.to(compute))
    return out.reshape(batch, heads_q, t_q, v.shape[-1]), lse.reshape(batch, heads_q, t_q)


def _block_table(length: int, num_blocks: int, device):
    """(nb, B_max) sorted positions of each block (clamped where a block is shorter) and their validity."""
    starts = torch.tensor(block_starts(length, num_blocks), device=device)
    max_len = -(-length // num_blocks)
    positions = starts[:-1, None] + torch.arange(max_len, device=device)[None, :]
    valid = positions < starts[1:, None]
    return positions.clamp_max(length - 1), valid


def _gather_rows(x, rows):
    """x (N, H, T, D), rows (N, H, R) -> (N, H, R, D)."""
    return torch.gather(x, 2, rows[..., None].expand(*rows.shape, x.shape[-1]))


def noncausal_hyper_torch(q, k, v, q_codes, k_codes, samples, scale: float, block_size: int):
    """One unmasked HyperAttention sub-problem: exact attention inside sortLSH blocks + sampled columns.

    q (N, Hq, Tq, D), k/v (N, Hkv, Tk, D), codes (N, H, T), samples (N, Hq, m) sorted-key positions or None.
    Returns (out (N, Hq, Tq, Dv), lse (N, Hq, Tq)).
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, heads_q, t_q, dim = q.shape
    heads_kv, t_k, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    group = heads_q // heads_kv
    num_blocks = num_lsh_blocks(t_k, block_size)
    q_order = torch.argsort(q_codes, dim=-1, stable=True)  # sorted position -> row
    k_order = torch.argsort(k_codes, dim=-1, stable=True)
    q_table, q_valid = _block_table(t_q, num_blocks, q.device)  # (nb, BQ)
    k_table, k_valid = _block_table(t_k, num_blocks, q.device)  # (nb, BK)
    max_q, max_k = q_table.shape[1], k_table.shape[1]

    # Block-diagonal part. Query slots are grouped (N, Hkv, nb, G*BQ) so each kv head's block is read once.
    q_rows = q_order[:, :, q_table.flatten()]  # (N, Hq, nb*BQ)
    k_rows = k_order[:, :, k_table.flatten()]  # (N, Hkv, nb*BK)
    q_sorted = _gather_rows(q.to(compute), q_rows).view(batch, heads_kv, group, num_blocks, max_q, dim)
    k_sorted = _gather_rows(k.to(compute), k_rows).view(batch, heads_kv, num_blocks, max_k, dim)
    v_sorted = _gather_rows(v.to(compute), k_rows).view(batch, heads_kv, num_blocks, max_k, dim_v)
    q_grouped = q_sorted.permute(0, 1, 3, 2, 4, 5).reshape(batch, heads_kv, num_blocks, group * max_q, dim)
    logits = torch.matmul(q_grouped, k_sorted.transpose(-1, -2)) * scale  # (N, Hkv, nb, G*BQ, BK)
    probs, lse_block = _masked_softmax_stats(logits, k_valid[None, None, :, None, :])
    out_block = torch.matmul(probs, v_sorted)  # (N, Hkv, nb, G*BQ, Dv)
    out_block = out_block.view(batch, heads_kv, num_blocks, group, max_q, dim_v).permute(0, 1, 3, 2, 4, 5)
    lse_block = lse_block.view(batch, heads_kv, num_blocks, group, max_q).permute(0, 1, 3, 2, 4)
    out_sorted = out_block.reshape(batch, heads_q, num_blocks, max_q, dim_v)
    lse_sorted = lse_block.reshape(batch, heads_q, num_blocks, max_q)

    # Sampled columns: every query against its head's m samples, weight T_k/m, own-block samples excluded.
    if samples is not None and samples.shape[-1] > 0 and num_blocks > 1:
        num_samples = samples.shape[-1]
        sample_rows = torch.gather(k_order, 2, samples.reshape(batch, heads_kv, group * num_samples))
        k_sampled = _gather_rows(k.to(compute), sample_rows).view(batch, heads_q, 1, num_samples, dim)
        v_sampled = _gather_rows(v.to(compute), sample_rows).view(batch, heads_q, 1, num_samples, dim_v)
        q_blocks = q_sorted.reshape(batch, heads_q, num_blocks, max_q, dim)
        logits = torch.matmul(q_blocks, k_sampled.transpose(-1, -2)) * scale + math.log(t_k / num_samples)
        sample_block = samples * num_blocks // t_k  # (N, Hq, m)
        other_block = sample_block[:, :, None, :] != torch.arange(num_blocks, device=q.device)[:, None]
        probs, lse_sampled = _masked_softmax_stats(logits, other_block[:, :, :, None, :])
        out_sampled = torch.matmul(probs, v_sampled)  # (N, Hq, nb, BQ, Dv)
        out_sorted, lse_sorted = merge_partials(out_sorted, lse_sorted, out_sampled, lse_sampled)

    # Back from block slots to sorted positions (drop the short blocks' unused slots), then to rows.
    slot_valid = q_valid.flatten()
    out_sorted = out_sorted.reshape(batch, heads_q, num_blocks * max_q, dim_v)[:, :, slot_valid]
    lse_sorted = lse_sorted.reshape(batch, heads_q, num_blocks * max_q)[:, :, slot_valid]
    q_rank = torch.argsort(q_order, dim=-1)
    return _gather_rows(out_sorted, q_rank), torch.gather(lse_sorted, 2, q_rank)


def _split_level(x, num_sub: int, half: int, which: int):
    """(B, H, T_pad, ...) -> the `which` half (0 first, 1 second) of every sub-problem: (B*S, H, half, ...)."""
    batch, heads = x.shape[:2]
    tail = x.shape[3:]
    parts = x.reshape(batch, heads, num_sub, 2, half, *tail)[:, :, :, which]
    return parts.transpose(1, 2).reshape(batch * num_sub, heads, half, *tail)


def hyper_attention_torch(q, k, v, plan: HyperPlan, *, causal: bool, scale: float, block_size: int):
    """HyperAttention (B, Hq, T, D) -> (y (B, Hq, T, Dv), lse (B, Hq, T)) in the compute dtype."""
    if not causal:
        if not plan.approximate:
            return exact_attention_lse(q, k, v, scale, causal=False)
        samples = plan.samples[0][:, :, 0] if plan.samples else None
        return noncausal_hyper_torch(q, k, v, lsh_codes(q, plan.projections), lsh_codes(k, plan.projections),
                                     samples, scale, block_size)
    schedule = plan.schedule
    if schedule.num_levels == 0:
        return exact_attention_lse(q, k, v, scale, causal=True)
    batch, heads_q, n, _ = q.shape
    n_pad, leaf, dim_v = schedule.padded_len, schedule.leaf_len, v.shape[-1]
    pad = (0, 0, 0, n_pad - n)
    q, k, v = (torch.nn.functional.pad(x, pad) for x in (q, k, v))
    q_codes, k_codes = lsh_codes(q, plan.projections), lsh_codes(k, plan.projections)

    # Exact causal leaves, all at once.
    num_leaves = n_pad // leaf
    leaf_q, leaf_k, leaf_v = (x.reshape(batch, x.shape[1], num_leaves, leaf, x.shape[-1]).transpose(1, 2)
                              .reshape(batch * num_leaves, x.shape[1], leaf, x.shape[-1]) for x in (q, k, v))
    out, lse = exact_attention_lse(leaf_q, leaf_k, leaf_v, scale, causal=True)
    out = out.reshape(batch, num_leaves, heads_q, leaf, dim_v).transpose(1, 2).reshape(batch, heads_q, n_pad, dim_v)
    lse = lse.reshape(batch, num_leaves, heads_q, leaf).transpose(1, 2).reshape(batch, heads_q, n_pad)

    # Off-diagonal blocks: second-half queries against first-half keys of every sub-problem of a level.
    for level in range(schedule.num_levels):
        num_sub, half = schedule.num_sub(level), schedule.half_len(level)
        samples = None
        if plan.samples:
            samples = plan.samples[level].transpose(1, 2).reshape(batch * num_sub, heads_q, -1)
        part_out, part_lse = noncausal_hyper_torch(
            _split_level(q, num_sub, half, 1), _split_level(k, num_sub, half, 0), _split_level(v, num_sub, half, 0),
            _split_level(q_codes, num_sub, half, 1), _split_level(k_codes, num_sub, half, 0),
            samples, scale, block_size)
        part_out = part_out.reshape(batch, num_sub, heads_q, half, dim_v).transpose(1, 2)
        part_lse = part_lse.reshape(batch, num_sub, heads_q, half).transpose(1, 2)
        out_halves = out.reshape(batch, heads_q, num_sub, 2, half, dim_v)
        lse_halves = lse.reshape(batch, heads_q, num_sub, 2, half)
        lower_out, lower_lse = merge_partials(out_halves[:, :, :, 1], lse_halves[:, :, :, 1], part_out, part_lse)
        out = torch.stack((out_halves[:, :, :, 0], lower_out), dim=3).reshape(batch, heads_q, n_pad, dim_v)
        lse = torch.stack((lse_halves[:, :, :, 0], lower_lse), dim=3).reshape(batch, heads_q, n_pad)
    return out[:, :, :n], lse[:, :, :n]
