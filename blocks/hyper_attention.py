"""Patch chosen decoder layers of a Hugging Face Llama-family model (Llama, Mistral, Qwen2/3) to use
HyperAttention for long prefills, and unpatch them.

How: an attention function is registered once under the name "linearize_hyper" in transformers'
AttentionInterface (the library's extension point; no existing entry is replaced). A patched layer's
`self_attn` gets its own shallow copy of the model config whose `_attn_implementation` names that
function, plus a `hyper_attention_state` attribute; other layers and the model-level mask creation
keep the model's implementation. The function uses HyperAttention only for a causal prefill without
past (T_q == T_k > min_seq_len, no padding in the mask); everything else, decode steps over the KV
cache included, goes to the layer's original implementation (sdpa/eager/flash), so patched models
still generate() and short prompts are bit-identical to the unpatched model.

Follows PEFT's split: config (HyperAttentionConfig), where (select_hyper_layers; a selection matching
nothing is a NoMatchingLayerError naming it), what (the registered function).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from kernels.hyper_attention import hyper_attention
from kernels.hyper_attention.common import BACKENDS, MAX_LSH_PROJS

from .convert import NoMatchingLayerError, decoder_layers

__all__ = [
    "ATTENTION_NAME",
    "HyperAttentionConfig",
    "HyperLayerState",
    "hyper_patched_layers",
    "patch_hyper_attention",
    "select_hyper_layers",
    "unpatch_hyper_attention",
]

ATTENTION_NAME = "linearize_hyper"
_STATE_ATTR = "hyper_attention_state"


@dataclass(frozen=True, kw_only=True)
class HyperAttentionConfig:
    """HyperAttention settings of the patched layers (defaults: the paper's b = m = 256, r = 7, n0 = 4096)."""

    block_size: int = 256
    sample_size: int = 256
    lsh_num_projs: int = 7
    min_seq_len: int = 4096
    seed: int = 0  # layer i uses seed + i: fixed hyperplanes and samples per layer, so outputs are reproducible
    backend: str = "auto"

    def __post_init__(self):
        def positive_int(name, value, low=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        positive_int("block_size", self.block_size)
        positive_int("sample_size", self.sample_size, low=0)
        positive_int("min_seq_len", self.min_seq_len)
        positive_int("lsh_num_projs", self.lsh_num_projs)
        if self.lsh_num_projs > MAX_LSH_PROJS:
            raise ValueError(f"lsh_num_projs must be at most {MAX_LSH_PROJS}, got {self.lsh_num_projs}")
        positive_int("seed", self.seed, low=0)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass
class HyperLayerState:
    """What a patched `self_attn` carries: its settings, how to undo the patch, and a usage counter."""

    config: HyperAttentionConfig
    layer_idx: int
    original_config: object = field(repr=False)
    fallback: Callable = field(repr=False)
    num_hyper_calls: int = 0  # prefills that used HyperAttention (diagnostics and tests)
    num_fallback_calls: int = 0


def _causal_only(attention_mask, q_len: int) -> bool:
    """True if the mask hides nothing but the future (None, or a 4D bool/additive mask equal to tril)."""
    if attention_mask is None:
        return True
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return False  # e.g. a flex BlockMask: let the original implementation handle it
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if allowed.shape[-2:] != (q_len, q_len):
        return False
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=allowed.device).tril()
    return bool(torch.equal(allowed, causal.expand_as(allowed)))


def hyper_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """AttentionInterface function: (B, Hq, T, D) q and (B, Hkv, T, D) k/v -> ((B, T, Hq, Dv), None)."""
    state: HyperLayerState = getattr(module, _STATE_ATTR)
    settings = state.config
    q_len, k_len = query.shape[2], key.shape[2]
    use_hyper = (q_len == k_len and q_len > settings.min_seq_len and kwargs.get("is_causal", True) is not False
                 and kwargs.get("sliding_window") is None and _causal_only(attention_mask, q_len))
    if not use_hyper:
        state.num_fallback_calls += 1
        return state.fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:
        raise ValueError(f"HyperAttention has no attention dropout, got dropout={dropout}; call model.eval() or "
                         "set config.attention_dropout=0")
    out = hyper_attention(query, key, value, causal=True, block_size=settings.block_size,
                          sample_size=settings.sample_size, lsh_num_projs=settings.lsh_num_projs,
                          min_seq_len=settings.min_seq_len, scale=scaling, seed=settings.seed + state.layer_idx,
                          backend=settings.backend)
    state.num_hyper_calls += 1
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, hyper_attention_forward)


def _fallback_function(attn: nn.Module, name: str | None) -> Callable:
    """The layer's own implementation: a registered one (sdpa, flash, ...) or its family's eager function."""
    if name and name != "eager" and name != ATTENTION_NAME:
        return ALL_ATTENTION_FUNCTIONS[name]
    family = sys.modules.get(type(attn).__module__)
    return getattr(family, "eager_attention_forward", modeling_llama.eager_attention_forward)


def _layer_sliding_window(attn: nn.Module):
    if hasattr(attn, "sliding_window"):  # Qwen2/3: per layer, None on full-attention layers
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)  # Mistral: one value for all layers


def select_hyper_layers(num_layers: int, layers: Iterable[int] | None = None,
                        num_last_layers: int | None = None) -> list[int]:
    """Sorted layer indices from an index list (negative = from the end) or the last `num_last_layers`."""
    if (layers is None) == (num_last_layers is None):
        raise ValueError("give exactly one of layers (an index list) and num_last_layers (patch the last l layers), "
                         f"got layers={layers!r}, num_last_layers={num_last_layers!r}")
    if num_last_layers is not None:
        if isinstance(num_last_layers, bool) or not isinstance(num_last_layers, int) or \
                not 1 <= num_last_layers <= num_layers:
            raise NoMatchingLayerError(f"num_last_layers={num_last_layers!r} selects no valid set of layers; the model "
                                       f"has {num_layers}, choose 1..{num_layers} (leave the model unpatched for 0)")
        return list(range(num_layers - num_last_layers, num_layers))
    layers = list(layers)
    if not layers:
        raise NoMatchingLayerError("layers=[] matches no decoder layer; give at least one index")
    chosen = set()
    for idx in layers:
        if isinstance(idx, bool) or not isinstance(idx, int) or not -num_layers <= idx < num_layers:
            raise NoMatchingLayerError(f"layers: index {idx!r} matches no decoder layer (the model has {num_layers}: "
                                       f"0..{num_layers - 1}, or negative from the end)")
        chosen.add(idx % num_layers)
    return sorted(chosen)


def patch_hyper_attention(model: nn.Module, layers: Iterable[int] | None = None, *,
                          num_last_layers: int | None = None, config: HyperAttentionConfig | None = None) -> list[int]:
    """Make the chosen layers use HyperAttention for long causal prefills. Returns the patched indices.

    Args:
        model: a *ForCausalLM / base model of the Llama family (layers at .model.layers or .layers).
        layers: layer indices (negative count from the end); or
        num_last_layers: patch the last l layers (the paper's choice). Exactly one of the two.
        config: HyperAttention settings; defaults to HyperAttentionConfig().
    """
    config = HyperAttentionConfig() if config is None else config
    decoder = decoder_layers(model)
    chosen = select_hyper_layers(len(decoder), layers, num_last_layers)
    attentions = {idx: decoder[idx].self_attn for idx in chosen}
    for idx, attn in attentions.items():  # validate everything before changing anything
        if hasattr(attn, _STATE_ATTR):
            raise ValueError(f"layer {idx} is already patched; call unpatch_hyper_attention(model) first")
        if not hasattr(attn, "config") or not hasattr(attn, "head_dim"):
            raise ValueError(f"layer {idx}: {type(attn).__name__} is not a Hugging Face attention module with "
                             "`config` and `head_dim`; only Llama-family models are supported")
        window = _layer_sliding_window(attn)
        if window is not None:
            raise ValueError(f"layer {idx} uses a sliding window of {window} tokens, which HyperAttention does not "
                             "model; set config.sliding_window=None (full attention) before patching")
    for idx, attn in attentions.items():
        original = attn.config
        patched = copy.copy(original)
        patched._attn_implementation_internal = ATTENTION_NAME  # the copy only: the model config is untouched
        state = HyperLayerState(config=config, layer_idx=idx, original_config=original,
                                fallback=_fallback_function(attn, original._attn_implementation))
        setattr(attn, _STATE_ATTR, state)
        attn.config = patched
    return chosen


def hyper_patched_layers(model: nn.Module) -> dict[int, HyperLayerState]:
    """Patched layer index -> its state (settings and call counters)."""
    return {idx: getattr(layer.self_attn, _STATE_ATTR) for idx, layer in enumerate(decoder_layers(model))
            if hasattr(layer.self_attn, _STATE_ATTR)}


def unpatch_hyper_attention(model: nn.Module) -> list[int]:
    """Restore every patched layer's original config (and so its attention). Returns the restored indices."""
    restored = []
    for idx, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        state = getattr(attn, _STATE_ATTR, None)
        if state is None:
            continue
        attn.config = state.original_config
        delattr(attn, _STATE_ATTR)
        restored.append(idx)
    return restored
