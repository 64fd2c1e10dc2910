"""Sliding-window softmax attention with attention sinks: the training-free baseline (StreamingLLM-style)."""

from .naive import chunked_sliding_window_sink_attention, sliding_window_sink_attention, sliding_window_sink_mask

__all__ = ["chunked_sliding_window_sink_attention", "sliding_window_sink_attention", "sliding_window_sink_mask"]
