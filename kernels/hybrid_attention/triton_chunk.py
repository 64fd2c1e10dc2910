"""Triton kernels of the chunked hybrid attention (training and prefill): forward and backward, O(T).

The sequence is cut into tiles of BT tokens (the chunk size, 64 by default; any power of two >= 16,
independent of the window). Query tile i needs

* the keys of tiles i_first(i) .. i, where i_first(i) = max(window_start(i·BT), 0) // BT: every key
  of the window of every row of the tile lies there (plus, for a sliding window, some linear keys,
  classified per element);
* the linear state S = Σ φk vᵀ (F × D), z = Σ φk (F) over all keys before i_first(i)·BT, which are
  linear for every row of the tile (window_start is non-decreasing in the position).

Super-chunks. The kernels that use the state walk M consecutive query tiles per program (the super-chunk
g = tiles gM .. gM + M − 1; M = SUPER, a launch setting) and carry the state in registers: the program
loads the state at its super-chunk's boundary once, P[g] = the state over all key tiles before
i_first(gM), and before query tile i adds the key tiles i_first(i − 1) .. i_first(i) − 1 that left the
window. Only the NS = ceil(NT / M) boundary states are stored. They come from a two-level scan: a
parallel pass sums each key range K_g = [i_first(gM), i_first((g + 1)M)) (the ranges partition the key
tiles; the last one runs to NT), then a short sequential exclusive prefix over the NS sums. The
backward's state gradients go the same way in reverse: key tile c of K_g needs
R(c) = Σ_{i >= i_after(c)} dS_i over the query tiles whose state holds it (i_after(c) = the first tile
with i_first > c, which lies in gM + 1 .. (g + 1)M), i.e. the boundary Σ_{g' > g} (super-chunk sums of
dS) plus the dS_i of tiles i_after(c) .. (g + 1)M − 1, which the program adds as it walks K_g backwards.
M = 1 keeps the per-tile design: one sequential scan kernel storing S at every tile boundary, one
program per query tile, and the per-tile dS written by the linear dq kernel.

Kernels (grid in brackets; H = Hq query heads, Hkv kv heads, NT = ceil(T / BT) tiles, NS states):

* state scan, M = 1: `_state_fwd_kernel` [F-blocks·D-blocks, NSEG, B·H]: exclusive prefix sum over tiles of
  φkᵀ v and of φk, S[c] = Σ_{c' < c} (tile c'), stored for every boundary c: (B·H, NT, F, D), (B·H, NT, F).
  With few (b, h) (B = 1 at long T) the tiles are cut into NSEG segments scanned in parallel: the segments'
  sums first, then each segment's tiles, starting from the sum of the earlier segments' sums.
  M > 1: `_state_local_kernel` [NS, B·H, F-blocks·D-blocks] sums each K_g, and
  `_state_prefix_kernel` [F·D / BE, B·H] turns the sums, in place, into the boundaries P[g] (CH sums per
  step with tl.cumsum, so NS / CH sequential steps).
* `_hybrid_fwd_kernel` [NS, B·H]: per query tile, pass 1 gets the window max c_n (and its key position)
  over key tiles i_first..i, pass 2 sums γ·exp(s − c) (window) and φqᵀφk (linear) into one numerator
  and one denominator, plus φq·S and φq·z; stores y, and for the backward c (base 2), the argmax
  position and the full denominator.
* backward, window terms (a FlashAttention backward): `_bwd_dq_window_kernel` [NT, B·H] gives dq, a
  per-tile partial of dγ, ρ_n (the gradient through c_n, below) and δ_n = dy_n·y_n;
  `_bwd_dkv_window_kernel` [NT, B·Hkv] gives dk and dv (window part plus the linear part the linear
  kernel left), looping over the query heads of its kv head's group and the query tiles that read the
  key tile (GQA without repeating k/v).
* backward, linear terms: `_bwd_dq_linear_kernel` [NS, B·H] gives dφq (in-tile linear keys and
  S g + z h, g = dy / den, h = −δ / den) and, when the state gradients are per tile (M_bwd = 1), the
  tile's gradient w.r.t. the state it read, dS_i = φqᵀ g, dz_i = φqᵀ h.
  M_bwd = 1: `_state_bwd_kernel` [F-blocks·D-blocks, NSEG, B·H] turns them into a reverse inclusive prefix
  sum over tiles, in place (in segments, as the forward scan): R[i] = Σ_{i' >= i} dS_i'; key tile c's state
  gradient is R[i_after(c)];
  `_bwd_dkv_linear_kernel` [NT, B·Hkv] gives dφk and the linear part of dv (in-tile linear keys and the
  state path), summed over the group in registers, into DV_LINEAR (B·Hkv, T, D) fp32.
  M_bwd > 1: `_dstate_local_kernel` [NS, B·H, F-blocks·D-blocks] sums dS over each super-chunk,
  `_state_prefix_kernel` (reverse) gives Σ_{g' > g}, and `_bwd_dkv_linear_carry_kernel` [NS, B·H] walks
  K_g backwards per query head, writing dφk and that head's part of dv into DV_LINEAR (B·H, T, D) fp32
  (the window kernel sums the group).

The window max c_n is part of the model (the linear terms are not rescaled by it), so the gradient
flows through it as through torch.amax in naive.py: with ρ_n = Σ_{m∈W(n)} P_nm dP_nm, the score of
the argmax key a(n) gets −ρ_n on top of P·dP. (On exact ties torch.amax splits −ρ_n evenly; the
kernels give it to the first tied key; exact ties need two keys with bitwise-equal scores.)

All arithmetic is fp32; bf16/fp16 operands feed tl.dot directly on a GPU, and with UPCAST (the CPU
interpreter, which has no bf16 arithmetic) everything is upcast first.
The states and state gradients are summed in fp32 (also when carried in registers) and enter tl.dot as
STATE_DOT: bf16 next to bf16 inputs (as flash-linear-attention does), fp32 otherwise (tf32 for fp16
inputs, whose range a long sum could exceed; "ieee" for fp32 inputs). The host stores S, R and the
super-chunk sums in that dtype too (half the memory traffic): S and R would be rounded before their
dots anyway; the stored sums are rounded before the prefix, which adds them in fp32.

Naming: p_ pointers, b_ blocks, m_ masks, o_ offsets, i_ indices, UPPER constexpr. Exponentials are
base 2: s holds q·k·log2(e)/√D, so exp2(s − c) = exp(q·k/√D − c_n).
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "first_key_tile",
    "key_span",
    "_state_fwd_kernel",
    "_state_local_kernel",
    "_state_prefix_kernel",
    "_hybrid_fwd_kernel",
    "_bwd_dq_window_kernel",
    "_bwd_dq_linear_kernel",
    "_state_bwd_kernel",
    "_dstate_local_kernel",
    "_bwd_dkv_linear_kernel",
    "_bwd_dkv_linear_carry_kernel",
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


@functools.lru_cache(maxsize=4096)  # every call of the public function asks; a Python loop of a few tiles
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


@triton.jit
def _key_tile_after(i_j, BT: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr):
    """i_after(i_j): the first query tile i with i_first(i) > i_j, i.e. the first whose state holds key tile
    i_j (i_first(i_j + KSPAN) > i_j by the definition of KSPAN)."""
    i_after = i_j + 1
    for i_di in tl.static_range(1, KSPAN):
        if _first_key_tile(i_j + i_di, BT, WINDOW, TERRACE) <= i_j:
            i_after = i_j + i_di + 1
    return i_after


@triton.jit
def _key_range(i_g, NT, NS, SUPER: tl.constexpr, BT: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr):
    """K_g = [lo, hi): the key tiles that enter the state while super-chunk g is walked, i.e. between the
    boundaries P[g] and P[g + 1]. The ranges partition 0 .. NT − 1 (the last one runs to NT: its keys
    beyond i_first of the last tile enter no state, but the backward still owes them their in-tile terms)."""
    lo = _first_key_tile(i_g * SUPER, BT, WINDOW, TERRACE)
    hi = _first_key_tile((i_g + 1) * SUPER, BT, WINDOW, TERRACE)
    hi = tl.where(i_g == NS - 1, NT, tl.minimum(hi, NT))
    return lo, hi


@triton.jit
def _fold_key_tiles(b_state, b_z, kf_base, v_base, s_kft, s_vt, i_lo, i_hi, o_f, m_f, o_d, m_d, T,
                    BT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """b_state += Σ φk_cᵀ v_c and b_z += Σ φk_c over key tiles i_lo .. i_hi − 1 (fp32; the feature rows
    o_f and value columns o_d of the block the caller holds)."""
    for i_c in range(i_lo, i_hi):
        o_s = i_c * BT + tl.arange(0, BT)
        m_s = o_s < T
        b_kf = _load_tile(kf_base, s_kft, o_s, m_s, o_f, m_f, UPCAST)
        b_v = _load_tile(v_base, s_vt, o_s, m_s, o_d, m_d, UPCAST)
        b_state += tl.dot(tl.trans(b_kf), b_v, input_precision=PRECISION)
        b_z += tl.sum(b_kf.to(tl.float32), 0)
    return b_state, b_z


@triton.jit
def _add_state_grads(b_dstate, b_dz, qf_base, dy_base, s_qft, s_dyt, DEN, DELTA, row_base, i_lo, i_hi,
                     o_f, m_f, o_d, m_d, T, BT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     STATE_DOT: tl.constexpr):
    """b_dstate += Σ dS_i = φq_iᵀ g_i and b_dz += Σ dz_i = φq_iᵀ h_i over query tiles i_lo .. i_hi − 1
    (g = dy / den, h = −δ / den; padding rows give 0). row_base: the (B·H, T) row offset of the head."""
    for i_i in range(i_lo, i_hi):
        o_t = i_i * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_qf = _load_tile(qf_base, s_qft, o_t, m_t, o_f, m_f, UPCAST)
        b_dy = _load_tile(dy_base, s_dyt, o_t, m_t, o_d, m_d, UPCAST)
        b_inv_den = 1.0 / tl.load(DEN + row_base + o_t, mask=m_t, other=1.0)
        b_h = -tl.load(DELTA + row_base + o_t, mask=m_t, other=0.0) * b_inv_den
        b_g = (b_dy.to(tl.float32) * b_inv_den[:, None]).to(STATE_DOT)
        b_dstate += tl.dot(tl.trans(b_qf.to(STATE_DOT)), b_g, input_precision=PRECISION)
        b_dz += tl.sum(b_qf.to(tl.float32) * b_h[:, None], 0)
    return b_dstate, b_dz


# ----------------------------------------------------------------------------------------------
# Inter-chunk state
# ----------------------------------------------------------------------------------------------


@triton.jit
def _state_fwd_kernel(
    KF, V, S, Z, TS, TZ,
    s_kfb, s_kfh, s_kft, s_vb, s_vh, s_vt,
    T, NT, SCAN, NSEG, HQ, GROUP, D, F,
    BT: tl.constexpr, BFS: tl.constexpr, BDS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STORE_TILES: tl.constexpr, LOAD_START: tl.constexpr,
):
    """M = 1: S[b, h, c] = Σ_{tiles c' < c} φk_c'ᵀ v_c' (one F × D block, summed in fp32, stored in S's
    dtype), Z[b, h, c] = Σ φk in fp32, for every tile boundary c.

    The tiles are scanned in NSEG segments of SCAN tiles, one program each (a single sequential scan over
    NT tiles leaves most of the GPU idle when B·H is small: B = 1 at long T). STORE_TILES = False: the
    program only sums its segment into TS, TZ (fp32, (B·H, NSEG, ·)); STORE_TILES: the program starts from
    the sum of the earlier segments' TS, TZ (LOAD_START; from zero when NSEG = 1) and stores the state at each
    of its tile boundaries. Each program sums the earlier totals itself instead of a prefix kernel running
    between the two launches: a launch costs more host time than these few loads cost the GPU."""
    i_fd, i_seg, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_d_blocks = tl.cdiv(D, BDS)
    i_f, i_d = i_fd // num_d_blocks, i_fd % num_d_blocks
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_f = i_f * BFS + tl.arange(0, BFS)
    o_d = i_d * BDS + tl.arange(0, BDS)
    m_f, m_d = o_f < F, o_d < D
    m_fd = m_f[:, None] & m_d[None, :]
    kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh
    i_lo = i_seg * SCAN
    i_hi = tl.minimum(i_lo + SCAN, NT)
    o_total = (i_bh.to(tl.int64) * NSEG + i_seg) * F
    p_ts = TS + (o_total + o_f[:, None]) * D + o_d[None, :]
    p_tz = TZ + o_total + o_f
    # Pointers to the state of boundary c, advanced each step (loop counters are plain ints in the interpreter).
    p_s = S + (i_bh.to(tl.int64) * NT + i_lo) * F * D + o_f[:, None] * D + o_d[None, :]
    p_z = Z + (i_bh.to(tl.int64) * NT + i_lo) * F + o_f

    b_s = tl.zeros([BFS, BDS], dtype=tl.float32)
    b_z = tl.zeros([BFS], dtype=tl.float32)
    if LOAD_START:
        p_first = TS + (i_bh.to(tl.int64) * NSEG * F + o_f[:, None]) * D + o_d[None, :]
        p_first_z = TZ + i_bh.to(tl.int64) * NSEG * F + o_f
        for i_p in range(0, i_seg):
            b_s += tl.load(p_first + i_p * F * D, mask=m_fd, other=0.0)
            b_z += tl.load(p_first_z + i_p * F, mask=m_f, other=0.0)
    for i_c in range(i_lo, i_hi):
        if STORE_TILES:
            tl.store(p_s, b_s.to(S.dtype.element_ty), mask=m_fd)
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
    if not STORE_TILES:
        tl.store(p_ts, b_s.to(TS.dtype.element_ty), mask=m_fd)
        if i_d == 0:
            tl.store(p_tz, b_z, mask=m_f)


@triton.jit
def _state_bwd_kernel(
    DS, DZ, TS, TZ, NT, SCAN, NSEG, D, F,
    BFS: tl.constexpr, BDS: tl.constexpr, STORE_TILES: tl.constexpr, LOAD_START: tl.constexpr,
):
    """M_bwd = 1, in place: DS[b, h, i] <- Σ_{i' >= i} DS[b, h, i'] (and DZ likewise), summed in fp32.

    In NSEG segments of SCAN tiles, as _state_fwd_kernel: STORE_TILES = False sums each segment into TS, TZ
    (fp32) without writing DS; STORE_TILES writes the segment's suffix sums, starting from the sum of the
    later segments' TS, TZ (LOAD_START)."""
    i_fd, i_seg, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_d_blocks = tl.cdiv(D, BDS)
    i_f, i_d = i_fd // num_d_blocks, i_fd % num_d_blocks
    o_f = i_f * BFS + tl.arange(0, BFS)
    o_d = i_d * BDS + tl.arange(0, BDS)
    m_f, m_d = o_f < F, o_d < D
    m_fd = m_f[:, None] & m_d[None, :]
    i_lo = i_seg * SCAN
    i_hi = tl.minimum(i_lo + SCAN, NT)
    o_total = (i_bh.to(tl.int64) * NSEG + i_seg) * F
    p_ts = TS + (o_total + o_f[:, None]) * D + o_d[None, :]
    p_tz = TZ + o_total + o_f
    # Pointers to the segment's last tile, moved back one tile per step.
    p_ds = DS + (i_bh.to(tl.int64) * NT + i_hi - 1) * F * D + o_f[:, None] * D + o_d[None, :]
    p_dz = DZ + (i_bh.to(tl.int64) * NT + i_hi - 1) * F + o_f

    b_ds = tl.zeros([BFS, BDS], dtype=tl.float32)
    b_dz = tl.zeros([BFS], dtype=tl.float32)
    if LOAD_START:
        p_first = TS + (i_bh.to(tl.int64) * NSEG * F + o_f[:, None]) * D + o_d[None, :]
        p_first_z = TZ + i_bh.to(tl.int64) * NSEG * F + o_f
        for i_p in range(i_seg + 1, NSEG):
            b_ds += tl.load(p_first + i_p * F * D, mask=m_fd, other=0.0)
            b_dz += tl.load(p_first_z + i_p * F, mask=m_f, other=0.0)
    for _ in range(i_lo, i_hi):
        b_ds += tl.load(p_ds, mask=m_fd, other=0.0).to(tl.float32)
        if i_d == 0:
            b_dz += tl.load(p_dz, mask=m_f, other=0.0)
        if STORE_TILES:
            tl.store(p_ds, b_ds.to(DS.dtype.element_ty), mask=m_fd)
            if i_d == 0:
                tl.store(p_dz, b_dz, mask=m_f)
        p_ds -= F * D
        p_dz -= F
    if not STORE_TILES:
        tl.store(p_ts, b_ds.to(TS.dtype.element_ty), mask=m_fd)
        if i_d == 0:
            tl.store(p_tz, b_dz, mask=m_f)


@triton.jit
def _state_local_kernel(
    KF, V, S, Z,
    s_kfb, s_kfh, s_kft, s_vb, s_vh, s_vt,
    T, NT, NS, HQ, GROUP, D, F,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, SUPER: tl.constexpr,
    BT: tl.constexpr, BFS: tl.constexpr, BDS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """M > 1, first level of the state scan: S[b, h, g] = Σ_{c ∈ K_g} φk_cᵀ v_c (one F × D block, summed
    in fp32, stored in S's dtype), Z[b, h, g] = Σ φk in fp32."""
    i_g, i_bh, i_fd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_d_blocks = tl.cdiv(D, BDS)
    i_f, i_d = i_fd // num_d_blocks, i_fd % num_d_blocks
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_f = i_f * BFS + tl.arange(0, BFS)
    o_d = i_d * BDS + tl.arange(0, BDS)
    m_f, m_d = o_f < F, o_d < D
    kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh

    i_lo, i_hi = _key_range(i_g, NT, NS, SUPER, BT, WINDOW, TERRACE)
    b_s = tl.zeros([BFS, BDS], dtype=tl.float32)
    b_z = tl.zeros([BFS], dtype=tl.float32)
    b_s, b_z = _fold_key_tiles(b_s, b_z, kf_base, v_base, s_kft, s_vt, i_lo, i_hi, o_f, m_f, o_d, m_d, T,
                               BT, UPCAST, PRECISION)
    o_state = (i_bh.to(tl.int64) * NS + i_g) * F
    tl.store(S + (o_state + o_f[:, None]) * D + o_d[None, :], b_s.to(S.dtype.element_ty),
             mask=m_f[:, None] & m_d[None, :])
    if i_d == 0:
        tl.store(Z + o_state + o_f, b_z, mask=m_f)


@triton.jit
def _dstate_local_kernel(
    QF, DY, DEN, DELTA, DS, DZ,
    s_qfb, s_qfh, s_qft, s_dyb, s_dyh, s_dyt,
    T, NT, NS, HQ, D, F,
    SUPER: tl.constexpr, BT: tl.constexpr, BFS: tl.constexpr, BDS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT: tl.constexpr,
):
    """M > 1, first level of the reverse scan: DS[b, h, g] = Σ over the query tiles i of super-chunk g of
    dS_i = φq_iᵀ g_i (one F × D block, fp32 sum, stored in DS's dtype), DZ likewise with h, fp32."""
    i_g, i_bh, i_fd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_d_blocks = tl.cdiv(D, BDS)
    i_f, i_d = i_fd // num_d_blocks, i_fd % num_d_blocks
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_f = i_f * BFS + tl.arange(0, BFS)
    o_d = i_d * BDS + tl.arange(0, BDS)
    m_f, m_d = o_f < F, o_d < D
    qf_base = QF + i_b.to(tl.int64) * s_qfb + i_h.to(tl.int64) * s_qfh
    dy_base = DY + i_b.to(tl.int64) * s_dyb + i_h.to(tl.int64) * s_dyh

    b_ds = tl.zeros([BFS, BDS], dtype=tl.float32)
    b_dz = tl.zeros([BFS], dtype=tl.float32)
    b_ds, b_dz = _add_state_grads(b_ds, b_dz, qf_base, dy_base, s_qft, s_dyt, DEN, DELTA, i_bh.to(tl.int64) * T,
                                  i_g * SUPER, tl.minimum(i_g * SUPER + SUPER, NT), o_f, m_f, o_d, m_d, T,
                                  BT, UPCAST, PRECISION, STATE_DOT)
    o_state = (i_bh.to(tl.int64) * NS + i_g) * F
    tl.store(DS + (o_state + o_f[:, None]) * D + o_d[None, :], b_ds.to(DS.dtype.element_ty),
             mask=m_f[:, None] & m_d[None, :])
    if i_d == 0:
        tl.store(DZ + o_state + o_f, b_dz, mask=m_f)


@triton.jit
def _prefix_rows(P, row0, NS, N, o_e, m_e, REVERSE: tl.constexpr, CH: tl.constexpr, BE: tl.constexpr):
    """In place over rows row0 .. row0 + NS − 1 of the (·, N) matrix P, columns o_e: exclusive prefix
    sum down the rows (REVERSE: up), fp32, CH rows per step (one tl.cumsum each)."""
    b_carry = tl.zeros([BE], dtype=tl.float32)
    for i_c in range(0, tl.cdiv(NS, CH)):
        o_k = i_c * CH + tl.arange(0, CH)  # position in scan order
        if REVERSE:
            o_g = NS - 1 - o_k
        else:
            o_g = o_k
        p = P + (row0 + o_g.to(tl.int64))[:, None] * N + o_e[None, :]
        m = (o_k < NS)[:, None] & m_e[None, :]
        b_x = tl.load(p, mask=m, other=0.0).to(tl.float32)
        b_inclusive = tl.cumsum(b_x, 0)
        tl.store(p, (b_carry[None, :] + (b_inclusive - b_x)).to(P.dtype.element_ty), mask=m)
        b_carry += tl.sum(b_x, 0)


@triton.jit
def _state_prefix_kernel(
    S, Z, NS, D, F,
    REVERSE: tl.constexpr, CH: tl.constexpr, BE: tl.constexpr,
):
    """M > 1, second level, in place over the NS sums of one (b, h), BE elements of the flattened F × D
    state per program: S[g] <- Σ_{g' < g} S[g'] (REVERSE: Σ_{g' > g}), exclusive, summed in fp32;
    Z likewise (by the programs whose elements start below F). CH sums per step, so the sequential
    part is NS / CH steps."""
    i_e, i_bh = tl.program_id(0), tl.program_id(1)
    o_e = i_e * BE + tl.arange(0, BE)
    row0 = i_bh.to(tl.int64) * NS
    _prefix_rows(S, row0, NS, F * D, o_e, o_e < F * D, REVERSE, CH, BE)
    if i_e * BE < F:
        _prefix_rows(Z, row0, NS, F, o_e, o_e < F, REVERSE, CH, BE)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_direct_keys(
    b_q, b_qf, b_gamma, k_base, v_base, kf_base, s_kt, s_vt, s_kft,
    i_t, o_t, m_t, o_d, m_d, o_f, m_f, T, qk_scale,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Query tile i_t against its key tiles i_first .. i_t. Returns the numerator (BT × BD) and the
    denominator (BT) of the window and in-tile linear keys, the window max c (base 2) and its position."""
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
    return b_acc, b_den, b_c, b_arg


@triton.jit
def _fwd_store(y_base, s_yt, C, ARG, DEN, row_base, o_t, m_t, o_d, m_d, b_acc, b_den, b_c, b_arg):
    _store_tile(y_base, s_yt, o_t, m_t, o_d, m_d, b_acc / b_den[:, None])
    tl.store(C + row_base + o_t, b_c, mask=m_t)
    tl.store(ARG + row_base + o_t, b_arg, mask=m_t)
    tl.store(DEN + row_base + o_t, b_den, mask=m_t)


@triton.jit
def _hybrid_fwd_kernel(
    Q, K, V, QF, KF, GAMMA, S, Z, Y, C, ARG, DEN,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    s_qfb, s_qfh, s_qft, s_kfb, s_kfh, s_kft, s_yb, s_yh, s_yt,
    T, NT, NS, HQ, GROUP, D, F, qk_scale,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr, SUPER: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT: tl.constexpr,
):
    """The SUPER query tiles of super-chunk g of one query head: y (B, H, T, D); C = c_n·log2(e),
    DEN (B·H, T) fp32 and ARG (B·H, T) int32, the position of the window max. S, Z: the states at every
    tile boundary (SUPER = 1, (B·H, NT, ·)) or the super-chunk boundaries P[g] (SUPER > 1, (B·H, NS, ·))."""
    i_g, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF)
    m_d, m_f = o_d < D, o_f < F
    q_base = Q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    qf_base = QF + i_b.to(tl.int64) * s_qfb + i_h.to(tl.int64) * s_qfh
    k_base = K + i_b.to(tl.int64) * s_kb + i_hk.to(tl.int64) * s_kh
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh
    kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh
    y_base = Y + i_b.to(tl.int64) * s_yb + i_h.to(tl.int64) * s_yh
    row_base = i_bh.to(tl.int64) * T
    b_gamma = tl.load(GAMMA + i_h).to(tl.float32)

    if SUPER == 1:
        # One tile; its state S[i_first] is loaded after the window passes (fewer live registers).
        i_t = i_g
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_q = _load_tile(q_base, s_qt, o_t, m_t, o_d, m_d, UPCAST)
        b_qf = _load_tile(qf_base, s_qft, o_t, m_t, o_f, m_f, UPCAST)
        b_acc, b_den, b_c, b_arg = _fwd_direct_keys(
            b_q, b_qf, b_gamma, k_base, v_base, kf_base, s_kt, s_vt, s_kft, i_t, o_t, m_t, o_d, m_d, o_f, m_f,
            T, qk_scale, WINDOW, TERRACE, KSPAN, BT, BD, UPCAST, PRECISION)
        # The linear state over all keys before tile i_first (empty when i_first == 0).
        i_first = _first_key_tile(i_t, BT, WINDOW, TERRACE)
        if i_first > 0:
            o_state = (i_bh.to(tl.int64) * NS + i_first) * F
            b_state = tl.load(S + (o_state + o_f[:, None]) * D + o_d[None, :],
                              mask=m_f[:, None] & m_d[None, :], other=0.0)
            b_z = tl.load(Z + o_state + o_f, mask=m_f, other=0.0)
            b_acc += tl.dot(b_qf.to(STATE_DOT), b_state.to(STATE_DOT), input_precision=PRECISION)
            b_den += tl.sum(b_qf.to(tl.float32) * b_z[None, :], 1)
        _fwd_store(y_base, s_yt, C, ARG, DEN, row_base, o_t, m_t, o_d, m_d, b_acc, b_den, b_c, b_arg)
    else:
        # The boundary state P[g], then per tile the key tiles that left the window, in fp32 registers.
        o_state = (i_bh.to(tl.int64) * NS + i_g) * F
        b_state = tl.load(S + (o_state + o_f[:, None]) * D + o_d[None, :],
                          mask=m_f[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_z = tl.load(Z + o_state + o_f, mask=m_f, other=0.0)
        i_t0 = i_g * SUPER
        for i_m in range(0, tl.minimum(SUPER, NT - i_t0)):
            i_t = i_t0 + i_m
            o_t = i_t * BT + tl.arange(0, BT)
            m_t = o_t < T
            b_q = _load_tile(q_base, s_qt, o_t, m_t, o_d, m_d, UPCAST)
            b_qf = _load_tile(qf_base, s_qft, o_t, m_t, o_f, m_f, UPCAST)
            b_acc, b_den, b_c, b_arg = _fwd_direct_keys(
                b_q, b_qf, b_gamma, k_base, v_base, kf_base, s_kt, s_vt, s_kft, i_t, o_t, m_t, o_d, m_d, o_f,
                m_f, T, qk_scale, WINDOW, TERRACE, KSPAN, BT, BD, UPCAST, PRECISION)
            b_state, b_z = _fold_key_tiles(
                b_state, b_z, kf_base, v_base, s_kft, s_vt,
                _first_key_tile(tl.maximum(i_t - 1, i_t0), BT, WINDOW, TERRACE),
                _first_key_tile(i_t, BT, WINDOW, TERRACE), o_f, m_f, o_d, m_d, T, BT, UPCAST, PRECISION)
            b_acc += tl.dot(b_qf.to(STATE_DOT), b_state.to(STATE_DOT), input_precision=PRECISION)
            b_den += tl.sum(b_qf.to(tl.float32) * b_z[None, :], 1)
            _fwd_store(y_base, s_yt, C, ARG, DEN, row_base, o_t, m_t, o_d, m_d, b_acc, b_den, b_c, b_arg)


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
# Launch order: dq_window (writes δ and ρ), the state scan (recomputed), dq_linear (and the per-tile dS
# when M_bwd = 1), the reverse scan of dS, dkv_linear (writes dv's linear part), dkv_window (adds its part).


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
def _dq_linear_direct(
    b_dy, b_inv_den, b_h, v_base, kf_base, s_vt, s_kft, i_t, o_t, o_d, m_d, o_f, m_f, T,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dφq of query tile i_t from the linear keys of its key tiles i_first .. i_t (BT × BF, fp32)."""
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
    return b_dqf


@triton.jit
def _store_tile_dstate(
    DS, DZ, qf_base, s_qft, b_g, b_h, o_tile, o_t, m_t, o_d, m_d, D, F,
    BF: tl.constexpr, BFS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT: tl.constexpr,
):
    """dS_i = φqᵀ g and dz_i = φqᵀ h of one query tile at DS/DZ offset o_tile (= (b·h·NT + i)·F), BFS
    features at a time (an F × D fp32 block at once would spill registers next to the dφq accumulator)."""
    for i_fs in tl.static_range(BF // BFS):
        o_fs = i_fs * BFS + tl.arange(0, BFS)
        m_fs = o_fs < F
        b_qf_part = _load_tile(qf_base, s_qft, o_t, m_t, o_fs, m_fs, UPCAST)
        b_dstate = tl.dot(tl.trans(b_qf_part.to(STATE_DOT)), b_g, input_precision=PRECISION)
        tl.store(DS + (o_tile + o_fs[:, None]) * D + o_d[None, :], b_dstate.to(DS.dtype.element_ty),
                 mask=m_fs[:, None] & m_d[None, :])
        tl.store(DZ + o_tile + o_fs, tl.sum(b_qf_part.to(tl.float32) * b_h[:, None], 0), mask=m_fs)


@triton.jit
def _bwd_dq_linear_kernel(
    V, QF, KF, S, Z, DY, DEN, DELTA,
    DQF, DS, DZ,
    s_vb, s_vh, s_vt, s_qfb, s_qfh, s_qft, s_kfb, s_kfh, s_kft, s_dyb, s_dyh, s_dyt, s_dqfb, s_dqfh, s_dqft,
    T, NT, NS, HQ, GROUP, D, F,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr, SUPER: tl.constexpr,
    WRITE_DSTATE: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BFS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT: tl.constexpr,
):
    """The SUPER query tiles of super-chunk g of one query head, linear terms: dφq (in-tile linear keys
    and the state, S and Z laid out as in the forward), and with WRITE_DSTATE (per-tile state gradients,
    M_bwd = 1) DS/DZ[b·h, i] = the gradient w.r.t. the state tile i read (zero use when i_first = 0)."""
    i_g, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF)
    m_d, m_f = o_d < D, o_f < F
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh
    kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh
    qf_base = QF + i_b.to(tl.int64) * s_qfb + i_h.to(tl.int64) * s_qfh
    dy_base = DY + i_b.to(tl.int64) * s_dyb + i_h.to(tl.int64) * s_dyh
    dqf_base = DQF + i_b.to(tl.int64) * s_dqfb + i_h.to(tl.int64) * s_dqfh
    row_base = i_bh.to(tl.int64) * T

    if SUPER == 1:
        i_t = i_g
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_dy = _load_tile(dy_base, s_dyt, o_t, m_t, o_d, m_d, UPCAST)
        b_inv_den = 1.0 / tl.load(DEN + row_base + o_t, mask=m_t, other=1.0)
        b_h = -tl.load(DELTA + row_base + o_t, mask=m_t, other=0.0) * b_inv_den
        b_dqf = _dq_linear_direct(b_dy, b_inv_den, b_h, v_base, kf_base, s_vt, s_kft, i_t, o_t, o_d, m_d, o_f, m_f,
                                  T, WINDOW, TERRACE, KSPAN, BT, BF, UPCAST, PRECISION)
        b_g = (b_dy.to(tl.float32) * b_inv_den[:, None]).to(STATE_DOT)
        i_first = _first_key_tile(i_t, BT, WINDOW, TERRACE)
        if i_first > 0:
            o_state = (i_bh.to(tl.int64) * NS + i_first) * F
            b_state = tl.load(S + (o_state + o_f[:, None]) * D + o_d[None, :],
                              mask=m_f[:, None] & m_d[None, :], other=0.0).to(STATE_DOT)
            b_z = tl.load(Z + o_state + o_f, mask=m_f, other=0.0)
            b_dqf += tl.dot(b_g, tl.trans(b_state), input_precision=PRECISION)
            b_dqf += b_h[:, None] * b_z[None, :]
        _store_tile(dqf_base, s_dqft, o_t, m_t, o_f, m_f, b_dqf)
        if WRITE_DSTATE:
            _store_tile_dstate(DS, DZ, qf_base, s_qft, b_g, b_h, (i_bh.to(tl.int64) * NT + i_t) * F, o_t, m_t,
                               o_d, m_d, D, F, BF, BFS, UPCAST, PRECISION, STATE_DOT)
    else:
        # As the forward: the boundary state P[g], then the key tiles that leave the window, in registers.
        o_state = (i_bh.to(tl.int64) * NS + i_g) * F
        b_state = tl.load(S + (o_state + o_f[:, None]) * D + o_d[None, :],
                          mask=m_f[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_z = tl.load(Z + o_state + o_f, mask=m_f, other=0.0)
        i_t0 = i_g * SUPER
        for i_m in range(0, tl.minimum(SUPER, NT - i_t0)):
            i_t = i_t0 + i_m
            o_t = i_t * BT + tl.arange(0, BT)
            m_t = o_t < T
            b_dy = _load_tile(dy_base, s_dyt, o_t, m_t, o_d, m_d, UPCAST)
            b_inv_den = 1.0 / tl.load(DEN + row_base + o_t, mask=m_t, other=1.0)
            b_h = -tl.load(DELTA + row_base + o_t, mask=m_t, other=0.0) * b_inv_den
            b_dqf = _dq_linear_direct(b_dy, b_inv_den, b_h, v_base, kf_base, s_vt, s_kft, i_t, o_t, o_d, m_d, o_f,
                                      m_f, T, WINDOW, TERRACE, KSPAN, BT, BF, UPCAST, PRECISION)
            b_state, b_z = _fold_key_tiles(
                b_state, b_z, kf_base, v_base, s_kft, s_vt,
                _first_key_tile(tl.maximum(i_t - 1, i_t0), BT, WINDOW, TERRACE),
                _first_key_tile(i_t, BT, WINDOW, TERRACE), o_f, m_f, o_d, m_d, T, BT, UPCAST, PRECISION)
            b_g = (b_dy.to(tl.float32) * b_inv_den[:, None]).to(STATE_DOT)
            b_dqf += tl.dot(b_g, tl.trans(b_state.to(STATE_DOT)), input_precision=PRECISION)
            b_dqf += b_h[:, None] * b_z[None, :]
            _store_tile(dqf_base, s_dqft, o_t, m_t, o_f, m_f, b_dqf)
            if WRITE_DSTATE:
                _store_tile_dstate(DS, DZ, qf_base, s_qft, b_g, b_h, (i_bh.to(tl.int64) * NT + i_t) * F, o_t, m_t,
                                   o_d, m_d, D, F, BF, BFS, UPCAST, PRECISION, STATE_DOT)


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
    """M_bwd = 1: one key tile of one kv head, linear terms: dφk of every query head of the group, and dv's
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
def _bwd_dkv_linear_carry_kernel(
    V, QF, KF, DY, DEN, DELTA, R, RZ,
    DV_LINEAR, DKF,
    s_vb, s_vh, s_vt, s_qfb, s_qfh, s_qft, s_kfb, s_kfh, s_kft, s_dyb, s_dyh, s_dyt,
    s_dkfb, s_dkfh, s_dkft,
    T, NT, NS, HQ, GROUP, D, F,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr, SUPER: tl.constexpr,
    BT: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT: tl.constexpr,
):
    """M > 1: the key tiles K_g of one query head, walked backwards with the state gradient in registers:
    dφk, and this head's part of dv's linear terms into DV_LINEAR (B·H, T, D) fp32 (the window kernel sums
    the group; one carry per query head would not fit in registers). R/RZ[b·h, g] = Σ_{g' > g} of the
    super-chunk sums of dS, dz."""
    i_g, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // GROUP
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF)
    m_d, m_f = o_d < D, o_f < F
    v_base = V + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh
    qf_base = QF + i_b.to(tl.int64) * s_qfb + i_h.to(tl.int64) * s_qfh
    dy_base = DY + i_b.to(tl.int64) * s_dyb + i_h.to(tl.int64) * s_dyh
    kf_base = KF + i_b.to(tl.int64) * s_kfb + i_h.to(tl.int64) * s_kfh
    dkf_base = DKF + i_b.to(tl.int64) * s_dkfb + i_h.to(tl.int64) * s_dkfh
    row_base = i_bh.to(tl.int64) * T

    o_state = (i_bh.to(tl.int64) * NS + i_g) * F
    b_dstate = tl.load(R + (o_state + o_f[:, None]) * D + o_d[None, :],
                       mask=m_f[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_dz = tl.load(RZ + o_state + o_f, mask=m_f, other=0.0)
    # On entry the carry holds the dS_i of the query tiles >= i_end (those after this super-chunk).
    i_end = tl.minimum(i_g * SUPER + SUPER, NT)
    i_lo, i_hi = _key_range(i_g, NT, NS, SUPER, BT, WINDOW, TERRACE)
    for i_back in range(0, i_hi - i_lo):
        i_j = i_hi - 1 - i_back
        # Key tile i_j is in the state of the query tiles from i_after on; add the ones not yet carried, i.e.
        # those before i_after of the key tile walked before (i_after is non-decreasing in the key tile).
        # Recomputed, not carried: Triton 3.6 and 3.7's TritonGPURemoveLayoutConversions pass drops a scalar
        # carried by this loop next to the two tensors (the compiled loop read i_end every time, re-adding dS_i:
        # wrong dv and dφk on the GPU, right in the interpreter; TRITON.md).
        i_after = _key_tile_after(i_j, BT, WINDOW, TERRACE, KSPAN)
        i_carried_from = tl.where(i_back == 0, i_end,
                                  tl.minimum(i_end, _key_tile_after(i_j + 1, BT, WINDOW, TERRACE, KSPAN)))
        b_dstate, b_dz = _add_state_grads(b_dstate, b_dz, qf_base, dy_base, s_qft, s_dyt, DEN, DELTA, row_base,
                                          i_after, i_carried_from, o_f, m_f, o_d, m_d, T, BT, UPCAST, PRECISION,
                                          STATE_DOT)

        o_s = i_j * BT + tl.arange(0, BT)
        m_s = o_s < T
        b_v = _load_tile(v_base, s_vt, o_s, m_s, o_d, m_d, UPCAST)
        b_kf = _load_tile(kf_base, s_kft, o_s, m_s, o_f, m_f, UPCAST)
        b_dkf = tl.zeros([BT, BF], dtype=tl.float32)
        b_dv = tl.zeros([BT, BD], dtype=tl.float32)
        # Query tiles that read this key tile directly and hold linear keys in it.
        for i_di in tl.static_range(KSPAN):
            i_t = i_j + i_di
            if i_t < NT:
                if (_first_key_tile(i_t, BT, WINDOW, TERRACE) <= i_j) & (
                        i_j * BT < _last_window_start(i_t, T, BT, WINDOW, TERRACE)):
                    for i_q in tl.static_range(BT // BQ):
                        o_t = i_t * BT + i_q * BQ + tl.arange(0, BQ)
                        m_t = o_t < T
                        b_qf = _load_tile(qf_base, s_qft, o_t, m_t, o_f, m_f, UPCAST)
                        b_dy = _load_tile(dy_base, s_dyt, o_t, m_t, o_d, m_d, UPCAST)
                        b_inv_den = 1.0 / tl.load(DEN + row_base + o_t, mask=m_t, other=1.0)
                        b_h = -tl.load(DELTA + row_base + o_t, mask=m_t, other=0.0) * b_inv_den
                        m_win, m_lin = _window_and_linear_masks(o_t, o_s, WINDOW, TERRACE)
                        b_p = tl.where(m_lin, tl.dot(b_qf, tl.trans(b_kf), input_precision=PRECISION), 0.0)
                        b_dp = tl.dot(b_dy, tl.trans(b_v), input_precision=PRECISION) * b_inv_den[:, None]
                        b_dp = tl.where(m_lin, b_dp + b_h[:, None], 0.0)
                        b_dkf += tl.dot(tl.trans(b_dp).to(b_qf.dtype), b_qf, input_precision=PRECISION)
                        b_g = (b_dy.to(tl.float32) * b_inv_den[:, None]).to(b_dy.dtype)
                        b_dv += tl.dot(tl.trans(b_p).to(b_dy.dtype), b_g, input_precision=PRECISION)
        # State path: dφk_m += dU v_m + dz, dv_m += dUᵀ φk_m with dU = the carried R(i_j).
        b_dstate_dot = b_dstate.to(STATE_DOT)
        b_dkf += tl.dot(b_v.to(STATE_DOT), tl.trans(b_dstate_dot), input_precision=PRECISION) + b_dz[None, :]
        b_dv += tl.dot(b_kf.to(STATE_DOT), b_dstate_dot, input_precision=PRECISION)
        _store_tile(dkf_base, s_dkft, o_s, m_s, o_f, m_f, b_dkf)
        p_dv = DV_LINEAR + i_bh.to(tl.int64) * T * D + (o_s[:, None] * D + o_d[None, :])
        tl.store(p_dv, b_dv, mask=m_s[:, None] & m_d[None, :])


@triton.jit
def _bwd_dkv_window_kernel(
    Q, K, V, GAMMA, DY, C, ARG, DEN, DELTA, RHO, DV_LINEAR,
    DK, DV,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_dyb, s_dyh, s_dyt,
    s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt,
    T, NT, HQ, GROUP, D, qk_scale, sm_scale,
    WINDOW: tl.constexpr, TERRACE: tl.constexpr, KSPAN: tl.constexpr,
    BT: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr, DV_PER_HEAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key tile of one kv head, window terms: dk and dv (summed over the query heads of the group
    in registers, plus the linear kernel's part: DV_LINEAR (B·Hkv, T, D) fp32, or with DV_PER_HEAD one
    part per query head, (B·H, T, D) fp32, summed here)."""
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
        if DV_PER_HEAD:
            p_dv_linear = DV_LINEAR + i_bh.to(tl.int64) * T * D + (o_s[:, None] * D + o_d[None, :])
            b_dv += tl.load(p_dv_linear, mask=m_s[:, None] & m_d[None, :], other=0.0)
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

    if not DV_PER_HEAD:
        p_dv_linear = DV_LINEAR + i_bk.to(tl.int64) * T * D + (o_s[:, None] * D + o_d[None, :])
        b_dv += tl.load(p_dv_linear, mask=m_s[:, None] & m_d[None, :], other=0.0)
    _store_tile(DK + i_b.to(tl.int64) * s_dkb + i_hk.to(tl.int64) * s_dkh, s_dkt, o_s, m_s, o_d, m_d, b_dk * sm_scale)
    _store_tile(DV + i_b.to(tl.int64) * s_dvb + i_hk.to(tl.int64) * s_dvh, s_dvt, o_s, m_s, o_d, m_d, b_dv)
