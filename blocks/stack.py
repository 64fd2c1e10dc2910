"""A stack of consecutive decoder layers with the model's rotary embedding: what one block worker holds.

Input and output are the raw residual stream (before each layer's input_layernorm), so a stack can be
fed the boundary states of the hidden-state cache and produce the next boundary.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerStack(nn.Module):
    """Decoder layers [start, start + len(layers)) of one model."""

    def __init__(self, layers: nn.ModuleList, rotary_emb: nn.Module, start: int, config):
        super().__init__()
        self.layers, self.rotary_emb, self.start, self.config = layers, rotary_emb, start, config

    @property
    def end(self) -> int:
        return self.start + len(self.layers)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, position_ids=position_ids, position_embeddings=position_embeddings)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    @classmethod
    def from_model(cls, model: nn.Module, start: int, end: int) -> "LayerStack":
        """A view of layers [start, end) of a whole HF causal LM (shares its modules)."""
        inner = getattr(model, "model", model)
        return cls(nn.ModuleList(inner.layers[start:end]), inner.rotary_emb, start, model.config)
