"""Pieces of HyperAttention shared by every implementation: input checks, sortLSH hashing, the causal
schedule, the random plan and the LSH block partition.

Every implementation (naive.py, torch_path.py, triton_fwd.py) computes the *same estimator* from the
same `HyperPlan`, so they can be held equal in tests. The math is in README.md next to this file.

Shapes: B batch, Hq query heads, Hkv key/value heads (query head h reads kv head h // (Hq // Hkv),
as Hugging Face `repeat_kv`), T tokens, D head dim, r hyperplanes, m samples, S sub-problems of one
recursion level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "BACKENDS",
    "CausalSchedule",
    "HyperPlan",
    "block_starts",
    "check_hyper_inputs",
    "draw_plan",
    "gray_rank",
    "lsh_codes",
    "num_lsh_blocks",
]

BACKENDS = ("auto", "torch", "triton")
MAX_LSH_PROJS = 24  # 2^24 buckets is far beyond any sequence we sort; also keeps codes in int32


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_hyper_inputs(q, k, v, *, causal, block_size, sample_size, lsh_num_projs, min_seq_len, scale,
                       seed, generator, backend) -> None:
    """Raise ValueError naming the argument, its value and the fix, for anything hyper_attention rejects."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B, H, T, D), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D) (4 dims), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (bq, hq, tq, dq), (bk, hk, tk, dk), (bv, hv, tv, _) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise ValueError(f"q, k, v must share the batch size, got {bq}, {bk}, {bv}")
    if dq != dk:
        raise ValueError(f"q and k must share the head dim D, got q {dq} and k {dk}")
    if (hk, tk) != (hv, tv):
        raise ValueError(f"k and v must have the same heads and tokens, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the query heads ({hq}) must be a multiple of the key/value heads ({hk}) (GQA)")
    if tq == 0 or tk == 0:
        raise ValueError(f"q and k need at least one token, got T_q={tq}, T_k={tk}")
    if causal and tq != tk:
        raise ValueError(f"causal=True needs as many queries as keys (self-attention prefill), got T_q={tq} and "
                         f"T_k={tk}; use exact attention over the cache for decode steps")
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a positive int (e.g. 256), got {block_size!r}")
    if not _is_int(sample_size) or sample_size < 0:
        raise ValueError(f"sample_size must be an int >= 0 (0 turns sampling off; e.g. 256), got {sample_size!r}")
    if not _is_int(lsh_num_projs) or not 1 <= lsh_num_projs <= MAX_LSH_PROJS:
        raise ValueError(f"lsh_num_projs must be an int in [1, {MAX_LSH_PROJS}] (e.g. 7), got {lsh_num_projs!r}")
    if not _is_int(min_seq_len) or min_seq_len < 1:
        raise ValueError(f"min_seq_len must be a positive int (e.g. 4096), got {min_seq_len!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None (1/sqrt(D)), got {scale!r}")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# ----------------------------------------------------------------------------------------------
# sortLSH: r random hyperplanes, sign bits, bucket ranked along the reflected Gray code
# ----------------------------------------------------------------------------------------------


def gray_rank(bucket: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Position of each bucket id in the reflected Gray sequence g(p) = p ^ (p >> 1).

    Sorting by this rank puts buckets that differ in exactly one hyperplane next to each other. It is
    the inverse Gray code (prefix XOR of the bits from the top), not g(bucket): sorting by g(bucket)
    is the inverted order of the public code (reference §3.1).
    """
    rank = bucket.clone()
    shift = 1
    while shift < num_bits:
        rank ^= rank >> shift
        shift *= 2
    return rank


def lsh_codes(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, T) int32 sort key: Gray rank of the sign pattern of x @ projections (D, r).

    Angular LSH is scale-invariant, so the projection runs in x's dtype (no fp32 copy of x).
    """
    num_bits = projections.shape[1]
    bits = torch.matmul(x, projections.to(dtype=x.dtype, device=x.device)) > 0  # (B, H, T, r)
    weights = torch.pow(2, torch.arange(num_bits, device=x.device, dtype=torch.int32))
    bucket = (bits.to(torch.int32) * weights).sum(-1, dtype=torch.int32)
    return gray_rank(bucket, num_bits)


# ----------------------------------------------------------------------------------------------
# LSH blocks: sorted positions cut into equal (±1) blocks
# ----------------------------------------------------------------------------------------------


def num_lsh_blocks(num_keys: int, block_size: int) -> int:
    """Number of blocks nb = ceil(T_k / block_size); both queries and keys are cut into nb blocks."""
    return -(-num_keys // block_size)


def block_starts(length: int, num_blocks: int) -> list[int]:
    """First sorted position of each of the num_blocks blocks of `length` positions, plus `length`.

    Position p belongs to block p * nb // length, so block sizes differ by at most one and none is
    empty when nb <= length. Balanced blocks need no padding keys at all (the public code pads the last
    block with zero keys, whose logit 0 leaks softmax mass, reference §7.2 item 5).
    """
    return [-(-j * length // num_blocks) for j in range(num_blocks + 1)]


# ----------------------------------------------------------------------------------------------
# Causal schedule and the random plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CausalSchedule:
    """The causal recursion, flattened into levels.

    A causal block longer than min_seq_len is split in halves: the two diagonal halves recurse and the
    off-diagonal half (second-half queries against first-half keys, all in the past) is approximated
    without a mask. Padding the sequence to padded_len = leaf_len * 2^num_levels makes every split even,
    so level l has 2^l equal sub-problems of half length padded_len / 2^(l+1), processed as one batch.
    Padded tokens sit after every real token: a real query never sees a padded key (causal masks hide
    them in the leaves; an off-diagonal block contains a padded key only if all its queries are padded).
    """

    seq_len: int
    padded_len: int
    num_levels: int
    leaf_len: int

    @classmethod
    def build(cls, seq_len: int, min_seq_len: int) -> "CausalSchedule":
        num_levels = 0
        while -(-seq_len // (1 << num_levels)) > min_seq_len:
            num_levels += 1
        leaf_len = -(-seq_len // (1 << num_levels))
        return cls(seq_len, leaf_len << num_levels, num_levels, leaf_len)

    def half_len(self, level: int) -> int:
        """Queries (= keys) of each off-diagonal sub-problem at this level."""
        return self.padded_len >> (level + 1)

    def num_sub(self, level: int) -> int:
        return 1 << level


@dataclass
class HyperPlan:
    """Every random choice of one hyper_attention call.

    projections: (D, r) float32 Gaussian hyperplanes, shared by q and k, all heads and all levels.
    samples: one (B, Hq, S, m) int64 tensor per approximated level (one level, S = 1, when non-causal):
        uniform positions, with replacement, in the *sorted key order* of the sub-problem; sorted
        position p is in LSH block p * nb // T_k. Empty list: everything is exact.
    schedule: the causal schedule (None when non-causal).
    """

    projections: torch.Tensor
    samples: list[torch.Tensor]
    schedule: CausalSchedule | None
    approximate: bool


def draw_plan(q: torch.Tensor, k: torch.Tensor, *, causal: bool, block_size: int, sample_size: int,
              lsh_num_projs: int, min_seq_len: int, seed: int | None,
              generator: torch.Generator | None) -> HyperPlan:
    """Draw the hyperplanes and samples in a fixed order, so equal seeds give equal plans everywhere."""
    if seed is not None:
        generator = torch.Generator(device=q.device).manual_seed(seed)
    draw_device = generator.device if generator is not None else q.device
    projections = torch.randn(q.shape[-1], lsh_num_projs, generator=generator, device=draw_device,
                              dtype=torch.float32).to(q.device)
    batch, heads_q = q.shape[0], q.shape[1]

    def draw_samples(num_keys: int, num_sub: int) -> torch.Tensor:
        # One set per (batch, query head, sub-problem), shared by that head's queries: a dense T x m matmul.
        return torch.randint(0, num_keys, (batch, heads_q, num_sub, sample_size), generator=generator,
                             device=draw_device).to(q.device)

    if not causal:
        num_keys = k.shape[2]
        approximate = num_keys > min_seq_len
        samples = [draw_samples(num_keys, 1)] if approximate and sample_size > 0 else []
        return HyperPlan(projections, samples, None, approximate)
    schedule = CausalSchedule.build(q.shape[2], min_seq_len)
    samples = []
    if sample_size > 0:
        samples = [draw_samples(schedule.half_len(level), schedule.num_sub(level))
                   for level in range(schedule.num_levels)]
    return HyperPlan(projections, samples, schedule, schedule.num_levels > 0)
