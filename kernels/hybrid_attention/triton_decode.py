"""Triton kernel of one fused decoding step of the hybrid attention over a batch of sequences.

`_hybrid_decode_kernel` [B·Hq, D-blocks] does, for the token at position n of every sequence and one
query head (one block of value columns):

1. the window softmax over the keys held in the state's window plus the new token (read from two
   places, so the window is never concatenated before the attention): s = q·k/√D, c = max s,
   weights γ·exp(s − c);
2. the linear part φq·kv and φq·k_sum from the fp32 state, one shared normalizer, y = num / den;
3. the state update: the first NUM_EVICT keys of [window ‖ new token] leave the window of the next
   query and are folded into kv += φkᵀ v and k_sum += Σ φk (written to KV_OUT / KSUM_OUT, which may be
   the input state itself: each program reads its block before writing it).

Cost per step is O(window · D + F · D) per head, independent of the context length. The caller
(triton_api.hybrid_decode_step) rebuilds the window tensors of the returned HybridState.
Everything is computed in fp32 (the state is fp32), as in naive.recurrent_hybrid_step.

Shapes: B batch, Hq / Hkv heads, D head dim, F features, W' keys in the window before the step.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_hybrid_decode_kernel"]


@triton.jit(do_not_specialize=["W_LEN", "NUM_EVICT"])
def _hybrid_decode_kernel(
    Q, K, V, QF, KF, GAMMA, WK, WV, WKF, KV, KSUM, Y, KV_OUT, KSUM_OUT,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_qfb, s_qfh, s_kfb, s_kfh,
    s_wkb, s_wkh, s_wkt, s_wvb, s_wvh, s_wvt, s_wkfb, s_wkfh, s_wkft, s_yb, s_yh,
    W_LEN, NUM_EVICT, HQ, GROUP, D, F, qk_scale,
    BW: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, PRECISION: tl.constexpr,
):
    """Q (B, Hq, 1, D), K, V (B, Hkv, 1, D), QF, KF (B, Hq, 1, F), window WK, WV (B, Hkv, W', D),
    WKF (B, Hq, W', F), KV (B, Hq, F, D) and KSUM (B, Hq, F) contiguous fp32; Y (B, Hq, 1, D)."""
    i_bh, i_dv = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    i_b64, i_h64, i_hk64 = i_b.to(tl.int64), i_h.to(tl.int64), i_hk.to(tl.int64)
    o_w = tl.arange(0, BW)  # row W_LEN is the new token, rows below it the stored window
    o_d = tl.arange(0, BD)
    o_dv = i_dv * BDV + tl.arange(0, BDV)
    o_f = tl.arange(0, BF)
    m_d, m_dv, m_f = o_d < D, o_dv < D, o_f < F
    m_old, m_new, m_keys = o_w < W_LEN, o_w == W_LEN, o_w <= W_LEN

    b_q = tl.load(Q + i_b64 * s_qb + i_h64 * s_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
    p_wk = WK + i_b64 * s_wkb + i_hk64 * s_wkh + o_w[:, None] * s_wkt + o_d[None, :]
    b_keys = tl.load(p_wk, mask=m_old[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_k_new = tl.load(K + i_b64 * s_kb + i_hk64 * s_kh + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_keys = tl.where(m_new[:, None], b_k_new[None, :], b_keys)
    p_wv = WV + i_b64 * s_wvb + i_hk64 * s_wvh + o_w[:, None] * s_wvt + o_dv[None, :]
    b_vals = tl.load(p_wv, mask=m_old[:, None] & m_dv[None, :], other=0.0).to(tl.float32)
    b_v_new = tl.load(V + i_b64 * s_vb + i_hk64 * s_vh + o_dv, mask=m_dv, other=0.0).to(tl.float32)
    b_vals = tl.where(m_new[:, None], b_v_new[None, :], b_vals)

    # Window softmax weights (base 2: qk_scale = log2(e)/√D).
    b_s = tl.where(m_keys, tl.sum(b_keys * b_q[None, :], 1) * qk_scale, float("-inf"))
    b_c = tl.max(b_s, 0)
    b_gamma = tl.load(GAMMA + i_h).to(tl.float32)
    b_p = tl.where(m_keys, b_gamma * tl.exp2(b_s - b_c), 0.0)
    b_num = tl.sum(b_p[:, None] * b_vals, 0)
    b_den = tl.sum(b_p, 0)

    # Linear part from the state before this step.
    b_qf = tl.load(QF + i_b64 * s_qfb + i_h64 * s_qfh + o_f, mask=m_f, other=0.0).to(tl.float32)
    o_state = i_bh.to(tl.int64) * F
    m_fd = m_f[:, None] & m_dv[None, :]
    p_kv = KV + (o_state + o_f[:, None]) * D + o_dv[None, :]
    b_kv = tl.load(p_kv, mask=m_fd, other=0.0)
    b_ksum = tl.load(KSUM + o_state + o_f, mask=m_f, other=0.0)
    b_num += tl.sum(b_qf[:, None] * b_kv, 0)
    b_den += tl.sum(b_qf * b_ksum, 0)
    b_y = b_num / b_den
    tl.store(Y + i_b64 * s_yb + i_h64 * s_yh + o_dv, b_y.to(Y.dtype.element_ty), mask=m_dv)

    # Fold the keys that leave the window of the next query into the state.
    if NUM_EVICT > 0:
        m_evict = o_w < NUM_EVICT
        p_wkf = WKF + i_b64 * s_wkfb + i_h64 * s_wkfh + o_w[:, None] * s_wkft + o_f[None, :]
        b_kf = tl.load(p_wkf, mask=(m_old & m_evict)[:, None] & m_f[None, :], other=0.0).to(tl.float32)
        b_kf_new = tl.load(KF + i_b64 * s_kfb + i_h64 * s_kfh + o_f, mask=m_f, other=0.0).to(tl.float32)
        b_kf = tl.where((m_new & m_evict)[:, None], b_kf_new[None, :], b_kf)
        b_v_evict = tl.where(m_evict[:, None], b_vals, 0.0)
        b_kv += tl.dot(tl.trans(b_kf), b_v_evict, input_precision=PRECISION)
        b_ksum += tl.sum(b_kf, 0)
    tl.store(KV_OUT + (o_state + o_f[:, None]) * D + o_dv[None, :], b_kv, mask=m_fd)
    if i_dv == 0:
        tl.store(KSUM_OUT + o_state + o_f, b_ksum, mask=m_f)
