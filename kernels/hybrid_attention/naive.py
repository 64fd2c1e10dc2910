"""Pure-PyTorch ground truth of the LoLCATs hybrid attention (exact softmax window + linear tail).

Owns three implementations of the same function, which the tests hold equal, plus plain softmax and
linear attention references:

* `quadratic_hybrid_attention`: masked T×T, the definition (see README.md next to this file);
* `chunked_hybrid_attention`: O(T) time and memory, chunks of the window size, differentiable;
* `recurrent_hybrid_step` / `prefill_hybrid_state`: decoding with a constant-size `HybridState`.

Shapes: B batch, Hq query heads, Hkv key/value heads (GQA: query head h reads kv head
h // (Hq // Hkv), as Hugging Face `repeat_kv`), T tokens, D head dim, F feature dim of φ.
Inputs are post-RoPE; the feature maps are applied by the caller (k features per *query* head).
All math runs in fp32 (fp64 if given fp64) and the output is cast to q.dtype. γ is the mixing value
in (0, 1), i.e. sigmoid of the stored logit; it is not range-checked because that would force a
device sync.

Window kinds, window size w, block of a position b(i) = i // w (blocks aligned to position 0):

* "sliding": W(n) = {i : n − w < i ≤ n},               Λ(n) = {i : i ≤ n − w}
* "terrace": W(n) = {i ≤ n : b(i) ≥ b(n) − 1},          Λ(n) = {i : b(i) ≤ b(n) − 2}

Both are "every key from window_start(n) to n", which is how all code here builds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

WINDOW_KINDS = ("sliding", "terrace")

__all__ = [
    "WINDOW_KINDS",
    "HybridState",
    "causal_linear_attention",
    "causal_softmax_attention",
    "check_attention_inputs",
    "check_hybrid_inputs",
    "check_state",
    "check_window",
    "chunked_hybrid_attention",
    "empty_hybrid_state",
    "hybrid_normalizer_split",
    "prefill_hybrid_state",
    "quadratic_hybrid_attention",
    "recurrent_hybrid_attention",
    "recurrent_hybrid_step",
    "window_masks",
    "window_start",
]


# ----------------------------------------------------------------------------------------------
# Input checks (shared by every public function here and meant for the fast paths too)
# ----------------------------------------------------------------------------------------------


def check_window(window_size: int, window_kind: str) -> None:
    """Raise ValueError unless window_size is a positive int and window_kind is a known kind."""
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size <= 0:
        raise ValueError(f"window_size must be a positive int (e.g. 64), got {window_size!r}")
    if window_kind not in WINDOW_KINDS:
        raise ValueError(f"window_kind must be one of {WINDOW_KINDS}, got {window_kind!r}")


def _check_rank4(name: str, tensor: torch.Tensor, expected: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a 4-D tensor of shape {expected}, got {got}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_kv_inputs(k: torch.Tensor, v: torch.Tensor, k_feat: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Check k, v (B, Hkv, T, D) and k_feat (B, Hq, T, F); return (B, Hq, Hkv, T, D, F)."""
    _check_rank4("k", k, "(B, Hkv, T, D)")
    _check_rank4("v", v, "(B, Hkv, T, D)")
    _check_rank4("k_feat", k_feat, "(B, Hq, T, F)")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)} (B, Hkv, T, D), got {tuple(v.shape)}")
    batch, num_kv_heads, num_tokens, head_dim = k.shape
    batch_f, num_q_heads, num_tokens_f, feature_dim = k_feat.shape
    if batch_f != batch or num_tokens_f != num_tokens:
        raise ValueError(
            f"k_feat must be (B, Hq, T, F) with B={batch}, T={num_tokens} as in k {tuple(k.shape)}, "
            f"got {tuple(k_feat.shape)}"
        )
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"the number of query heads Hq={num_q_heads} (k_feat {tuple(k_feat.shape)}) must be a multiple of "
            f"the number of key/value heads Hkv={num_kv_heads} (k {tuple(k.shape)}); pass k/v with Hkv "
            f"dividing Hq, or repeat them to Hq heads"
        )
    return batch, num_q_heads, num_kv_heads, num_tokens, head_dim, feature_dim


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_feat: torch.Tensor, k_feat: torch.Tensor
) -> tuple[int, int, int, int, int, int]:
    """Check q (B, Hq, T, D), k, v (B, Hkv, T, D), q_feat, k_feat (B, Hq, T, F); return (B, Hq, Hkv, T, D, F)."""
    _check_rank4("q", q, "(B, Hq, T, D)")
    _check_rank4("q_feat", q_feat, "(B, Hq, T, F)")
    batch, num_q_heads, num_kv_heads, num_tokens, head_dim, feature_dim = check_kv_inputs(k, v, k_feat)
    expected_q = (batch, num_q_heads, num_tokens, head_dim)
    if tuple(q.shape) != expected_q:
        raise ValueError(
            f"q must be (B, Hq, T, D) = {expected_q} to match k {tuple(k.shape)} and k_feat "
            f"{tuple(k_feat.shape)}, got {tuple(q.shape)}"
        )
    if q_feat.shape != k_feat.shape:
        raise ValueError(
            f"q_feat must have the shape of k_feat {tuple(k_feat.shape)} (B, Hq, T, F), got {tuple(q_feat.shape)}"
        )
    return batch, num_q_heads, num_kv_heads, num_tokens, head_dim, feature_dim


def check_hybrid_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gamma: torch.Tensor,
    window_size: int,
    window_kind: str,
) -> tuple[int, int, int, int, int, int]:
    """Check all inputs of a hybrid attention call; return (B, Hq, Hkv, T, D, F)."""
    check_window(window_size, window_kind)
    dims = check_attention_inputs(q, k, v, q_feat, k_feat)
    num_q_heads = dims[1]
    if not isinstance(gamma, torch.Tensor) or tuple(gamma.shape) != (num_q_heads,):
        got = tuple(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__
        raise ValueError(
            f"gamma must be a 1-D tensor of shape (Hq,) = ({num_q_heads},) holding sigmoid(logit) per query "
            f"head, got {got}; reshape with gamma.reshape(-1)"
        )
    return dims


def check_state(state: HybridState, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                feature_dim: int) -> None:
    """Raise ValueError unless every tensor of `state` has the shape these inputs need (and kv, k_sum are fp32)."""
    window_length = state.window_length
    expected = {
        "kv": (batch, num_q_heads, feature_dim, head_dim),
        "k_sum": (batch, num_q_heads, feature_dim),
        "window_k": (batch, num_kv_heads, window_length, head_dim),
        "window_v": (batch, num_kv_heads, window_length, head_dim),
        "window_k_feat": (batch, num_q_heads, window_length, feature_dim),
    }
    for name, shape in expected.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ValueError(
                f"state.{name} has shape {got} but these inputs need {shape}; build the state with "
                f"empty_hybrid_state or prefill_hybrid_state for B={batch}, Hq={num_q_heads}, Hkv={num_kv_heads}, "
                f"D={head_dim}, F={feature_dim}"
            )
    if state.kv.dtype != torch.float32 or state.k_sum.dtype != torch.float32:
        raise ValueError(f"state.kv and state.k_sum must be fp32, got {state.kv.dtype} and {state.k_sum.dtype}")


# ----------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------


def window_start(positions: torch.Tensor | int, window_size: int, window_kind: str):
    """First key position of the window W(n) for query position(s) n (may be negative: clamp at 0).

    W(n) = {window_start(n), ..., n} and Λ(n) = {0, ..., window_start(n) − 1}.
    """
    if window_kind == "sliding":
        return positions - window_size + 1
    # Terrace: the whole previous block plus the current one, blocks aligned to position 0.
    return (positions // window_size - 1) * window_size


def _partition_masks(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window_size: int, window_kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(window_mask, linear_mask), bool (Tq, Tk), for absolute query and key positions."""
    query = query_positions[:, None]
    key = key_positions[None, :]
    start = window_start(query, window_size, window_kind)
    window_mask = (key >= start) & (key <= query)
    linear_mask = key < start
    return window_mask, linear_mask


def window_masks(
    num_tokens: int, window_size: int, window_kind: str, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (T, T) masks [query n, key i]: window_mask = i ∈ W(n), linear_mask = i ∈ Λ(n).

    The two are disjoint and their union is the causal mask i ≤ n.
    """
    check_window(window_size, window_kind)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    positions = torch.arange(num_tokens, device=device)
    return _partition_masks(positions, positions, window_size, window_kind)


# ----------------------------------------------------------------------------------------------
# Shared pieces of the math
# ----------------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hq, T, D); query head h reads kv head h // (Hq // Hkv) (HF repeat_kv)."""
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1)


def _hybrid_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor | None,
    gamma: torch.Tensor,
    window_mask: torch.Tensor,
    linear_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Unnormalized attention weights (B, H, Tq, Tk) over explicitly listed keys (upcast inputs).

    Window keys get γ·exp(s − c) with c the max score over the window only (c is part of the model:
    the linear terms are not rescaled by it); linear keys get φqᵀφk. q, k: (B, H, T, D) at query heads.
    """
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~window_mask, float("-inf"))
    # Every query row holds its own position in the window, so the max is finite.
    window_max = scores.amax(dim=-1, keepdim=True)
    weights = gamma.view(1, -1, 1, 1) * torch.exp(scores - window_max)
    if linear_mask is not None:
        linear_weights = (q_feat @ k_feat.transpose(-1, -2)).masked_fill(~linear_mask, 0.0)
        weights = weights + linear_weights
    return weights


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Upcast to fp32 (fp64 stays fp64, so torch.autograd.gradcheck can check these functions)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def hybrid_normalizer_split(
    q: torch.Tensor,
    k: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gamma: torch.Tensor,
    window_size: int = 64,
    window_kind: str = "sliding",
    query_chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of the shared normalizer, per query: (window mass Σ_W γ·exp(s − c), linear mass Σ_Λ φqᵀφk).

    linear / (window + linear) is the share of a query's attention weight that the linear part carries: the
    diagnostic for a hybrid that silently bypasses its linear part (a share near 0 everywhere). Queries are
    processed `query_chunk` at a time, so memory is O(query_chunk · T), not O(T²). Shapes as
    quadratic_hybrid_attention; returns two fp32 (B, Hq, T) tensors.
    """
    _, num_q_heads, _, num_tokens, _, _ = check_hybrid_inputs(
        q, k, k, q_feat, k_feat, gamma, window_size, window_kind
    )
    q, k, q_feat, k_feat, gamma = _upcast(q, k, q_feat, k_feat, gamma)
    k = _repeat_kv(k, num_q_heads)
    window_parts, linear_parts = [], []
    positions = torch.arange(num_tokens, device=q.device)
    for start in range(0, num_tokens, query_chunk):
        end = min(start + query_chunk, num_tokens)
        window_mask, linear_mask = _partition_masks(positions[start:end], positions[:end], window_size, window_kind)
        weights = _hybrid_weights(q[:, :, start:end], k[:, :, :end], q_feat[:, :, start:end], None, gamma,
                                  window_mask, None)
        window_parts.append(weights.sum(dim=-1))
        linear = (q_feat[:, :, start:end] @ k_feat[:, :, :end].transpose(-1, -2)).masked_fill(~linear_mask, 0.0)
        linear_parts.append(linear.sum(dim=-1))
    return torch.cat(window_parts, dim=-1), torch.cat(linear_parts, dim=-1)


# ----------------------------------------------------------------------------------------------
# Parallel forms
# ----------------------------------------------------------------------------------------------


def quadratic_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gamma: torch.Tensor,
    window_size: int = 64,
    window_kind: str = "sliding",
) -> torch.Tensor:
    """The hybrid attention by its definition, materializing (B, Hq, T, T) weights in fp32.

    Args:
        q: (B, Hq, T, D) post-RoPE queries.
        k, v: (B, Hkv, T, D) post-RoPE keys and values; Hq % Hkv == 0.
        q_feat, k_feat: (B, Hq, T, F) feature maps φq(q), φk(repeat_kv(k)), positive.
        gamma: (Hq,) window weight in (0, 1) per query head.
        window_size, window_kind: see the module docstring.
    Returns:
        y: (B, Hq, T, D) in q.dtype.
    """
    _, num_q_heads, _, num_tokens, _, _ = check_hybrid_inputs(
        q, k, v, q_feat, k_feat, gamma, window_size, window_kind
    )
    out_dtype = q.dtype
    if num_tokens == 0:
        return q.new_zeros(q.shape)
    q, k, v, q_feat, k_feat, gamma = _upcast(q, k, v, q_feat, k_feat, gamma)
    k, v = _repeat_kv(k, num_q_heads), _repeat_kv(v, num_q_heads)
    window_mask, linear_mask = window_masks(num_tokens, window_size, window_kind, device=q.device)
    weights = _hybrid_weights(q, k, q_feat, k_feat, gamma, window_mask, linear_mask)
    y = (weights @ v) / weights.sum(dim=-1, keepdim=True)
    return y.to(out_dtype)


def chunked_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gamma: torch.Tensor,
    window_size: int = 64,
    window_kind: str = "sliding",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The hybrid attention in O(T·C) time and O(C² + F·D) extra memory per head, C = chunk size.

    With C = window_size (the default), every key two or more chunks behind the query's chunk is
    linear for both kinds. So chunk i attends to a running fp32 state S = Σ φk vᵀ (B, Hq, F, D),
    z = Σ φk (B, Hq, F) over chunks ≤ i − 2, plus a masked quadratic over the keys of chunks i − 1
    and i (which holds the whole window and possibly some linear keys). Differentiable by autograd.

    Args: as `quadratic_hybrid_attention`, plus
        chunk_size: None for window_size; larger values are allowed when they keep the property above
            (sliding: chunk_size >= window_size; terrace: a multiple of window_size).
    Returns:
        y: (B, Hq, T, D) in q.dtype.
    """
    batch, num_q_heads, _, num_tokens, head_dim, feature_dim = check_hybrid_inputs(
        q, k, v, q_feat, k_feat, gamma, window_size, window_kind
    )
    if chunk_size is None:
        chunk_size = window_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if window_kind == "sliding" and chunk_size < window_size:
        raise ValueError(
            f"chunk_size={chunk_size} must be >= window_size={window_size} for a sliding window (or None)"
        )
    if window_kind == "terrace" and chunk_size % window_size != 0:
        raise ValueError(
            f"chunk_size={chunk_size} must be a multiple of window_size={window_size} for a terrace window (or None)"
        )
    out_dtype = q.dtype
    q, k, v, q_feat, k_feat, gamma = _upcast(q, k, v, q_feat, k_feat, gamma)
    k, v = _repeat_kv(k, num_q_heads), _repeat_kv(v, num_q_heads)
    positions = torch.arange(num_tokens, device=q.device)

    kv_state = q.new_zeros(batch, num_q_heads, feature_dim, head_dim)  # Σ φk vᵀ over chunks ≤ i − 2
    k_sum = q.new_zeros(batch, num_q_heads, feature_dim, 1)  # Σ φk over chunks ≤ i − 2
    outputs = []
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        key_start = max(0, start - chunk_size)  # first key of chunk i − 1
        window_mask, linear_mask = _partition_masks(
            positions[start:end], positions[key_start:end], window_size, window_kind
        )
        weights = _hybrid_weights(
            q[:, :, start:end], k[:, :, key_start:end],
            q_feat[:, :, start:end], k_feat[:, :, key_start:end],
            gamma, window_mask, linear_mask,
        )
        q_feat_chunk = q_feat[:, :, start:end]
        numerator = weights @ v[:, :, key_start:end] + q_feat_chunk @ kv_state
        denominator = weights.sum(dim=-1, keepdim=True) + q_feat_chunk @ k_sum
        outputs.append(numerator / denominator)
        # Chunk i − 1 is linear for every later chunk: fold it into the state (out of place, for autograd).
        if start > 0:
            old_feat = k_feat[:, :, key_start:start]
            kv_state = kv_state + old_feat.transpose(-1, -2) @ v[:, :, key_start:start]
            k_sum = k_sum + old_feat.sum(dim=-2).unsqueeze(-1)
    if not outputs:
        return q.new_zeros(batch, num_q_heads, 0, head_dim).to(out_dtype)
    return torch.cat(outputs, dim=2).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Recurrent form (decoding)
# ----------------------------------------------------------------------------------------------


@dataclass
class HybridState:
    """Decoding state after `num_tokens` tokens; its size does not depend on num_tokens.

    The window holds exactly the keys in W(num_tokens) (the window of the *next* query) that are
    already seen, W' of them: at most w − 1 (sliding) or 2w − 1 (terrace) between steps. Every older
    key is folded into the fp32 linear state.

    Attributes:
        kv: (B, Hq, F, D) fp32, Σ φk_j v_jᵀ over linear keys.
        k_sum: (B, Hq, F) fp32, Σ φk_j over linear keys.
        window_k, window_v: (B, Hkv, W', D) post-RoPE keys and values in the window, oldest first.
        window_k_feat: (B, Hq, W', F) their features, kept so eviction needs no feature map.
        num_tokens: tokens seen so far (the position of the next token).
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    window_k: torch.Tensor
    window_v: torch.Tensor
    window_k_feat: torch.Tensor
    num_tokens: int

    @property
    def window_length(self) -> int:
        """W', the number of keys currently held in the window."""
        return self.window_k.shape[2]

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(
            value.numel() * value.element_size()
            for value in (getattr(self, field.name) for field in fields(self))
            if isinstance(value, torch.Tensor)
        )


def empty_hybrid_state(
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    feature_dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    feature_dtype: torch.dtype | None = None,
) -> HybridState:
    """The state before any token. The window is stored in `dtype` (its features in `feature_dtype`,
    default `dtype`); pass the dtypes of k and k_feat so storing them is lossless."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads={num_q_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
        )
    feature_dtype = dtype if feature_dtype is None else feature_dtype
    return HybridState(
        kv=torch.zeros(batch, num_q_heads, feature_dim, head_dim, dtype=torch.float32, device=device),
        k_sum=torch.zeros(batch, num_q_heads, feature_dim, dtype=torch.float32, device=device),
        window_k=torch.zeros(batch, num_kv_heads, 0, head_dim, dtype=dtype, device=device),
        window_v=torch.zeros(batch, num_kv_heads, 0, head_dim, dtype=dtype, device=device),
        window_k_feat=torch.zeros(batch, num_q_heads, 0, feature_dim, dtype=feature_dtype, device=device),
        num_tokens=0,
    )


def _evict_for_next_query(state: HybridState, window_size: int, window_kind: str) -> HybridState:
    """Fold the window keys that are not in W(state.num_tokens) into the fp32 linear state."""
    next_position = state.num_tokens
    first_in_window = next_position - state.window_length  # position of window_k[:, :, 0]
    keep_from = max(0, window_start(next_position, window_size, window_kind))
    num_evicted = max(0, keep_from - first_in_window)
    if num_evicted == 0:
        return state
    num_q_heads = state.kv.shape[1]
    evicted_feat = state.window_k_feat[:, :, :num_evicted].float()
    evicted_v = _repeat_kv(state.window_v[:, :, :num_evicted].float(), num_q_heads)
    return HybridState(
        kv=state.kv + evicted_feat.transpose(-1, -2) @ evicted_v,
        k_sum=state.k_sum + evicted_feat.sum(dim=-2),
        window_k=state.window_k[:, :, num_evicted:],
        window_v=state.window_v[:, :, num_evicted:],
        window_k_feat=state.window_k_feat[:, :, num_evicted:],
        num_tokens=state.num_tokens,
    )


def prefill_hybrid_state(
    k: torch.Tensor, v: torch.Tensor, k_feat: torch.Tensor, window_size: int = 64, window_kind: str = "sliding"
) -> HybridState:
    """The state after the T tokens of k (B, Hkv, T, D), v (B, Hkv, T, D), k_feat (B, Hq, T, F).

    The linear state holds exactly the keys outside the window of the next query position T; the
    window holds the rest, stored in the dtypes of k and k_feat. Compute the prefill's outputs with
    `chunked_hybrid_attention` on the same tensors.
    """
    check_window(window_size, window_kind)
    batch, num_q_heads, num_kv_heads, num_tokens, head_dim, feature_dim = check_kv_inputs(k, v, k_feat)
    state = empty_hybrid_state(
        batch, num_q_heads, num_kv_heads, head_dim, feature_dim, k.dtype, k.device, feature_dtype=k_feat.dtype
    )
    state.window_k, state.window_v, state.window_k_feat, state.num_tokens = k, v, k_feat, num_tokens
    return _evict_for_next_query(state, window_size, window_kind)


def recurrent_hybrid_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gamma: torch.Tensor,
    state: HybridState,
    window_size: int = 64,
    window_kind: str = "sliding",
) -> tuple[torch.Tensor, HybridState]:
    """One decoding step for the token at position state.num_tokens.

    Args: q (B, Hq, 1, D), k, v (B, Hkv, 1, D), q_feat, k_feat (B, Hq, 1, F), gamma (Hq,), and the
        state after the previous tokens (not modified).
    Returns:
        y: (B, Hq, 1, D) in q.dtype, and the new state (evicted keys folded in with their stored
        features, in fp32).
    """
    batch, num_q_heads, num_kv_heads, num_tokens, head_dim, feature_dim = check_hybrid_inputs(
        q, k, v, q_feat, k_feat, gamma, window_size, window_kind
    )
    if num_tokens != 1:
        raise ValueError(f"recurrent_hybrid_step takes one token: q must be (B, Hq, 1, D), got {tuple(q.shape)}")
    check_state(state, batch, num_q_heads, num_kv_heads, head_dim, feature_dim)

    # Append the new token; the window is now exactly W(n) for n = state.num_tokens.
    window_k = torch.cat([state.window_k, k.to(state.window_k.dtype)], dim=2)
    window_v = torch.cat([state.window_v, v.to(state.window_v.dtype)], dim=2)
    window_k_feat = torch.cat([state.window_k_feat, k_feat.to(state.window_k_feat.dtype)], dim=2)

    # The state is fp32, so the step computes in fp32 whatever the input dtype.
    q32, q_feat32, gamma32 = q.float(), q_feat.float(), gamma.float()
    keys = _repeat_kv(window_k.float(), num_q_heads)
    values = _repeat_kv(window_v.float(), num_q_heads)
    all_window = torch.ones(1, keys.shape[2], dtype=torch.bool, device=q.device)
    weights = _hybrid_weights(q32, keys, q_feat32, None, gamma32, all_window, None)
    numerator = weights @ values + q_feat32 @ state.kv
    denominator = weights.sum(dim=-1, keepdim=True) + q_feat32 @ state.k_sum.unsqueeze(-1)
    y = (numerator / denominator).to(q.dtype)

    grown = HybridState(state.kv, state.k_sum, window_k, window_v, window_k_feat, state.num_tokens + 1)
    return y, _evict_for_next_query(grown, window_size, window_kind)


def recurrent_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gamma: torch.Tensor,
    window_size: int = 64,
    window_kind: str = "sliding",
) -> torch.Tensor:
    """The hybrid attention token by token from an empty state (slow; for tests). Returns (B, Hq, T, D)."""
    batch, num_q_heads, num_kv_heads, num_tokens, head_dim, feature_dim = check_hybrid_inputs(
        q, k, v, q_feat, k_feat, gamma, window_size, window_kind
    )
    state = empty_hybrid_state(
        batch, num_q_heads, num_kv_heads, head_dim, feature_dim, k.dtype, k.device, feature_dtype=k_feat.dtype
    )
    outputs = []
    for n in range(num_tokens):
        step = slice(n, n + 1)
        y, state = recurrent_hybrid_step(
            q[:, :, step], k[:, :, step], v[:, :, step], q_feat[:, :, step], k_feat[:, :, step],
            gamma, state, window_size, window_kind,
        )
        outputs.append(y)
    if not outputs:
        return q.new_zeros(batch, num_q_heads, 0, head_dim)
    return torch.cat(outputs, dim=2)


# ----------------------------------------------------------------------------------------------
# Plain references
# ----------------------------------------------------------------------------------------------


def causal_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention in fp32: q (B, Hq, T, D), k, v (B, Hkv, T, D) -> (B, Hq, T, D) in q.dtype."""
    _check_rank4("q", q, "(B, Hq, T, D)")
    _check_rank4("k", k, "(B, Hkv, T, D)")
    _check_rank4("v", v, "(B, Hkv, T, D)")
    if v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"expected q (B, Hq, T, D) and k, v (B, Hkv, T, D) with Hq % Hkv == 0, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    num_q_heads, num_tokens = q.shape[1], q.shape[2]
    q32, k32, v32 = _upcast(q, k, v)
    k32, v32 = _repeat_kv(k32, num_q_heads), _repeat_kv(v32, num_q_heads)
    scores = (q32 @ k32.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(dim=-1) @ v32).to(q.dtype)


def causal_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_feat: torch.Tensor, k_feat: torch.Tensor
) -> torch.Tensor:
    """Causal linear attention y_n = φq_nᵀ Σ_{j≤n} φk_j v_jᵀ / φq_nᵀ Σ_{j≤n} φk_j in fp32, no ε (the
    features are positive). q is used for its shape and dtype only. Returns (B, Hq, T, D) in q.dtype."""
    _, num_q_heads, _, num_tokens, _, _ = check_attention_inputs(q, k, v, q_feat, k_feat)
    v32, q_feat32, k_feat32 = _upcast(v, q_feat, k_feat)
    v32 = _repeat_kv(v32, num_q_heads)
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=q.device).tril()
    weights = (q_feat32 @ k_feat32.transpose(-1, -2)).masked_fill(~causal, 0.0)
    return ((weights @ v32) / weights.sum(dim=-1, keepdim=True)).to(q.dtype)
