"""Modeling code of a model exported by `linearize export` (loaded with `trust_remote_code=True`).

The base family's causal LM (Llama, Mistral, Qwen2, Qwen3) with the self-attention of the layers listed
in `config.hybrid_attention["layers"]` replaced by the LoLCATs hybrid: exact softmax over a window of
recent keys plus Hedgehog linear attention over all older keys, one shared normalizer. The math is in
naive.py and feature_map.py (copied verbatim from the `linearize` project) and padding.py (padded rows).

Generation uses a constant-size cache (`HybridCache`): per converted layer an fp32 linear state plus the
window's keys and values, decoded with the same window kind as training. Batches may be LEFT-padded:
padding tokens are masked out of both the window and the linear state, and every row uses its own
positions. Without padding, prefill and decode run exactly the project's code path (so outputs are
bit-identical to the in-process converted model).

Shapes: hidden (B, T, C); q (B, Hq, T, D); k, v (B, Hkv, T, D); features (B, Hq, T, 2F).
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.llama.modeling_llama import LlamaForCausalLM, apply_rotary_pos_emb
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from .configuration_linearize import (
    LinearizedLlamaConfig,
    LinearizedMistralConfig,
    LinearizedQwen2Config,
    LinearizedQwen3Config,
    check_hybrid_attention,
)
from .feature_map import HedgehogFeatureMap
from .naive import (
    HybridState,
    chunked_hybrid_attention,
    prefill_hybrid_state,
    quadratic_hybrid_attention,
    recurrent_hybrid_step,
)
from .padding import (
    PaddedHybridState,
    check_left_padding,
    padded_hybrid_attention,
    padded_hybrid_step,
    prefill_padded_state,
)

# The masked T x T form is the fastest for short prompts; longer ones use the O(T) chunked form
# (the same rule as the project's HybridAttention, so outputs match it bit for bit).
QUADRATIC_MAX_TOKENS = 1024


class HybridCache(DynamicCache):
    """Constant-size generation cache: one state per converted layer (fp32 linear state + window k/v).

    A DynamicCache subclass, so layers left as softmax attention keep their usual growing k/v here.
    `pads` is set when the prompt was left-padded: (B,) padding count of each row.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states: dict[int, HybridState | PaddedHybridState] = {}
        self.pads: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
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
        """Bytes held by the hybrid layers' states (constant in the number of generated tokens)."""
        return sum(state.nbytes() for state in self.states.values())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows of the surviving beams, in the states as in the softmax layers' k/v."""
        super().reorder_cache(beam_idx)
        for layer_idx, state in self.states.items():
            rows = beam_idx.to(state.kv.device)
            picked = {f.name: getattr(state, f.name).index_select(0, rows) for f in fields(state)
                      if isinstance(getattr(state, f.name), torch.Tensor) and f.name != "pads_cpu"}
            if isinstance(state, PaddedHybridState):
                picked["pads_cpu"] = state.pads_cpu.index_select(0, beam_idx.cpu())
            self.states[layer_idx] = replace(state, **picked)
        if self.pads is not None:
            self.pads = self.pads.index_select(0, beam_idx.to(self.pads.device))


class HybridAttention(nn.Module):
    """Softmax window + Hedgehog linear attention; reuses the replaced attention's q/k/v/o projections."""

    def __init__(self, base_attention: nn.Module, config, layer_idx: int):
        super().__init__()
        settings = check_hybrid_attention(config.hybrid_attention)
        self.layer_idx = layer_idx
        self.q_proj, self.k_proj = base_attention.q_proj, base_attention.k_proj
        self.v_proj, self.o_proj = base_attention.v_proj, base_attention.o_proj
        # Qwen3's per-head RMSNorm on q and k before RoPE; None for the other families.
        self.q_norm, self.k_norm = getattr(base_attention, "q_norm", None), getattr(base_attention, "k_norm", None)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.window_size, self.window_kind = int(settings["window_size"]), settings["window_kind"]
        feature_dim = int(settings["feature_dim"])
        device = self.q_proj.weight.device
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim, feature_dim, device=device)
        self.feature_map_k = HedgehogFeatureMap(self.num_heads, self.head_dim, feature_dim, device=device)
        # Loaded from the checkpoint; the value here only matters for a model built from a config alone.
        self.window_logit = nn.Parameter(torch.full((self.num_heads,), math.log(0.1 / 0.9), device=device))

    @property
    def gamma(self) -> torch.Tensor:
        return torch.sigmoid(self.window_logit)

    def _project(self, hidden_states, position_embeddings):
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _features(self, q, k):
        """phi_q(q), phi_k(k) with k's heads repeated to the query heads (features are per query head)."""
        groups = self.num_heads // self.num_kv_heads
        return self.feature_map_q(q), self.feature_map_k(k.repeat_interleave(groups, dim=1) if groups > 1 else k)

    def _window(self) -> dict:
        return {"window_size": self.window_size, "window_kind": self.window_kind}

    def _parallel(self, q, k, v, q_feat, k_feat, valid):
        if valid is not None:
            return padded_hybrid_attention(q, k, v, q_feat, k_feat, self.gamma, valid, **self._window())
        fn = quadratic_hybrid_attention if q.shape[2] <= QUADRATIC_MAX_TOKENS else chunked_hybrid_attention
        return fn(q, k, v, q_feat, k_feat, self.gamma, **self._window())

    def _decode(self, q, k, v, q_feat, k_feat, state):
        step = padded_hybrid_step if isinstance(state, PaddedHybridState) else recurrent_hybrid_step
        outputs = []
        for t in range(q.shape[2]):
            token = slice(t, t + 1)
            y, state = step(q[:, :, token], k[:, :, token], v[:, :, token], q_feat[:, :, token],
                            k_feat[:, :, token], self.gamma, state, **self._window())
            outputs.append(y)
        return torch.cat(outputs, dim=2), state

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                hybrid_valid=None, **kwargs):
        if position_embeddings is None:
            raise ValueError("position_embeddings: the decoder layer must pass the model's (cos, sin)")
        batch, length, _ = hidden_states.shape
        q, k, v = self._project(hidden_states, position_embeddings)
        q_feat, k_feat = self._features(q, k)
        cache = past_key_values if isinstance(past_key_values, HybridCache) else None
        state = cache.states.get(self.layer_idx) if cache is not None else None
        if state is not None:
            out, cache.states[self.layer_idx] = self._decode(q, k, v, q_feat, k_feat, state)
        else:
            out = self._parallel(q, k, v, q_feat, k_feat, hybrid_valid)
            if cache is not None:
                if cache.pads is not None:
                    state = prefill_padded_state(k, v, k_feat, cache.pads, **self._window())
                else:
                    state = prefill_hybrid_state(k, v, k_feat, **self._window())
                cache.states[self.layer_idx] = state
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), None


class LinearizedMixin:
    """Swaps in HybridAttention, builds the HybridCache, and turns a 2-D attention mask into key padding."""

    # Feature maps and gamma were trained in fp32 and stay fp32 when the model is loaded in bf16/fp16.
    _keep_in_fp32_modules_strict = ["feature_map_q", "feature_map_k", "window_logit"]

    def __init__(self, config):
        super().__init__(config)
        settings = check_hybrid_attention(config.hybrid_attention)
        for idx in settings["layers"]:
            layer = self.model.layers[idx]
            layer.self_attn = HybridAttention(layer.self_attn, config, idx)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache: forward() makes the constant-size HybridCache itself.
        return False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and not isinstance(past_key_values, HybridCache):
            if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() > 0:
                raise ValueError(f"past_key_values: a filled {type(past_key_values).__name__} cannot continue a "
                                 "hybrid model; pass None or the HybridCache returned by an earlier call")
            past_key_values = HybridCache()
        cache = past_key_values if isinstance(past_key_values, HybridCache) else None
        tokens = input_ids if input_ids is not None else inputs_embeds
        length = tokens.shape[1]
        past = cache.num_tokens if cache is not None else 0

        valid = None
        if past == 0 and attention_mask is not None and attention_mask.dim() == 2:
            current = attention_mask[:, -length:].bool()
            # One check per prompt (not per decoded token): is there any padding at all?
            if not bool(current.all()):
                valid = current
                if cache is not None:
                    cache.pads = check_left_padding(valid)
        if position_ids is None:
            if valid is not None:
                position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
            elif cache is not None and cache.pads is not None:
                offsets = torch.arange(past, past + length, device=tokens.device)
                position_ids = offsets[None, :] - cache.pads[:, None]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                               use_cache=use_cache, hybrid_valid=valid, **kwargs)


class LinearizedLlamaForCausalLM(LinearizedMixin, LlamaForCausalLM):
    config_class = LinearizedLlamaConfig


class LinearizedMistralForCausalLM(LinearizedMixin, MistralForCausalLM):
    config_class = LinearizedMistralConfig


class LinearizedQwen2ForCausalLM(LinearizedMixin, Qwen2ForCausalLM):
    config_class = LinearizedQwen2Config


class LinearizedQwen3ForCausalLM(LinearizedMixin, Qwen3ForCausalLM):
    config_class = LinearizedQwen3Config
