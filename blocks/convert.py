"""Model surgery: swap `self_attn` of chosen decoder layers of a Hugging Face Llama-family model.

Follows PEFT's split: the *config* (AttentionSettings), the *where* (select_layers: indices, negative
from the end; a selection that matches nothing is a NoMatchingLayerError naming it) and the *what*
(HybridAttention, reusing the layer's projections and the model's rotary embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .hybrid_attention import HybridAttention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class NoMatchingLayerError(ValueError):
    """A layer selection that matches no decoder layer of the model."""


@dataclass(kw_only=True)
class AttentionSettings:
    """What the converted layers look like; mirrors pipeline.config.AttentionConfig without importing it."""

    window_size: int = 64
    window_kind: str = "terrace"
    feature_dim: int = 64
    gamma_init: float = 0.1
    implementation: str = "auto"
    feature_dtype: str = "model"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a *ForCausalLM, a base *Model, or a bare ModuleList of layers."""
    if isinstance(model, nn.ModuleList):
        return model
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"model: {type(model).__name__} has no decoder layers at .model.layers or .layers")
    return layers


def select_layers(num_layers: int, layers: Iterable[int] | None) -> list[int]:
    """Normalise a selection (None = all; negative indices count from the end) to sorted unique indices."""
    if layers is None:
        return list(range(num_layers))
    chosen = []
    for idx in layers:
        if not isinstance(idx, int) or not -num_layers <= idx < num_layers:
            raise NoMatchingLayerError(
                f"layers: index {idx!r} matches no decoder layer (the model has {num_layers}: 0..{num_layers - 1}, "
                "or negative from the end)"
            )
        chosen.append(idx % num_layers)
    if not chosen:
        raise NoMatchingLayerError(f"layers: the selection {list(layers)!r} is empty; give at least one index or null")
    return sorted(set(chosen))


def _attention_shape(model_config) -> tuple[int, int, int]:
    num_heads = model_config.num_attention_heads
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // num_heads
    return num_heads, num_kv_heads, head_dim


def convert_layers(layers: nn.ModuleList, model_config, settings: AttentionSettings,
                   indices: Iterable[int] | None = None) -> list[int]:
    """Replace self_attn of the selected layers (local indices into `layers`) by HybridAttention."""
    chosen = select_layers(len(layers), indices)
    num_heads, num_kv_heads, head_dim = _attention_shape(model_config)
    for idx in chosen:
        layer = layers[idx]
        if isinstance(layer.self_attn, HybridAttention):
            continue
        layer.self_attn = HybridAttention(
            layer.self_attn, num_heads, num_kv_heads, head_dim, window_size=settings.window_size,
            window_kind=settings.window_kind, feature_dim=settings.feature_dim, gamma_init=settings.gamma_init,
            implementation=settings.implementation, feature_dtype=settings.feature_dtype)
    return chosen


def convert_model(model: nn.Module, settings: AttentionSettings | None = None,
                  layers: Iterable[int] | None = None) -> list[int]:
    """Convert the chosen layers (default all) of a Hugging Face causal LM in place; returns their indices."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    return convert_layers(decoder_layers(model), model.config, settings or AttentionSettings(), layers)


def hybrid_modules(model: nn.Module) -> dict[int, HybridAttention]:
    """Converted attention modules by layer index."""
    return {i: layer.self_attn for i, layer in enumerate(decoder_layers(model))
            if isinstance(layer.self_attn, HybridAttention)}


def set_attention_mode(model: nn.Module, mode: str) -> None:
    """Put every converted layer in 'student', 'transfer' or 'teacher' mode."""
    modules = hybrid_modules(model)
    if not modules:
        raise NoMatchingLayerError("model: no converted (hybrid) attention layers; call convert_model first")
    for module in modules.values():
        module.set_mode(mode)


def transfer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The stage-1 trainables (feature maps and gamma), by name."""
    return {name: p for name, p in model.named_parameters()
            if ".feature_map_" in name or name.endswith("window_logit")}


def freeze_for_transfer(model: nn.Module) -> list[nn.Parameter]:
    """Stage 1: everything frozen except feature maps and gamma; returns the trainables."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(transfer_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    return params


def hybrid_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Feature maps and gamma of every converted layer, keyed by global layer index (for stitching)."""
    out = {}
    for idx, module in hybrid_modules(model).items():
        out[f"layers.{idx}.feature_map_q.weight"] = module.feature_map_q.weight.detach().clone()
        out[f"layers.{idx}.feature_map_k.weight"] = module.feature_map_k.weight.detach().clone()
        out[f"layers.{idx}.window_logit"] = module.window_logit.detach().clone()
    return out


def load_hybrid_state_dict(model: nn.Module, state: dict[str, torch.Tensor], layer_offset: int = 0) -> list[int]:
    """Load feature maps and gamma saved by hybrid_state_dict; keys name layers by index minus layer_offset."""
    modules = hybrid_modules(model)
    loaded = set()
    for key, tensor in state.items():
        parts = key.split(".")
        if len(parts) < 3 or parts[0] != "layers":
            raise ValueError(f"state: unexpected key {key!r}; expected layers.N.feature_map_q.weight etc.")
        idx = int(parts[1]) - layer_offset
        if idx not in modules:
            raise NoMatchingLayerError(f"state: key {key!r} names layer {idx}, which is not a converted layer")
        target = dict(modules[idx].named_parameters())[".".join(parts[2:])]
        if target.shape != tensor.shape:
            raise ValueError(f"state: {key} has shape {tuple(tensor.shape)} but the model expects "
                             f"{tuple(target.shape)} (check attention.feature_dim)")
        with torch.no_grad():
            target.copy_(tensor)
        loaded.add(idx)
    return sorted(loaded)
