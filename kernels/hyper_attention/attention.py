"""Public HyperAttention op: input checks, the random plan, backend dispatch and the autograd wrapper.

Backends: "triton" runs the fused forward kernel (triton_fwd.py; GPU, or CPU under TRITON_INTERPRET=1)
and, when a gradient is needed, recomputes the differentiable torch path (torch_path.py) in backward;
"torch" is the torch path for forward and backward; "auto" picks "triton" on CUDA, "torch" otherwise.
All backends compute the same estimator from the same plan (README.md next to this file).
"""

from __future__ import annotations

import math

import torch

from .common import HyperPlan, check_hyper_inputs, draw_plan
from .torch_path import hyper_attention_torch

__all__ = ["hyper_attention", "triton_available"]


def triton_available() -> bool:
    """True when the Triton kernel can run here: a CUDA device, or the CPU interpreter."""
    import os
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


class _HyperTriton(torch.autograd.Function):
    """Triton forward; backward = autograd through the torch path recomputed from the same plan, so the
    gradient of the log-sum-exp merge reaches dQ and dK (nothing is detached)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: HyperPlan, settings: dict):
        from .triton_fwd import hyper_attention_triton_fwd
        out, lse = hyper_attention_triton_fwd(q, k, v, plan, **settings)
        ctx.save_for_backward(q, k, v)
        ctx.plan, ctx.settings = plan, settings
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v = ctx.saved_tensors
        settings = {key: ctx.settings[key] for key in ("causal", "scale", "block_size")}
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(True) for x in (q, k, v)]
            out, lse = hyper_attention_torch(*inputs, ctx.plan, **settings)
            grads = torch.autograd.grad((out, lse), inputs, (grad_out, grad_lse), allow_unused=True)
        return (*grads, None, None)


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    block_size: int = 256, sample_size: int = 256, lsh_num_projs: int = 7,
                    min_seq_len: int = 4096, scale: float | None = None, seed: int | None = None,
                    generator: torch.Generator | None = None, return_lse: bool = False, backend: str = "auto"):
    """HyperAttention (Han et al. 2023): near-linear approximate softmax attention for long prompts.

    Each query attends exactly to the keys of its sortLSH block (queries and keys sorted by an angular
    LSH code over `lsh_num_projs` random hyperplanes, Gray-code bucket order, cut into equal blocks of
    about `block_size` keys) and, through `sample_size` uniformly sampled key columns weighted
    T_k / sample_size, approximately to the rest; samples in the query's own block are excluded, so no
    key is counted twice. The two parts are merged by log-sum-exp. causal=True applies the paper's
    recursion: split in halves, approximate the (unmasked) past block, recurse on the diagonal halves,
    exact causal attention once a block is at most `min_seq_len` long. Inputs no longer than
    `min_seq_len` therefore get exact attention.

    Args:
        q: (B, Hq, T_q, D) queries (after RoPE).
        k: (B, Hkv, T_k, D) keys; Hq must be a multiple of Hkv (GQA: query head h reads kv head
            h // (Hq // Hkv)); keys are never repeated per query head.
        v: (B, Hkv, T_k, Dv) values.
        causal: causal self-attention (needs T_q == T_k; query t sees keys 0..t). Default: True.
        block_size: keys per sortLSH block. Default: 256.
        sample_size: uniformly sampled key columns per (batch, query head, sub-problem); 0 turns the
            residual off. Default: 256.
        lsh_num_projs: random hyperplanes r (2^r buckets). Default: 7.
        min_seq_len: causal blocks of at most this length, and non-causal inputs with at most this many
            keys, are computed exactly. Default: 4096.
        scale: softmax scale; None means 1/sqrt(D).
        seed / generator: source of the hyperplanes and samples (at most one); equal seeds give equal
            outputs. Neither: torch's global RNG.
        return_lse: also return the natural-log normaliser lse (B, Hq, T_q), float32 (float64 for
            float64 inputs); it is differentiable.
        backend: "auto" (Triton on CUDA, torch otherwise), "triton" or "torch".

    Returns:
        y (B, Hq, T_q, Dv) in q.dtype, or (y, lse) with return_lse=True.
    """
    check_hyper_inputs(q, k, v, causal=causal, block_size=block_size, sample_size=sample_size,
                       lsh_num_projs=lsh_num_projs, min_seq_len=min_seq_len, scale=scale, seed=seed,
                       generator=generator, backend=backend)
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                             "use backend='torch'")
        if q.dtype == torch.float64:
            raise ValueError("backend='triton' computes in float32; use backend='torch' for float64 inputs")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan = draw_plan(q, k, causal=causal, block_size=block_size, sample_size=sample_size,
                     lsh_num_projs=lsh_num_projs, min_seq_len=min_seq_len, seed=seed, generator=generator)
    if backend == "torch":
        out, lse = hyper_attention_torch(q, k, v, plan, causal=causal, scale=scale, block_size=block_size)
    elif torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        out, lse = _HyperTriton.apply(q, k, v, plan, dict(causal=causal, scale=scale, block_size=block_size))
    else:
        from .triton_fwd import hyper_attention_triton_fwd
        out, lse = hyper_attention_triton_fwd(q, k, v, plan, causal=causal, scale=scale, block_size=block_size)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
