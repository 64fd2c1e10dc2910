"""Triton kernels of the chunked hybrid attention (training and prefill): forward and backward, O(T).

The sequence is cut into tiles of BT tokens (the chunk size, 64 by default; any power of two >= 16,
independent of the window). Query tile i needs

* the keys of tiles i_first(i) .. i, where i_first(i) = max(window_start(i·BT), 0) // BT: every key
  of the window of every row of the tile lies there (plus, for a sliding window, some linear keys,
  classified per element);
* the linear state S = Σ φk vᵀ (F × D), z = Σ φk (F) over all keys before i_first(i)·BT, which are
  linear for every row of the tile (window_start is non-decreasing in the position).

Kernels (grid in brackets; H = Hq query heads, Hkv kv heads, NT = ceil(T / BT) tiles):

* `_state_fwd_kernel` [F-blocks, D-blocks, B·H]: exclusive prefix sum over tiles of φkᵀ v and of φk,
  S[c] = Σ_{c' < c} (tile c'), stored for every boundary c: (B·H, NT, F, D) and (B·H, NT, F).
* `_hybrid_fwd_kernel` [NT, B·H]: pass 1 gets the window max c_n (and its key position) over key
  tiles i_first..i, pass 2 sums γ·exp(s − c) (window) and φqᵀφk (linear) into one numerator and one
  denominator, plus φq·S[i_first] and φq·z[i_first]; stores y, and for the backward c (base 2), the
  argmax position and the full denominator.
* backward, window terms (a FlashAttention backward): `_bwd_dq_window_kernel` [NT, B·H] gives dq, a
  per-tile partial of dγ, ρ_n (the gradient through c_n, below) and δ_n = dy_n·y_n;
  `_bwd_dkv_window_kernel` [NT, B·Hkv] gives dk and the window part of dv, looping over the query
  heads of its kv head's group and the query tiles that read the key tile (GQA without repeating k/v).
* backward, linear terms: `_bwd_dq_linear_kernel` [NT, B·H] gives dφq and the tile's gradient w.r.t.
  the state it read, dS_i = φqᵀ g, dz_i = φqᵀ h (g = dy / den, h = −δ / den);
  `_state_bwd_kernel` [F-blocks, D-blocks, B·H] turns them into a reverse inclusive prefix sum over
  tiles, in place: R[i] = Σ_{i' ≥ i} dS_i'. Key tile c was folded into the states of exactly the
  tiles i ≥ i_after(c) = the first tile with i_first > c, so its state gradient is R[i_after(c)];
  `_bwd_dkv_linear_kernel` [NT, B·Hkv] gives dφk and the linear part of dv (in-tile linear keys and
  the state path).

The window max c_n is part of the model (the linear terms are not rescaled by it), so the gradient
flows through it as through torch.amax in naive.py: with ρ_n = Σ_{m∈W(n)} P_nm dP_nm, the score of
the argmax key a(n) gets −ρ_n on top of P·dP. (On exact ties torch.amax splits −ρ_n evenly; the
kernels give it to the first tied key; exact ties need two keys with bitwise-equal scores.)

All arithmetic is fp32; bf16/fp16 operands feed tl.dot directly on a GPU, and with UPCAST (the CPU
interpreter, which has no bf16 arithmetic) everything is upcast first.
The states and state gradients are summed in fp32 and enter tl.dot as STATE_DOT: bf16 next to bf16
inputs (as flash-linear-attention does), fp32 otherwise (tf32 for fp16 inputs, whose range a long
sum could exceed; "ieee" for fp32 inputs). The host stores S and R in that dtype too (half the
memory traffic): S and R would be rounded before their dots anyway; the per-tile dS_i are rounded
before the reverse sum, which adds them in fp32.

Naming: p_ pointers, b_ blocks, m_ masks, o_ offsets, i_ indices, UPPER constexpr. Exponentials are
base 2: s holds q·k·log2(e)/√D, so exp2(s − c) = exp(q·k/√D − c_n).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "first_key_tile",
    "key_span",
    "_state_fwd_kernel",
    "_hybrid_fwd_kernel",
    "_bwd_dq_window_kernel",
    "_bwd_dq_linear_kernel",
    "_state_bwd_kernel",
    "_bwd_dkv_linear_kernel",
    "_bwd_dkv_window_kernel",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch settings (num_warps, num_stages, free tile sizes) live in triton_api.py: DEFAULT_LAUNCH_CONFIGS.


# ----------------------------------------------------------------------------------------------
# Host-side tile geometry (the kernels compute the same quantities with the jit helpers below)
# ----------------------------------------------------------------------------------------------


def window_start_py(position: int, window_size: int, terrace: bool) -> int:
    """First key of W(position), may be negative (same as naive.window_start)."""
    if terrace:
        return (position // window_size - 1) * window_size
    return position - window_size + 1


def first_key_tile(tile: int, chunk_size: int, window_size: int, terrace: bool) -> int:
    """i_first(tile): the first key tile that query tile `tile` reads directly."""
    return max(window_start_py(tile * chunk_size, window_size, terrace), 0) // chunk_size


def key_span(num_tiles: int, chunk_size: int, window_size: int, terrace: bool) -> int:
    """KSPAN = max over tiles i of i − i_first(i) + 1: the most key tiles a query tile reads directly.

    i − i_first(i) is periodic in i with period lcm(w, BT) / BT once window_start(i·BT) >= 0, so a few
    periods past the clamped start cover every tile.
    """
    import math

    period = window_size * chunk_size // math.gcd(window_size, chunk_size) // chunk_size
    limit = min(num_tiles, 2 * period + (2 * window_size) // chunk_size + 2)
    return max((i - first_key_tile(i, chunk_size, window_size, terrace) + 1 for i in range(limit)), default=1)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _window_start(pos, WINDOW: tl.constexpr, TERRACE: tl.constexpr):
    """First key of W(pos) for pos >= 0 (may be negative, callers clamp)."""
    if TERRACE:
        start = (pos // WINDOW - 1) * WINDOW
    else:
        start = pos - WINDOW + 1
    return start


@triton.jit
def _first_key_tile(i_t, BT: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr):
    return tl.maximum(_window_start(i_t * BT, WINDOW, TERRACE), 0) // BT


@triton.jit
def _last_window_start(i_t, T, BT: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr):
    """window_start of the tile's last real row: key tile j holds linear keys for some row iff
    j·BT < this value."""
    return _window_start(tl.minimum(i_t * BT + BT, T) - 1, WINDOW, TERRACE)


@triton.jit
def _load_tile(base, stride_t, o_rows, m_rows, o_cols, m_cols, UPCAST: tl.constexpr):
    """(rows × cols) tile of a (T, X) matrix with unit column stride; zeros outside the masks. The
    in-matrix offsets are int32 (fewer registers than int64; the host keeps (T + BT)·stride_t < 2^31),
    the batch/head offset is already in `base`."""
    p = base + (o_rows[:, None] * stride_t + o_cols[None, :])
    b = tl.load(p, mask=m_rows[:, None] & m_cols[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    return b


@triton.jit
def _store_tile(base, stride_t, o_rows, m_rows, o_cols, m_cols, b):
    p = base + (o_rows[:, None] * stride_t + o_cols[None, :])
    tl.store(p, b.to(base.dtype.element_ty), mask=m_rows[:, None] & m_cols[None, :])


@triton.jit
def _window_and_linear_masks(o_t, o_s, WINDOW: tl.constexpr, TERRACE: tl.constexpr):
    """(BT_q × BT_k) masks for query rows o_t and key columns o_s: key in W(n), key in Λ(n)."""
    b_ws = _window_start(o_t, WINDOW, TERRACE)
    m_win = (o_s[None, :] >= b_ws[:, None]) & (o_s[None, :] <= o_t[:, None])
    m_lin = o_s[None, :] < b_ws[:, None]
    return m_win, m_lin


# ----------------------------------------------------------------------------------------------
# Inter-chunk state
# ----------------------------------------------------------------------------------------------


@triton.jit
def _state_fwd_kernel(
    KF, V, S, Z,
    s_kfb, s_kfh, s_kft, s_vb, s_vh, s_vt,
    T, NT, HQ, GROUP, D, F,
    BT: tl.constexpr, BFS: tl.constexpr, BDS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """S[b, h, c] = Σ_{tiles c' < c} φk_c'ᵀ v_c' (one F × D block, summed in fp32, stored in S's dtype),
    Z[b, h, c] = Σ φk in fp32."""
    i_f, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_f = i_f * BFS + tl.arange(0, BFS)
    o_d = i_d * BDS + tl.arange(0, BDS)
    m_f, m_d = o_f < F, o_d < D
    kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh
    # Pointers to the state of boundary c, advanced each step (loop counters are plain ints in the interpreter).
    p_s = S + i_bh.to(tl.int64) * NT * F * D + o_f[:, None] * D + o_d[None, :]
    p_z = Z + i_bh.to(tl.int64) * NT * F + o_f

    b_s = tl.zeros([BFS, BDS], dtype=tl.float32)
    b_z = tl.zeros([BFS], dtype=tl.float32)
    for i_c in range(0, NT):
        tl.store(p_s, b_s.to(S.dtype.element_ty), mask=m_f[:, None] & m_d[None, :])
        if i_d == 0:
            tl.store(p_z, b_z, mask=m_f)
        p_s += F * D
        p_z += F
        o_s = i_c * BT + tl.arange(0, BT)
        m_s = o_s < T
        b_kf = _load_tile(kf_base, s_kft, o_s, m_s, o_f, m_f, UPCAST)
        b_v = _load_tile(v_base, s_vt, o_s, m_s, o_d, m_d, UPCAST)
        b_s += tl.dot(tl.trans(b_kf), b_v, input_precision=PRECISION)
        b_z += tl.sum(b_kf.to(tl.float32), 0)


@triton.jit
def _state_bwd_kernel(
    DS, DZ, NT, D, F,
    BFS: tl.constexpr, BDS: tl.constexpr,
):
    """In place: DS[b, h, i] <- Σ_{i' >= i} DS[b, h, i'] (and DZ likewise), summed in fp32."""
    i_f, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_f = i_f * BFS + tl.arange(0, BFS)
    o_d = i_d * BDS + tl.arange(0, BDS)
    m_f, m_d = o_f < F, o_d < D
    m_fd = m_f[:, None] & m_d[None, :]
    # Pointers to tile NT − 1, moved back one tile per step.
    p_ds = DS + (i_bh.to(tl.int64) * NT + NT - 1) * F * D + o_f[:, None] * D + o_d[None, :]
    p_dz = DZ + (i_bh.to(tl.int64) * NT + NT - 1) * F + o_f

    b_ds = tl.zeros([BFS, BDS], dtype=tl.float32)
    b_dz = tl.zeros([BFS], dtype=tl.float32)
    for _ in range(0, NT):
        b_ds += tl.load(p_ds, mask=m_fd, other=0.0).to(tl.float32)
        tl.store(p_ds, b_ds.to(DS.dtype.element_ty), mask=m_fd)
        if i_d == 0:
            b_dz += tl.load(p_dz, mask=m_f, other=0.0)
            tl.store(p_dz, b_dz, mask=m_f)
        p_ds -= F * D
        p_dz -= F


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _hybrid_fwd_kernel(
    Q, K, V, QF, KF, GAMMA, S, Z, Y, C, ARG, DEN,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    s_qfb, s_qfh, s_qft, s_kfb, s_kfh, s_kft, s_yb, s_yh, s_yt,
    T, NT, HQ, GROUP, D, F, qk_scale,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT: tl.constexpr,
):
    """One query tile of one query head: y (B, H, T, D); C = c_n·log2(e), DEN (B·H, T) fp32 and
    ARG (B·H, T) int32, the position of the window max."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_t = i_t * BT + tl.arange(0, BT)
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF)
    m_t, m_d, m_f = o_t < T, o_d < D, o_f < F
    q_base = Q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    qf_base = QF + i_b.to(tl.int64) * s_qfb + i_h.to(tl.int64) * s_qfh
    k_base = K + i_b.to(tl.int64) * s_kb + i_hk.to(tl.int64) * s_kh
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh
    kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh

    b_q = _load_tile(q_base, s_qt, o_t, m_t, o_d, m_d, UPCAST)
    b_qf = _load_tile(qf_base, s_qft, o_t, m_t, o_f, m_f, UPCAST)
    b_gamma = tl.load(GAMMA + i_h).to(tl.float32)
    i_first = _first_key_tile(i_t, BT, WINDOW, TERRACE)
    last_ws = _last_window_start(i_t, T, BT, WINDOW, TERRACE)

    # Pass 1: the window max c_n (the linear terms are not rescaled by it, so it must be exact
    # before anything is summed).
    b_c = tl.full([BT], float("-inf"), dtype=tl.float32)
    b_arg = o_t  # position of the window max (the row's own key until a larger score is seen)
    for i_dj in tl.static_range(KSPAN):
        i_j = i_first + i_dj
        if i_j <= i_t:
            o_s = i_j * BT + tl.arange(0, BT)
            b_k = _load_tile(k_base, s_kt, o_s, o_s < T, o_d, m_d, UPCAST)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
            m_win, m_lin = _window_and_linear_masks(o_t, o_s, WINDOW, TERRACE)
            b_tile_max, b_tile_arg = tl.max(tl.where(m_win, b_s, float("-inf")), 1, return_indices=True)
            b_arg = tl.where(b_tile_max > b_c, i_j * BT + b_tile_arg, b_arg)
            b_c = tl.maximum(b_c, b_tile_max)
    # Every real row holds its own key in its window; padding rows get 0 so nothing becomes NaN.
    b_c = tl.where(m_t, b_c, 0.0)

    # Pass 2: one numerator and one denominator for the window and the in-tile linear keys.
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    b_den = tl.zeros([BT], dtype=tl.float32)
    for i_dj in tl.static_range(KSPAN):
        i_j = i_first + i_dj
        if i_j <= i_t:
            o_s = i_j * BT + tl.arange(0, BT)
            m_s = o_s < T
            b_k = _load_tile(k_base, s_kt, o_s, m_s, o_d, m_d, UPCAST)
            b_v = _load_tile(v_base, s_vt, o_s, m_s, o_d, m_d, UPCAST)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
            m_win, m_lin = _window_and_linear_masks(o_t, o_s, WINDOW, TERRACE)
            b_p = tl.where(m_win, b_gamma * tl.exp2(b_s - b_c[:, None]), 0.0)
            if i_j * BT < last_ws:
                b_kf = _load_tile(kf_base, s_kft, o_s, m_s, o_f, m_f, UPCAST)
                b_pl = tl.dot(b_qf, tl.trans(b_kf), input_precision=PRECISION)
                b_p += tl.where(m_lin, b_pl, 0.0)
            b_den += tl.sum(b_p, 1)
            b_acc += tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)

    # The linear state over all keys before tile i_first (empty when i_first == 0).
    if i_first > 0:
        o_state = (i_bh.to(tl.int64) * NT + i_first) * F
        b_state = tl.load(S + (o_state + o_f[:, None]) * D + o_d[None, :],
                          mask=m_f[:, None] & m_d[None, :], other=0.0)
        b_z = tl.load(Z + o_state + o_f, mask=m_f, other=0.0)
        b_acc += tl.dot(b_qf.to(STATE_DOT), b_state.to(STATE_DOT), input_precision=PRECISION)
        b_den += tl.sum(b_qf.to(tl.float32) * b_z[None, :], 1)

    b_y = b_acc / b_den[:, None]
    _store_tile(Y + i_b.to(tl.int64) * s_yb + i_h.to(tl.int64) * s_yh, s_yt, o_t, m_t, o_d, m_d, b_y)
    o_row = i_bh.to(tl.int64) * T + o_t
    tl.store(C + o_row, b_c, mask=m_t)
    tl.store(ARG + o_row, b_arg, mask=m_t)
    tl.store(DEN + o_row, b_den, mask=m_t)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
#
# With P_nm the weight of key m for row n (γ·exp(s − c) in the window, φq·φk linear, including the
# state), y_n = Σ P v / den_n. For g_n = dy_n / den_n and h_n = −(dy_n · y_n) / den_n:
#   dP_nm = g_n · v_m + h_n,   dv_m = Σ_n P_nm g_n,
#   window: ds_nm = P_nm dP_nm − [m = a(n)] ρ_n with ρ_n = Σ_{m∈W} P_nm dP_nm (through c_n = s_n,a(n)),
#           dq = Σ ds k / √D, dk = Σ ds q / √D, dγ = Σ exp(s − c) dP;
#   linear: dφq_n = Σ dP_nm φk_m, dφk_m = Σ dP_nm φq_n;
#   state:  dφq_n += S g_n + z h_n, and dS = Σ_n φq_n g_nᵀ, dz = Σ_n φq_n h_n flow back to the keys.
# The window terms and the linear terms live in separate kernels (as a FlashAttention backward and a
# linear-attention backward): one kernel holding both needs more registers than an SM has (D = F = 128).
# Launch order: dq_window (writes δ and ρ), dq_linear (dS), the reverse scan, dkv_linear (writes dv),
# dkv_window (adds its part to dv).


@triton.jit
def _bwd_dq_window_kernel(
    Q, K, V, GAMMA, Y, DY, C, ARG, DEN,
    DQ, DGAMMA, RHO, DELTA,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_yb, s_yh, s_yt, s_dyb, s_dyh, s_dyt,
    s_dqb, s_dqh, s_dqt,
    T, NT, HQ, GROUP, D, qk_scale, sm_scale,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query tile of one query head, window terms: dq; DGAMMA[b·h, i] = the tile's part of dγ;
    per row RHO = ρ_n and DELTA = dy_n · y_n (B·H, T) fp32 for the other kernels."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_t, m_d = o_t < T, o_d < D
    k_base = K + i_b.to(tl.int64) * s_kb + i_hk.to(tl.int64) * s_kh
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh

    b_q = _load_tile(Q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh, s_qt, o_t, m_t, o_d, m_d, UPCAST)
    b_dy = _load_tile(DY + i_b.to(tl.int64) * s_dyb + i_h.to(tl.int64) * s_dyh, s_dyt, o_t, m_t, o_d, m_d, UPCAST)
    b_y = _load_tile(Y + i_b.to(tl.int64) * s_yb + i_h.to(tl.int64) * s_yh, s_yt, o_t, m_t, o_d, m_d, UPCAST)
    b_delta = tl.sum(b_dy.to(tl.float32) * b_y.to(tl.float32), 1)
    o_row = i_bh.to(tl.int64) * T + o_t
    tl.store(DELTA + o_row, b_delta, mask=m_t)
    b_c = tl.load(C + o_row, mask=m_t, other=0.0)
    # Padding rows: den 1 and dy 0 make g = h = 0, so they add nothing anywhere.
    b_inv_den = 1.0 / tl.load(DEN + o_row, mask=m_t, other=1.0)
    b_h = -b_delta * b_inv_den
    b_gamma = tl.load(GAMMA + i_h).to(tl.float32)
    i_first = _first_key_tile(i_t, BT, WINDOW, TERRACE)

    b_dq = tl.zeros([BT, BD], dtype=tl.float32)
    b_dgamma = tl.zeros([BT], dtype=tl.float32)  # per row: Σ_W exp(s − c) dP
    for i_dj in tl.static_range(KSPAN):
        i_j = i_first + i_dj
        if i_j <= i_t:
            o_s = i_j * BT + tl.arange(0, BT)
            m_s = o_s < T
            b_k = _load_tile(k_base, s_kt, o_s, m_s, o_d, m_d, UPCAST)
            b_v = _load_tile(v_base, s_vt, o_s, m_s, o_d, m_d, UPCAST)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
            m_win, m_lin = _window_and_linear_masks(o_t, o_s, WINDOW, TERRACE)
            b_e = tl.where(m_win, tl.exp2(b_s - b_c[:, None]), 0.0)
            b_dp = tl.dot(b_dy, tl.trans(b_v), input_precision=PRECISION) * b_inv_den[:, None] + b_h[:, None]
            b_dgamma += tl.sum(b_e * b_dp, 1)
            b_ds = b_gamma * b_e * b_dp
            b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)

    # The gradient through c_n: −ρ_n on the score of the argmax key (gathered by position).
    b_rho = b_gamma * b_dgamma
    b_arg = tl.load(ARG + o_row, mask=m_t, other=0)
    b_k_arg = _load_tile(k_base, s_kt, b_arg, m_t, o_d, m_d, UPCAST)
    b_dq -= b_rho[:, None] * b_k_arg.to(tl.float32)
    tl.store(RHO + o_row, b_rho, mask=m_t)
    _store_tile(DQ + i_b.to(tl.int64) * s_dqb + i_h.to(tl.int64) * s_dqh, s_dqt, o_t, m_t, o_d, m_d,
                b_dq * sm_scale)
    tl.store(DGAMMA + i_bh.to(tl.int64) * NT + i_t, tl.sum(b_dgamma, 0))


@triton.jit
def _bwd_dq_linear_kernel(
    V, QF, KF, S, Z, DY, DEN, DELTA,
    DQF, DS, DZ,
    s_vb, s_vh, s_vt, s_qfb, s_qfh, s_qft, s_kfb, s_kfh, s_kft, s_dyb, s_dyh, s_dyt, s_dqfb, s_dqfh, s_dqft,
    T, NT, HQ, GROUP, D, F,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BFS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT: tl.constexpr,
):
    """One query tile of one query head, linear terms: dφq (in-tile linear keys and the state), and
    DS/DZ[b·h, i] = the gradient w.r.t. the state the tile read (zero use when i_first = 0)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_t = i_t * BT + tl.arange(0, BT)
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF)
    m_t, m_d, m_f = o_t < T, o_d < D, o_f < F
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh
    kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh

    b_dy = _load_tile(DY + i_b.to(tl.int64) * s_dyb + i_h.to(tl.int64) * s_dyh, s_dyt, o_t, m_t, o_d, m_d, UPCAST)
    o_row = i_bh.to(tl.int64) * T + o_t
    b_inv_den = 1.0 / tl.load(DEN + o_row, mask=m_t, other=1.0)
    b_h = -tl.load(DELTA + o_row, mask=m_t, other=0.0) * b_inv_den
    i_first = _first_key_tile(i_t, BT, WINDOW, TERRACE)
    last_ws = _last_window_start(i_t, T, BT, WINDOW, TERRACE)

    b_dqf = tl.zeros([BT, BF], dtype=tl.float32)
    for i_dj in tl.static_range(KSPAN):
        i_j = i_first + i_dj
        if (i_j <= i_t) & (i_j * BT < last_ws):
            o_s = i_j * BT + tl.arange(0, BT)
            m_s = o_s < T
            b_v = _load_tile(v_base, s_vt, o_s, m_s, o_d, m_d, UPCAST)
            b_kf = _load_tile(kf_base, s_kft, o_s, m_s, o_f, m_f, UPCAST)
            m_win, m_lin = _window_and_linear_masks(o_t, o_s, WINDOW, TERRACE)
            b_dp = tl.dot(b_dy, tl.trans(b_v), input_precision=PRECISION) * b_inv_den[:, None] + b_h[:, None]
            b_dp = tl.where(m_lin, b_dp, 0.0)
            b_dqf += tl.dot(b_dp.to(b_kf.dtype), b_kf, input_precision=PRECISION)

    b_g = (b_dy.to(tl.float32) * b_inv_den[:, None]).to(STATE_DOT)
    if i_first > 0:
        o_state = (i_bh.to(tl.int64) * NT + i_first) * F
        b_state = tl.load(S + (o_state + o_f[:, None]) * D + o_d[None, :],
                          mask=m_f[:, None] & m_d[None, :], other=0.0).to(STATE_DOT)
        b_z = tl.load(Z + o_state + o_f, mask=m_f, other=0.0)
        b_dqf += tl.dot(b_g, tl.trans(b_state), input_precision=PRECISION)
        b_dqf += b_h[:, None] * b_z[None, :]
    _store_tile(DQF + i_b.to(tl.int64) * s_dqfb + i_h.to(tl.int64) * s_dqfh, s_dqft, o_t, m_t, o_f, m_f, b_dqf)

    # dS_i = φqᵀ g, BFS features at a time (an F × D fp32 block at once would spill registers).
    o_tile = (i_bh.to(tl.int64) * NT + i_t) * F
    qf_base = QF + i_b.to(tl.int64) * s_qfb + i_h.to(tl.int64) * s_qfh
    for i_fs in tl.static_range(BF // BFS):
        o_fs = i_fs * BFS + tl.arange(0, BFS)
        m_fs = o_fs < F
        b_qf_part = _load_tile(qf_base, s_qft, o_t, m_t, o_fs, m_fs, UPCAST)
        b_dstate = tl.dot(tl.trans(b_qf_part.to(STATE_DOT)), b_g, input_precision=PRECISION)
        tl.store(DS + (o_tile + o_fs[:, None]) * D + o_d[None, :], b_dstate.to(DS.dtype.element_ty),
                 mask=m_fs[:, None] & m_d[None, :])
        tl.store(DZ + o_tile + o_fs, tl.sum(b_qf_part.to(tl.float32) * b_h[:, None], 0), mask=m_fs)


@triton.jit
def _bwd_dkv_linear_kernel(
    V, QF, KF, DY, DEN, DELTA, R, RZ,
    DV_LINEAR, DKF,
    s_vb, s_vh, s_vt, s_qfb, s_qfh, s_qft, s_kfb, s_kfh, s_kft, s_dyb, s_dyh, s_dyt,
    s_dkfb, s_dkfh, s_dkft,
    T, NT, HQ, GROUP, D, F,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr,
    BT: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT: tl.constexpr,
):
    """One key tile of one kv head, linear terms: dφk of every query head of the group, and dv's
    linear part (summed over the group in registers) into DV_LINEAR (B·Hkv, T, D) fp32, for the window
    kernel to add to its part.
    R/RZ are the reverse prefix sums of the state gradients."""
    i_j, i_bk = tl.program_id(0), tl.program_id(1)
    HKV = HQ // GROUP
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    o_s = i_j * BT + tl.arange(0, BT)
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF)
    m_s, m_d, m_f = o_s < T, o_d < D, o_f < F
    b_v = _load_tile(V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh, s_vt, o_s, m_s, o_d, m_d, UPCAST)

    # This key tile is folded into the states of the query tiles from i_after on (see module doc).
    i_after = i_j + 1
    for i_di in tl.static_range(1, KSPAN):
        if _first_key_tile(i_j + i_di, BT, WINDOW, TERRACE) <= i_j:
            i_after = i_j + i_di + 1

    b_dv = tl.zeros([BT, BD], dtype=tl.float32)
    for i_g in range(0, GROUP):
        i_h = i_hk * GROUP + i_g
        i_bh = i_b * HQ + i_h
        qf_base = QF + i_b.to(tl.int64) * s_qfb + i_h.to(tl.int64) * s_qfh
        dy_base = DY + i_b.to(tl.int64) * s_dyb + i_h.to(tl.int64) * s_dyh
        kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh
        b_kf = _load_tile(kf_base, s_kft, o_s, m_s, o_f, m_f, UPCAST)
        b_dkf = tl.zeros([BT, BF], dtype=tl.float32)

        # Query tiles that read this key tile directly and hold linear keys in it.
        for i_di in tl.static_range(KSPAN):
            i_t = i_j + i_di
            if i_t < NT:
                if (_first_key_tile(i_t, BT, WINDOW, TERRACE) <= i_j) & (
                        i_j * BT < _last_window_start(i_t, T, BT, WINDOW, TERRACE)):
                    # BQ query rows at a time: BT × BT tiles next to three BT × 128 accumulators
                    # would not fit in registers.
                    for i_q in tl.static_range(BT // BQ):
                        o_t = i_t * BT + i_q * BQ + tl.arange(0, BQ)
                        m_t = o_t < T
                        b_qf = _load_tile(qf_base, s_qft, o_t, m_t, o_f, m_f, UPCAST)
                        b_dy = _load_tile(dy_base, s_dyt, o_t, m_t, o_d, m_d, UPCAST)
                        o_row = i_bh.to(tl.int64) * T + o_t
                        b_inv_den = 1.0 / tl.load(DEN + o_row, mask=m_t, other=1.0)
                        b_h = -tl.load(DELTA + o_row, mask=m_t, other=0.0) * b_inv_den
                        m_win, m_lin = _window_and_linear_masks(o_t, o_s, WINDOW, TERRACE)
                        b_p = tl.where(m_lin, tl.dot(b_qf, tl.trans(b_kf), input_precision=PRECISION), 0.0)
                        b_dp = tl.dot(b_dy, tl.trans(b_v), input_precision=PRECISION) * b_inv_den[:, None]
                        b_dp = tl.where(m_lin, b_dp + b_h[:, None], 0.0)
                        b_dkf += tl.dot(tl.trans(b_dp).to(b_qf.dtype), b_qf, input_precision=PRECISION)
                        b_g = (b_dy.to(tl.float32) * b_inv_den[:, None]).to(b_dy.dtype)
                        b_dv += tl.dot(tl.trans(b_p).to(b_dy.dtype), b_g, input_precision=PRECISION)

        # State path: dφk_m += dU v_m + dz, dv_m += dUᵀ φk_m with dU = R[i_after] of this query head.
        if i_after < NT:
            o_state = (i_bh.to(tl.int64) * NT + i_after) * F
            b_dstate = tl.load(R + (o_state + o_f[:, None]) * D + o_d[None, :],
                               mask=m_f[:, None] & m_d[None, :], other=0.0).to(STATE_DOT)
            b_dz = tl.load(RZ + o_state + o_f, mask=m_f, other=0.0)
            b_dkf += tl.dot(b_v.to(STATE_DOT), tl.trans(b_dstate), input_precision=PRECISION) + b_dz[None, :]
            b_dv += tl.dot(b_kf.to(STATE_DOT), b_dstate, input_precision=PRECISION)
        _store_tile(DKF + i_b.to(tl.int64) * s_dkfb + i_h.to(tl.int64) * s_dkfh, s_dkft, o_s, m_s, o_f, m_f, b_dkf)
    p_dv = DV_LINEAR + i_bk.to(tl.int64) * T * D + (o_s[:, None] * D + o_d[None, :])
    tl.store(p_dv, b_dv, mask=m_s[:, None] & m_d[None, :])


@triton.jit
def _bwd_dkv_window_kernel(
    Q, K, V, GAMMA, DY, C, ARG, DEN, DELTA, RHO, DV_LINEAR,
    DK, DV,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_dyb, s_dyh, s_dyt,
    s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt,
    T, NT, HQ, GROUP, D, qk_scale, sm_scale,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr,
    BT: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key tile of one kv head, window terms: dk and dv (summed over the query heads of the group
    in registers, plus DV_LINEAR (B·Hkv, T, D) fp32 from the linear kernel)."""
    i_j, i_bk = tl.program_id(0), tl.program_id(1)
    HKV = HQ // GROUP
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    o_s = i_j * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_s, m_d = o_s < T, o_d < D
    b_k = _load_tile(K + i_b.to(tl.int64) * s_kb + i_hk.to(tl.int64) * s_kh, s_kt, o_s, m_s, o_d, m_d, UPCAST)
    b_v = _load_tile(V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh, s_vt, o_s, m_s, o_d, m_d, UPCAST)

    b_dk = tl.zeros([BT, BD], dtype=tl.float32)
    b_dv = tl.zeros([BT, BD], dtype=tl.float32)
    for i_g in range(0, GROUP):
        i_h = i_hk * GROUP + i_g
        i_bh = i_b * HQ + i_h
        q_base = Q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
        dy_base = DY + i_b.to(tl.int64) * s_dyb + i_h.to(tl.int64) * s_dyh
        b_gamma = tl.load(GAMMA + i_h).to(tl.float32)
        # Query tiles that read this key tile directly: i_first(i) <= i_j <= i.
        for i_di in tl.static_range(KSPAN):
            i_t = i_j + i_di
            if (i_t < NT) & (_first_key_tile(i_t, BT, WINDOW, TERRACE) <= i_j):
                for i_q in tl.static_range(BT // BQ):  # BQ query rows at a time, for registers
                    o_t = i_t * BT + i_q * BQ + tl.arange(0, BQ)
                    m_t = o_t < T
                    b_q = _load_tile(q_base, s_qt, o_t, m_t, o_d, m_d, UPCAST)
                    b_dy = _load_tile(dy_base, s_dyt, o_t, m_t, o_d, m_d, UPCAST)
                    o_row = i_bh.to(tl.int64) * T + o_t
                    b_c = tl.load(C + o_row, mask=m_t, other=0.0)
                    b_inv_den = 1.0 / tl.load(DEN + o_row, mask=m_t, other=1.0)
                    b_h = -tl.load(DELTA + o_row, mask=m_t, other=0.0) * b_inv_den
                    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
                    m_win, m_lin = _window_and_linear_masks(o_t, o_s, WINDOW, TERRACE)
                    b_p = tl.where(m_win, b_gamma * tl.exp2(b_s - b_c[:, None]), 0.0)
                    b_dp = tl.dot(b_dy, tl.trans(b_v), input_precision=PRECISION) * b_inv_den[:, None] + b_h[:, None]
                    # −ρ_n on the argmax key of row n, if it is in this key tile (padding rows: ARG −1).
                    b_arg = tl.load(ARG + o_row, mask=m_t, other=-1)
                    b_rho = tl.load(RHO + o_row, mask=m_t, other=0.0)
                    b_ds = b_p * b_dp - tl.where(o_s[None, :] == b_arg[:, None], b_rho[:, None], 0.0)
                    b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)
                    b_g = (b_dy.to(tl.float32) * b_inv_den[:, None]).to(b_dy.dtype)
                    b_dv += tl.dot(tl.trans(b_p).to(b_dy.dtype), b_g, input_precision=PRECISION)

    p_dv_linear = DV_LINEAR + i_bk.to(tl.int64) * T * D + (o_s[:, None] * D + o_d[None, :])
    b_dv += tl.load(p_dv_linear, mask=m_s[:, None] & m_d[None, :], other=0.0)
    _store_tile(DK + i_b.to(tl.int64) * s_dkb + i_hk.to(tl.int64) * s_dkh, s_dkt, o_s, m_s, o_d, m_d, b_dk * sm_scale)
    _store_tile(DV + i_b.to(tl.int64) * s_dvb + i_hk.to(tl.int64) * s_dvh, s_dvt, o_s, m_s, o_d, m_d, b_dv)
