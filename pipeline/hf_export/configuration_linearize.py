"""Configuration of a model exported by `linearize export`: the base family's config plus `hybrid_attention`.

`hybrid_attention` = {"window_size", "window_kind", "feature_dim", "layers"}: the converted layers use the
LoLCATs hybrid (softmax over a window + Hedgehog linear attention over older tokens), every other layer
keeps the family's softmax attention. The model_type differs from the base family's on purpose: loading
this directory without `trust_remote_code=True` fails instead of silently dropping the feature maps.
"""

from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

HYBRID_KEYS = ("window_size", "window_kind", "feature_dim", "layers")


def check_hybrid_attention(settings) -> dict:
    if not isinstance(settings, dict) or any(key not in settings for key in HYBRID_KEYS):
        raise ValueError(f"hybrid_attention: expected a mapping with keys {HYBRID_KEYS}, got {settings!r}; "
                         "re-export the model with `linearize export`")
    return settings


class LinearizedLlamaConfig(LlamaConfig):
    model_type = "linearize_llama"


class LinearizedMistralConfig(MistralConfig):
    model_type = "linearize_mistral"


class LinearizedQwen2Config(Qwen2Config):
    model_type = "linearize_qwen2"


class LinearizedQwen3Config(Qwen3Config):
    model_type = "linearize_qwen3"
