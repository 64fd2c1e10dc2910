"""Sliding-window + sinks softmax attention as a drop-in `self_attn`: the training-free baseline.

Reuses the base attention's projections and the model's rotary embeddings, like HybridAttention.
"""

from __future__ import annotations

import math
from typing import Iterable

from torch import nn

from kernels.window_attention import chunked_sliding_window_sink_attention

from .convert import _attention_shape, decoder_layers, select_layers
from .hybrid_attention import apply_rotary


class SlidingWindowSinkAttention(nn.Module):
    def __init__(self, base_attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int,
                 window_size: int = 64, num_sinks: int = 4):
        super().__init__()
        self.base_attention = base_attention  # kept so the swap can be undone
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window_size, self.num_sinks = window_size, num_sinks

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        base = self.base_attention
        batch, length, _ = hidden_states.shape
        q = base.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        k = base.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        if getattr(base, "q_norm", None) is not None:
            q, k = base.q_norm(q), base.k_norm(k)
        v = base.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
        out = chunked_sliding_window_sink_attention(q, k, v, self.window_size, self.num_sinks, 1.0 / math.sqrt(self.head_dim))
        return base.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None


def swap_to_sliding_window(model: nn.Module, window_size: int = 64, num_sinks: int = 4,
                           layers: Iterable[int] | None = None) -> list[int]:
    """Replace self_attn of the chosen layers by sliding-window + sinks softmax; returns the indices."""
    all_layers = decoder_layers(model)
    chosen = select_layers(len(all_layers), layers)
    num_heads, num_kv_heads, head_dim = _attention_shape(model.config)
    for idx in chosen:
        all_layers[idx].self_attn = SlidingWindowSinkAttention(
            all_layers[idx].self_attn, num_heads, num_kv_heads, head_dim, window_size, num_sinks)
    return chosen


def restore_attention(model: nn.Module) -> None:
    """Undo swap_to_sliding_window."""
    for layer in decoder_layers(model):
        if isinstance(layer.self_attn, SlidingWindowSinkAttention):
            layer.self_attn = layer.self_attn.base_attention
