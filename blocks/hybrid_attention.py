"""The LoLCATs hybrid attention module that replaces `self_attn` in Llama-family Hugging Face models.

It reuses the base attention's q/k/v/o projections (shared modules, so LoRA on them later applies to
both) and the model's rotary embeddings (passed in by the decoder layer as `position_embeddings`), and
adds per-layer trainable parts: Hedgehog feature maps for queries and keys (per *query* head, applied
after RoPE and after repeating KV heads) and gamma = sigmoid(window_logit) per query head.

Modes (`module.mode`):
  * "student":  the hybrid alone (stage 2, evaluation);
  * "transfer": the teacher's softmax output continues down the residual stream, and the per-head
    student and teacher outputs before o_proj are returned (second output) and kept in
    `module.transfer_outputs` for the stage-1 loss;
  * "teacher":  exact causal softmax attention (the original model, for baselines and collection).
Generation: pass a `HybridCache` as `past_key_values`; prefill fills a constant-size state (fp32
linear state + window keys/values) and each decode step updates it (kernels/hybrid_attention).

Shapes: hidden (B, T, C); q (B, Hq, T, D); k, v (B, Hkv, T, D); features (B, Hq, T, 2F).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from kernels.hybrid_attention import (
    HybridState,
    chunked_hybrid_attention,
    prefill_hybrid_state,
    quadratic_hybrid_attention,
    recurrent_hybrid_step,
)

from kernels.hybrid_attention.torch_blocked import blocked_hybrid_attention

from .feature_map import HedgehogFeatureMap

MODES = ("student", "transfer", "teacher")
IMPLEMENTATIONS = ("auto", "quadratic", "chunked", "blocked", "triton")


@functools.cache
def triton_import_error() -> str | None:
    """Why the Triton kernels cannot be imported here, or None when they can (checked once per process)."""
    try:
        import kernels.hybrid_attention.triton_api  # noqa: F401
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def _triton_available() -> bool:
    return triton_import_error() is None


def resolve_implementation(implementation: str, on_cuda: bool) -> str:
    """The path `implementation` runs on this device: 'auto' is Triton on a GPU that can import the kernels and the
    chunk-vectorised torch path ('blocked', O(T * w) instead of O(T^2)) elsewhere. A GPU that falls back says so
    (once): the torch path is several times slower there, and a silent fallback looks like a slow machine."""
    if implementation != "auto":
        return implementation
    if on_cuda:
        if _triton_available():
            return "triton"
        warnings.warn(f"the Triton hybrid-attention kernels cannot be imported ({triton_import_error()}); the GPU "
                      "runs the slower torch 'blocked' path", RuntimeWarning, stacklevel=3)
    return "blocked"


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE as in HF Llama (rotate_half convention); cos/sin (B, T, D) from the model's rotary_emb."""

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * num_groups, T, D), query head h reading KV head h // num_groups."""
    return x if num_groups == 1 else x.repeat_interleave(num_groups, dim=1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal softmax attention (the teacher), GQA by repeating KV heads; (B, Hq, T, D)."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True, scale=scale)


class HybridCache(DynamicCache):
    """Constant-size generation cache: one HybridState per converted layer.

    Passed as `past_key_values` to a converted model. It subclasses transformers' DynamicCache so that
    model code (positions, masks) and any layers left as softmax attention work unchanged; the hybrid
    layers keep their fp32 linear state and window in `states` instead of a growing KV list.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states: dict[int, HybridState] = {}

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far (every hybrid layer has seen the same tokens)."""
        return next(iter(self.states.values())).num_tokens if self.states else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_tokens if self.states else super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        if not self.states:
            return super().get_mask_sizes(query_length, layer_idx)
        query_length = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.num_tokens + query_length, 0

    def nbytes(self) -> int:
        return sum(state.nbytes() for state in self.states.values())


class HybridAttention(nn.Module):
    """Sliding-window softmax + Hedgehog linear attention with one shared normalizer (DESIGN.md)."""

    def __init__(self, base_attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 window_size: int = 64, window_kind: str = "terrace", feature_dim: int = 64,
                 gamma_init: float = 0.1, implementation: str = "auto", feature_dtype: str = "model"):
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation: {implementation!r} is not one of {IMPLEMENTATIONS}")
        if feature_dtype not in ("float32", "model"):
            raise ValueError(f"feature_dtype: {feature_dtype!r} is not 'float32' or 'model'")
        self.feature_dtype = feature_dtype
        self.layer_idx = getattr(base_attention, "layer_idx", None)
        self.q_proj, self.k_proj = base_attention.q_proj, base_attention.k_proj
        self.v_proj, self.o_proj = base_attention.v_proj, base_attention.o_proj
        # Qwen3-style per-head RMSNorm on q and k before RoPE; None for Llama/Mistral/Qwen2.
        self.q_norm, self.k_norm = getattr(base_attention, "q_norm", None), getattr(base_attention, "k_norm", None)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.window_size, self.window_kind, self.implementation = window_size, window_kind, implementation
        device = self.q_proj.weight.device
        self.feature_map_q = HedgehogFeatureMap(num_heads, head_dim, feature_dim, device=device)
        self.feature_map_k = HedgehogFeatureMap(num_heads, head_dim, feature_dim, device=device)
        logit = math.log(gamma_init / (1.0 - gamma_init))
        self.window_logit = nn.Parameter(torch.full((num_heads,), logit, dtype=torch.float32, device=device))
        self.mode = "student"
        self.transfer_outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def gamma(self) -> torch.Tensor:
        return torch.sigmoid(self.window_logit)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {MODES}")
        self.mode = mode
        self.transfer_outputs = None

    def _project(self, hidden_states: torch.Tensor, position_embeddings):
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)
        return q, k, v

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi_q(q), phi_k(k) with k repeated to the query heads (features are per query head)."""
        return self.feature_map_q(q), self.feature_map_k(repeat_kv(k, self.num_heads // self.num_kv_heads))

    def hybrid(self, q, k, v) -> torch.Tensor:
        q_feat, k_feat = self.features(q, k)
        impl = resolve_implementation(self.implementation, q.is_cuda)
        fn = {"quadratic": quadratic_hybrid_attention, "chunked": chunked_hybrid_attention,
              "blocked": blocked_hybrid_attention}.get(impl)
        if fn is None:
            from kernels.hybrid_attention.triton_api import triton_hybrid_attention
            fn = triton_hybrid_attention
            if self.feature_dtype == "model":
                # The kernels compute in the widest input dtype: fp32 features would take bf16 q, k, v to fp32 too.
                q_feat, k_feat = q_feat.to(q.dtype), k_feat.to(q.dtype)
        return fn(q, k, v, q_feat, k_feat, self.gamma, window_size=self.window_size, window_kind=self.window_kind)

    def _generate(self, q, k, v, cache: HybridCache) -> torch.Tensor:
        state = cache.states.get(self.layer_idx)
        if state is None:  # prefill: full-sequence hybrid, then hand decode the exact state
            out = self.hybrid(q, k, v)
            _, k_feat = self.features(q, k)
            cache.states[self.layer_idx] = prefill_hybrid_state(k, v, k_feat, self.window_size, self.window_kind)
            return out
        q_feat, k_feat = self.features(q, k)
        step = recurrent_hybrid_step
        if q.is_cuda and self.implementation in ("auto", "triton") and _triton_available():
            from kernels.hybrid_attention.triton_api import triton_hybrid_decode_step as step  # fused state update
        outs = []
        for t in range(q.shape[2]):
            y, state = step(
                q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], q_feat[:, :, t:t + 1], k_feat[:, :, t:t + 1],
                self.gamma, state, window_size=self.window_size, window_kind=self.window_kind)
            outs.append(y)
        cache.states[self.layer_idx] = state
        return torch.cat(outs, dim=2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        if position_embeddings is None:
            raise ValueError("position_embeddings: the decoder layer must pass the model's (cos, sin)")
        batch, length, _ = hidden_states.shape
        q, k, v = self._project(hidden_states, position_embeddings)
        extra = None
        if isinstance(past_key_values, HybridCache):
            out = self._generate(q, k, v, past_key_values)
        elif self.mode == "teacher":
            out = softmax_attention(q, k, v, self.scale)
        elif self.mode == "transfer":
            with torch.no_grad():
                teacher = softmax_attention(q, k, v, self.scale)
            student = self.hybrid(q, k, v)
            self.transfer_outputs = extra = (student, teacher)
            out = teacher
        else:
            out = self.hybrid(q, k, v)
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), extra

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.window_kind}:{self.window_size}, mode={self.mode}")
