"""LoLCATs hybrid attention (softmax window + linear tail, one shared normalizer).

`naive` holds the pure-PyTorch ground truth (quadratic, chunked, recurrent); the math is in README.md.
"""

from kernels.hybrid_attention.naive import (
    WINDOW_KINDS,
    HybridState,
    causal_linear_attention,
    causal_softmax_attention,
    check_attention_inputs,
    check_hybrid_inputs,
    check_state,
    check_window,
    chunked_hybrid_attention,
    empty_hybrid_state,
    hybrid_normalizer_split,
    prefill_hybrid_state,
    quadratic_hybrid_attention,
    recurrent_hybrid_attention,
    recurrent_hybrid_step,
    window_masks,
    window_start,
)

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


def __getattr__(name):
    # The Triton fast paths are imported on first use, so the references work where triton is absent.
    if name in ("triton_hybrid_attention", "triton_hybrid_decode_step"):
        from kernels.hybrid_attention import triton_api
        return getattr(triton_api, name)
    raise AttributeError(f"module 'kernels.hybrid_attention' has no attribute {name!r}")
