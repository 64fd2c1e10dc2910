"""HyperAttention: sortLSH blocks + sampled columns + causal recursion (README.md has the math).

`hyper_attention` is the op; `naive_hyper_attention` is the dense ground truth computing the same
estimator from the same seed. The Triton kernel module is imported only when it runs.
"""

from .attention import hyper_attention, triton_available
from .common import CausalSchedule, HyperPlan, draw_plan, gray_rank, lsh_codes
from .naive import hyper_weights, naive_hyper_attention

__all__ = [
    "CausalSchedule",
    "HyperPlan",
    "draw_plan",
    "gray_rank",
    "hyper_attention",
    "hyper_weights",
    "lsh_codes",
    "naive_hyper_attention",
    "triton_available",
]
