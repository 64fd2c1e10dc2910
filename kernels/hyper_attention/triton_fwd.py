"""Triton forward of HyperAttention: one fused kernel for every sub-problem, no sorted copies of Q, K, V.

`_hyper_fwd_kernel` runs one online softmax per tile of BLOCK_M queries (in LSH-sorted order) over
  (a) the keys of the tile's sortLSH block(s), read through the sort permutation, masked to the
      query's own block (or, in an exact causal leaf, all keys up to the diagonal), then
  (b) the m sampled key columns with log-weight log(T_k / m), masked where the sample lies in the
      query's own block,
and writes (y, lse) at the query's original row; with ACCUMULATE it LSE-merges into what an earlier
launch wrote there (the leaves first, then one launch per recursion level).

The host side `hyper_attention_triton_fwd` mirrors torch_path.hyper_attention_torch launch by launch.
Forward only: the autograd wrapper in attention.py recomputes the torch path for the backward.
bf16/fp16 inputs feed tl.dot directly on a GPU; under TRITON_INTERPRET=1 (CPU tests) everything is
upcast to fp32 in the kernel, since the interpreter has no bf16 arithmetic.

Shapes: B batch, Hq / Hkv heads, T tokens, D / Dv head dims, S sub-problems of a level, m samples.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .common import HyperPlan, lsh_codes, num_lsh_blocks

__all__ = ["default_tiles", "hyper_attention_triton_fwd"]

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, m_rows, o_d, m_d, stride_t, stride_d, UPCAST: tl.constexpr):
    """Gather rows (BLOCK, BLOCK_D) of one head; masked rows read as zeros."""
    block = tl.load(base + rows[:, None] * stride_t + o_d[None, :] * stride_d, mask=m_rows[:, None] & m_d[None, :],
                    other=0.0)
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def _softmax_step(b_s, b_v, b_m, b_l, b_acc):
    """Online-softmax update with base-2 scores b_s (-inf where masked); rows masked so far stay at zero."""
    m_new = tl.maximum(b_m, tl.max(b_s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(b_m - m_safe)
    b_p = tl.exp2(b_s - m_safe[:, None])
    b_l = b_l * alpha + tl.sum(b_p, 1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return m_new, b_l, b_acc


@triton.jit
def _hyper_fwd_kernel(
    Q, K, V, OUT, LSE, Q_ORDER, K_ORDER, SAMPLE_ROW, SAMPLE_BLOCK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh, stride_lt,
    q_len, k_len,                 # real rows of q and k/v: rows beyond them are padding and read as zeros
    q_row0, k_row0, sub_stride,   # sub-problem s reads query rows q_row0 + s*sub_stride + [0, t_q), keys likewise
    num_sub, heads_q, heads_kv, group,
    t_q, t_k, num_blocks, num_samples,
    qk_scale,                     # softmax scale * log2(e): the kernel works in base 2
    log2_weight,                  # log2(t_k / num_samples)
    head_dim, head_dim_v,
    IS_CAUSAL: tl.constexpr, GATHER: tl.constexpr, HAS_SAMPLES: tl.constexpr, ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)  # ((b * Hq + hq) * S + s)
    sub = pid_z % num_sub
    head_q = (pid_z // num_sub) % heads_q
    batch = (pid_z // (num_sub * heads_q)).to(tl.int64)  # int64 offsets: B*H*T*D can pass 2^31
    head_kv = head_q // group
    kv_z = (batch * heads_kv + head_kv) * num_sub + sub

    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < head_dim
    m_dv = o_dv < head_dim_v
    k_base = K + batch * stride_kb + head_kv * stride_kh
    v_base = V + batch * stride_vb + head_kv * stride_vh
    k_row_base = k_row0 + sub * sub_stride

    # Queries of this tile, as sorted positions, and the rows they live in.
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < t_q
    if GATHER:
        q_local = tl.load(Q_ORDER + pid_z * t_q + o_m, mask=m_m, other=0)
    else:
        q_local = o_m
    q_rows = q_row0 + sub * sub_stride + q_local
    b_q = _load_rows(Q + batch * stride_qb + head_q * stride_qh, q_rows, m_m & (q_rows < q_len), o_d, m_d,
                     stride_qt, stride_qd, UPCAST)
    q_block = o_m * num_blocks // t_q

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    if IS_CAUSAL:
        # Exact causal leaf (one block, no gather). Key tiles wholly before the tile's first query need no
        # score mask (a padded key there can only meet padded queries, whose rows are dropped).
        diagonal = pid_m * BLOCK_M
        for start in range(0, diagonal, BLOCK_N):
            o_n = start + tl.arange(0, BLOCK_N)
            k_rows = k_row_base + o_n
            m_load = k_rows < k_len
            b_k = _load_rows(k_base, k_rows, m_load, o_d, m_d, stride_kt, stride_kd, UPCAST)
            b_v = _load_rows(v_base, k_rows, m_load, o_dv, m_dv, stride_vt, stride_vd, UPCAST)
            b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
            b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc)
        k_hi = tl.minimum(t_k, diagonal + BLOCK_M)
        for start in range(diagonal, k_hi, BLOCK_N):
            o_n = start + tl.arange(0, BLOCK_N)
            m_n = o_n < k_hi
            k_rows = k_row_base + o_n
            m_load = m_n & (k_rows < k_len)
            b_k = _load_rows(k_base, k_rows, m_load, o_d, m_d, stride_kt, stride_kd, UPCAST)
            b_v = _load_rows(v_base, k_rows, m_load, o_dv, m_dv, stride_vt, stride_vd, UPCAST)
            b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
            b_s = tl.where(m_n[None, :] & (o_n[None, :] <= o_m[:, None]), b_s, float("-inf"))
            b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc)
    else:
        # Sorted key range covering the tile's LSH blocks; block j starts at ceil(j * t_k / num_blocks).
        first_block = (pid_m * BLOCK_M) * num_blocks // t_q
        last_block = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, t_q) - 1) * num_blocks // t_q
        k_lo = (first_block * t_k + num_blocks - 1) // num_blocks
        k_hi = ((last_block + 1) * t_k + num_blocks - 1) // num_blocks
        for start in range(k_lo, k_hi, BLOCK_N):
            o_n = start + tl.arange(0, BLOCK_N)
            m_n = o_n < k_hi
            if GATHER:
                k_local = tl.load(K_ORDER + kv_z * t_k + o_n, mask=m_n, other=0)
            else:
                k_local = o_n
            k_rows = k_row_base + k_local
            m_load = m_n & (k_rows < k_len)
            b_k = _load_rows(k_base, k_rows, m_load, o_d, m_d, stride_kt, stride_kd, UPCAST)
            b_v = _load_rows(v_base, k_rows, m_load, o_dv, m_dv, stride_vt, stride_vd, UPCAST)
            b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
            k_block = o_n * num_blocks // t_k
            b_s = tl.where(m_n[None, :] & (k_block[None, :] == q_block[:, None]), b_s, float("-inf"))
            b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc)

    if HAS_SAMPLES:
        for start in range(0, num_samples, BLOCK_N):
            o_s = start + tl.arange(0, BLOCK_N)
            m_s = o_s < num_samples
            s_local = tl.load(SAMPLE_ROW + pid_z * num_samples + o_s, mask=m_s, other=0)
            s_block = tl.load(SAMPLE_BLOCK + pid_z * num_samples + o_s, mask=m_s, other=-1)
            k_rows = k_row_base + s_local
            m_load = m_s & (k_rows < k_len)
            b_k = _load_rows(k_base, k_rows, m_load, o_d, m_d, stride_kt, stride_kd, UPCAST)
            b_v = _load_rows(v_base, k_rows, m_load, o_dv, m_dv, stride_vt, stride_vd, UPCAST)
            b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale + log2_weight
            b_s = tl.where(m_s[None, :] & (s_block[None, :] != q_block[:, None]), b_s, float("-inf"))
            b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc)

    # Every real query keeps at least its own block's keys, so b_l > 0 on rows that are stored.
    b_l_safe = tl.where(b_l > 0, b_l, 1.0)
    b_out = b_acc / b_l_safe[:, None]
    b_lse = (b_m + tl.log2(b_l_safe)) * 0.6931471805599453  # back to natural log
    p_out = OUT + batch * stride_ob + head_q * stride_oh + q_rows[:, None] * stride_ot + o_dv[None, :] * stride_od
    p_lse = LSE + batch * stride_lb + head_q * stride_lh + q_rows * stride_lt
    m_store = m_m[:, None] & m_dv[None, :]
    if ACCUMULATE:
        prev_out = tl.load(p_out, mask=m_store, other=0.0)
        prev_lse = tl.load(p_lse, mask=m_m, other=0.0)
        new_lse = tl.maximum(prev_lse, b_lse) + tl.log(1.0 + tl.exp(-tl.abs(prev_lse - b_lse)))
        b_out = prev_out * tl.exp(prev_lse - new_lse)[:, None] + b_out * tl.exp(b_lse - new_lse)[:, None]
        b_lse = new_lse
    tl.store(p_out, b_out, mask=m_store)
    tl.store(p_lse, b_lse, mask=m_m)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_tiles(head_dim: int) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages: small tiles on the CPU interpreter, FlashAttention-like on a GPU."""
    if _interpreting():
        return dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    # Picked by the benchmark's --tune on an H100 (causal, 32 heads, T = 32k, bf16).
    if head_dim > 64:
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
    return dict(block_m=128, block_n=64, num_warps=4, num_stages=3)


class _Launcher:
    """Holds the tensors and settings shared by the launches of one hyper_attention call."""

    def __init__(self, q, k, v, out, lse, scale, tiles):
        self.q, self.k, self.v, self.out, self.lse = q, k, v, out, lse
        self.scale = scale
        tiles = {**default_tiles(q.shape[-1]), **(tiles or {})}
        self.block_m, self.block_n = tiles["block_m"], tiles["block_n"]
        self.num_warps, self.num_stages = tiles["num_warps"], tiles["num_stages"]
        if self.block_m % self.block_n:
            # The causal leaves skip the mask on whole BLOCK_N tiles before the diagonal at pid_m * BLOCK_M.
            raise ValueError(f"tiles: block_m ({self.block_m}) must be a multiple of block_n ({self.block_n})")
        self.upcast = _interpreting() or q.dtype not in (torch.float16, torch.bfloat16)
        self.block_d = max(16, triton.next_power_of_2(q.shape[-1]))
        self.block_dv = max(16, triton.next_power_of_2(v.shape[-1]))

    def launch(self, *, q_row0, k_row0, sub_stride, num_sub, t_q, t_k, num_blocks, causal, accumulate,
               q_order=None, k_order=None, sample_row=None, sample_block=None):
        q, k, v, out, lse = self.q, self.k, self.v, self.out, self.lse
        batch, heads_q, q_len, head_dim = q.shape
        heads_kv, k_len = k.shape[1], k.shape[2]
        num_samples = 0 if sample_row is None else sample_row.shape[-1]
        dummy = torch.empty(1, dtype=torch.int32, device=q.device)
        grid = (triton.cdiv(t_q, self.block_m), batch * heads_q * num_sub)
        _hyper_fwd_kernel[grid](
            q, k, v, out, lse,
            dummy if q_order is None else q_order, dummy if k_order is None else k_order,
            dummy if sample_row is None else sample_row, dummy if sample_block is None else sample_block,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            q_len, k_len, q_row0, k_row0, sub_stride,
            num_sub, heads_q, heads_kv, heads_q // heads_kv,
            t_q, t_k, num_blocks, num_samples,
            self.scale * LOG2E, math.log2(t_k / num_samples) if num_samples else 0.0,
            head_dim, v.shape[-1],
            IS_CAUSAL=causal, GATHER=q_order is not None, HAS_SAMPLES=num_samples > 0, ACCUMULATE=accumulate,
            UPCAST=self.upcast, BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=self.block_d,
            BLOCK_DV=self.block_dv, num_warps=self.num_warps, num_stages=self.num_stages)

    def launch_noncausal(self, q_codes, k_codes, samples, *, q_row0, k_row0, sub_stride, num_sub, t_q, t_k,
                         block_size, accumulate):
        """Sort one level's sub-problems by LSH code and launch the fused block + sample kernel.

        q_codes (B, Hq, S, t_q), k_codes (B, Hkv, S, t_k), samples (B, Hq, S, m) sorted-key positions or None.
        """
        num_blocks = num_lsh_blocks(t_k, block_size)
        q_order = torch.argsort(q_codes, dim=-1, stable=True)
        k_order = torch.argsort(k_codes, dim=-1, stable=True)
        sample_row = sample_block = None
        if samples is not None and samples.shape[-1] > 0 and num_blocks > 1:
            batch, heads_kv, num_sub_, _ = k_order.shape
            group = q_codes.shape[1] // heads_kv
            expanded = k_order[:, :, None].expand(batch, heads_kv, group, num_sub_, t_k)
            sample_row = torch.gather(expanded, -1, samples.view(batch, heads_kv, group, num_sub_, -1))
            sample_row = sample_row.reshape(samples.shape).to(torch.int32).contiguous()
            sample_block = (samples * num_blocks // t_k).to(torch.int32).contiguous()
        self.launch(q_row0=q_row0, k_row0=k_row0, sub_stride=sub_stride, num_sub=num_sub, t_q=t_q, t_k=t_k,
                    num_blocks=num_blocks, causal=False, accumulate=accumulate,
                    q_order=q_order.to(torch.int32).contiguous(), k_order=k_order.to(torch.int32).contiguous(),
                    sample_row=sample_row, sample_block=sample_block)


def hyper_attention_triton_fwd(q, k, v, plan: HyperPlan, *, causal: bool, scale: float, block_size: int,
                               tiles: dict | None = None):
    """HyperAttention forward: (B, Hq, T, D) -> (y (B, Hq, T, Dv) fp32, lse (B, Hq, T) fp32).

    The same estimator as torch_path.hyper_attention_torch for the same plan. tiles overrides entries of
    default_tiles (block_m, block_n, num_warps, num_stages), e.g. from the benchmark's tuning.
    """
    batch, heads_q, t_q, _ = q.shape
    t_k = k.shape[2]
    rows = plan.schedule.padded_len if causal else t_q
    out = torch.empty(batch, heads_q, rows, v.shape[-1], device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, heads_q, rows, device=q.device, dtype=torch.float32)
    launcher = _Launcher(q, k, v, out, lse, scale, tiles)

    if not causal:
        if not plan.approximate:
            launcher.launch(q_row0=0, k_row0=0, sub_stride=0, num_sub=1, t_q=t_q, t_k=t_k, num_blocks=1,
                            causal=False, accumulate=False)
        else:
            samples = plan.samples[0] if plan.samples else None
            launcher.launch_noncausal(lsh_codes(q, plan.projections)[:, :, None],
                                      lsh_codes(k, plan.projections)[:, :, None], samples,
                                      q_row0=0, k_row0=0, sub_stride=0, num_sub=1, t_q=t_q, t_k=t_k,
                                      block_size=block_size, accumulate=False)
        return out, lse

    schedule = plan.schedule
    n, n_pad, leaf = schedule.seq_len, schedule.padded_len, schedule.leaf_len
    launcher.launch(q_row0=0, k_row0=0, sub_stride=leaf, num_sub=n_pad // leaf, t_q=leaf, t_k=leaf,
                    num_blocks=1, causal=True, accumulate=False)
    if schedule.num_levels:
        # Padded rows get code 0, as the zero vectors of the torch and naive paths do.
        pad = (0, n_pad - n)
        q_codes = torch.nn.functional.pad(lsh_codes(q, plan.projections), pad)
        k_codes = torch.nn.functional.pad(lsh_codes(k, plan.projections), pad)
    for level in range(schedule.num_levels):
        num_sub, half = schedule.num_sub(level), schedule.half_len(level)
        level_q = q_codes.view(batch, heads_q, num_sub, 2, half)[:, :, :, 1]
        level_k = k_codes.view(batch, k.shape[1], num_sub, 2, half)[:, :, :, 0]
        samples = plan.samples[level] if plan.samples else None
        launcher.launch_noncausal(level_q, level_k, samples, q_row0=half, k_row0=0, sub_stride=2 * half,
                                  num_sub=num_sub, t_q=half, t_k=half, block_size=block_size, accumulate=True)
    return out[:, :, :n], lse[:, :, :n]
