"""HyperAttention kernels (kernels/hyper_attention): the torch path and the Triton forward (interpreter,
fp32) against the dense naive estimator and against exact attention, plus the estimator's properties:
no double counting, no padding leak, GQA, causality, gradients through the normaliser."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it too; kernels are defined lazily

import pytest
import torch

from kernels.hyper_attention import (CausalSchedule, draw_plan, gray_rank, hyper_attention, hyper_weights, lsh_codes,
                                     naive_hyper_attention)
from kernels.hyper_attention.torch_path import exact_attention_lse

BACKENDS = ["torch", "triton"]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(batch, heads_q, heads_kv, t, dim, dim_v=None, seed=0, dtype=torch.float32, t_k=None):
    t_k = t if t_k is None else t_k
    return (randn(batch, heads_q, t, dim, seed=seed, dtype=dtype),
            randn(batch, heads_kv, t_k, dim, seed=seed + 1, dtype=dtype),
            randn(batch, heads_kv, t_k, dim_v or dim, seed=seed + 2, dtype=dtype))


def clustered_qk(t, dim, num_clusters=4, seed=0):
    """Queries and keys near a few shared directions: attention with heavy entries that sortLSH can find."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_clusters, dim, generator=g)
    k = centers[torch.randint(0, num_clusters, (1, 1, t), generator=g)] + 0.2 * torch.randn(1, 1, t, dim, generator=g)
    q = centers[torch.randint(0, num_clusters, (1, 1, t), generator=g)] + 0.2 * torch.randn(1, 1, t, dim, generator=g)
    return q, k, torch.randn(1, 1, t, dim, generator=g)


def exact(q, k, v, causal):
    out, lse = exact_attention_lse(q, k, v, q.shape[-1] ** -0.5, causal)
    return out, lse


def assert_close(actual, expected, atol=2e-5, rtol=2e-5):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# sortLSH and the schedule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bits", [1, 2, 3, 5, 7])
def test_gray_rank_puts_one_bit_neighbours_next_to_each_other(num_bits):
    buckets = torch.arange(1 << num_bits)
    rank = gray_rank(buckets, num_bits)
    assert sorted(rank.tolist()) == buckets.tolist()  # a permutation of the buckets
    by_rank = torch.argsort(rank)  # bucket id at each rank
    flips = [bin(a ^ b).count("1") for a, b in zip(by_rank[:-1].tolist(), by_rank[1:].tolist())]
    assert flips == [1] * ((1 << num_bits) - 1)


def test_lsh_codes_are_scale_invariant_and_separate_opposite_vectors():
    x = randn(1, 2, 50, 8)
    projections = randn(8, 6, seed=5)
    codes = lsh_codes(x, projections)
    assert codes.shape == (1, 2, 50) and codes.dtype == torch.int32
    assert torch.equal(codes, lsh_codes(3.0 * x, projections))
    assert not torch.equal(codes, lsh_codes(-x, projections))


@pytest.mark.parametrize("seq_len, min_seq_len, levels, leaf", [
    (4096, 4096, 0, 4096), (8192, 4096, 1, 4096), (131072, 4096, 5, 4096), (6000, 4096, 1, 3000), (37, 4, 4, 3)])
def test_causal_schedule(seq_len, min_seq_len, levels, leaf):
    schedule = CausalSchedule.build(seq_len, min_seq_len)
    assert (schedule.num_levels, schedule.leaf_len) == (levels, leaf)
    assert schedule.padded_len == leaf << levels and 0 <= schedule.padded_len - seq_len < 1 << levels


# ----------------------------------------------------------------------------------------------
# Exactness and agreement between implementations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, min_seq_len", [(True, 5), (True, 32), (False, 5)])
def test_exact_when_one_block_covers_the_sequence_and_sampling_is_off(backend, causal, min_seq_len):
    # min_seq_len=5 forces 3 recursion levels (causal) / the approximate non-causal path, so this checks
    # the sort, the block partition, the LSE merges and the un-sort, not a shortcut; min_seq_len=32 gives
    # leaves of 19 tokens, longer than the interpreter's 16-query tiles (the kernel's unmasked tiles).
    q, k, v = qkv(2, 4, 2, 37, 16, dim_v=8)
    out, lse = hyper_attention(q, k, v, causal=causal, block_size=64, sample_size=0, min_seq_len=min_seq_len,
                               seed=0, return_lse=True, backend=backend)
    expected_out, expected_lse = exact(q, k, v, causal)
    assert_close(out, expected_out)
    assert_close(lse, expected_lse)


CASES = {  # id: (kwargs for qkv, kwargs for hyper_attention)
    "causal-gqa-odd-length": (dict(batch=2, heads_q=4, heads_kv=2, t=45, dim=16, dim_v=8),
                              dict(causal=True, block_size=4, sample_size=5, min_seq_len=7, lsh_num_projs=3)),
    "causal-mha-pow2": (dict(batch=1, heads_q=2, heads_kv=2, t=64, dim=32),
                        dict(causal=True, block_size=8, sample_size=16, min_seq_len=16, lsh_num_projs=4)),
    "noncausal-cross-lengths": (dict(batch=2, heads_q=2, heads_kv=1, t=30, t_k=50, dim=16),
                                dict(causal=False, block_size=7, sample_size=9, min_seq_len=8, lsh_num_projs=2)),
    "noncausal-many-samples": (dict(batch=1, heads_q=3, heads_kv=3, t=40, dim=8),
                               dict(causal=False, block_size=10, sample_size=70, min_seq_len=8)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backends_equal_the_dense_estimator(backend, case):
    shape_kwargs, hyper_kwargs = CASES[case]
    q, k, v = qkv(**shape_kwargs)
    expected_out, expected_lse = naive_hyper_attention(q, k, v, seed=7, **hyper_kwargs)
    out, lse = hyper_attention(q, k, v, seed=7, return_lse=True, backend=backend, **hyper_kwargs)
    assert_close(out, expected_out)
    assert_close(lse, expected_lse)
    # and the approximation is really on: far from exact attention
    assert (out - exact(q, k, v, hyper_kwargs["causal"])[0]).abs().max() > 0.05


def test_same_seed_same_output_other_seed_other_output():
    q, k, v = qkv(1, 2, 2, 40, 16)
    kwargs = dict(causal=True, block_size=4, sample_size=4, min_seq_len=8, backend="torch")
    first = hyper_attention(q, k, v, seed=1, **kwargs)
    assert torch.equal(first, hyper_attention(q, k, v, seed=1, **kwargs))
    assert torch.equal(first, hyper_attention(q, k, v, generator=torch.Generator().manual_seed(1), **kwargs))
    assert not torch.allclose(first, hyper_attention(q, k, v, seed=2, **kwargs))


# ----------------------------------------------------------------------------------------------
# Estimator properties
# ----------------------------------------------------------------------------------------------


def test_error_decreases_as_the_sample_size_grows():
    q, k, v = clustered_qk(128, 16, num_clusters=8)
    expected, _ = exact(q, k, v, causal=False)
    mean_errors = []
    for sample_size in (4, 32, 256, 2048):
        errors = [(hyper_attention(q, k, v, causal=False, block_size=16, sample_size=sample_size, min_seq_len=8,
                                   seed=seed, backend="torch") - expected).norm() / expected.norm()
                  for seed in range(8)]
        mean_errors.append(torch.stack(errors).mean().item())
    assert all(a > b for a, b in zip(mean_errors, mean_errors[1:])), mean_errors
    assert mean_errors[-1] < mean_errors[0] / 8, mean_errors  # ~ 1/sqrt(m): 2048/4 = 512x samples


def test_normaliser_is_unbiased_so_in_block_keys_are_not_counted_twice():
    # E[exp(lse)] = exact sum: the block part is exact and the samples estimate only the keys outside the
    # block. Counting sampled in-block keys again would give 1 + (block share) ~ 1.7 here instead of 1.
    q, k, v = clustered_qk(64, 16, num_clusters=4)
    settings = dict(causal=False, block_size=16, lsh_num_projs=3, min_seq_len=8, seed=1)
    plan = draw_plan(q, k, sample_size=0, generator=None, **settings)
    logits = q @ k.transpose(-1, -2) / 4.0
    block_share = (hyper_weights(q, k, plan, causal=False, block_size=16) * logits.exp()).sum(-1) / logits.exp().sum(-1)
    assert block_share.mean() > 0.5  # the case is one where double counting would show

    draws = 512  # one batch entry per independent draw of the samples (the hash is shared)
    _, lse = hyper_attention(q.expand(draws, -1, -1, -1), k.expand(draws, -1, -1, -1), v.expand(draws, -1, -1, -1),
                             sample_size=8, return_lse=True, backend="torch", **settings)
    _, exact_lse = exact(q, k, v, causal=False)
    ratio = torch.exp(lse - exact_lse).mean(0)  # E[Z_hat / Z] per query row
    assert abs(ratio.mean().item() - 1.0) < 0.05, ratio.mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, t", [(True, 45), (False, 45)])
def test_padding_does_not_leak_softmax_mass(backend, causal, t):
    # 45 tokens: the causal schedule pads to 48 and blocks of ~4 keys are uneven. With v = 1 every row of a
    # normalised softmax is exactly 1; zero-value padding keys inside the normaliser would pull it below 1.
    q, k, _ = qkv(1, 2, 1, t, 8)
    v = torch.ones(1, 1, t, 4)
    out = hyper_attention(q, k, v, causal=causal, block_size=4, sample_size=6, min_seq_len=6, seed=3, backend=backend)
    assert_close(out, torch.ones_like(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_equals_repeated_kv(backend):
    q, k, v = qkv(1, 4, 2, 24, 16)
    kwargs = dict(causal=True, block_size=4, sample_size=6, min_seq_len=6, seed=11, backend=backend)
    grouped = hyper_attention(q, k, v, **kwargs)
    repeated = hyper_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), **kwargs)
    assert_close(grouped, repeated, atol=1e-6, rtol=1e-6)


def test_causal_output_never_depends_on_future_tokens():
    q, k, v = qkv(1, 2, 2, 48, 8)
    kwargs = dict(causal=True, block_size=4, sample_size=8, min_seq_len=6, seed=0, backend="torch")
    out = hyper_attention(q, k, v, **kwargs)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 30:] += 5.0
    v2[:, :, 30:] -= 5.0
    changed = hyper_attention(q, k2, v2, **kwargs)
    assert torch.equal(out[:, :, :30], changed[:, :, :30])
    assert not torch.allclose(out[:, :, 30:], changed[:, :, 30:])


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_through_the_lse_merge(causal):
    # float64, fixed hash and samples: finite differences of y and lse (the normaliser is not detached).
    q, k, v = qkv(1, 2, 1, 12, 4, seed=3, dtype=torch.float64)
    inputs = [x.requires_grad_(True) for x in (q, k, v)]

    def fn(q, k, v):
        return hyper_attention(q, k, v, causal=causal, block_size=2, sample_size=3, lsh_num_projs=2, min_seq_len=3,
                               seed=4, return_lse=True, backend="torch")
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_equal_the_dense_estimator(backend):
    q, k, v = qkv(1, 4, 2, 33, 8, seed=5)
    kwargs = dict(causal=True, block_size=4, sample_size=5, min_seq_len=6, seed=9)
    grad_out = randn(1, 4, 33, 8, seed=42)
    grad_lse = randn(1, 4, 33, seed=43)

    def grads(fn, **extra):
        inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out, lse = fn(*inputs, **kwargs, **extra)
        torch.autograd.backward((out, lse), (grad_out, grad_lse))
        return [x.grad for x in inputs]

    expected = grads(naive_hyper_attention)
    actual = grads(hyper_attention, return_lse=True, backend=backend)
    for a, e in zip(actual, expected):
        assert_close(a, e, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(q=randn(2, 3, 8, 4)), "multiple of the key/value heads"),
    (dict(q=randn(2, 4, 8)), "4 dims"),
    (dict(k=randn(2, 2, 8, 5)), "head dim"),
    (dict(v=randn(2, 2, 7, 4)), "same heads and tokens"),
    (dict(q=randn(2, 4, 6, 4)), "causal=True needs"),
    (dict(block_size=0), "block_size"),
    (dict(sample_size=-1), "sample_size"),
    (dict(lsh_num_projs=0), "lsh_num_projs"),
    (dict(min_seq_len=0), "min_seq_len"),
    (dict(scale=-1.0), "scale"),
    (dict(seed=1, generator=torch.Generator()), "either seed or generator"),
    (dict(backend="cuda"), "backend"),
    (dict(q=randn(2, 4, 8, 4, dtype=torch.float64)), "share a dtype"),
])
def test_bad_inputs_raise_value_errors(change, message):
    args = dict(q=randn(2, 4, 8, 4), k=randn(2, 2, 8, 4), v=randn(2, 2, 8, 4))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        hyper_attention(**args)


# ----------------------------------------------------------------------------------------------
# GPU tier: the compiled kernel in bf16 (run with `pytest -m gpu` on the GPU machine)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_triton_equals_torch_path(causal, head_dim):
    from kernels.hyper_attention.torch_path import hyper_attention_torch
    q, k, v = (x.cuda().to(torch.bfloat16) for x in qkv(2, 8, 2, 3000, head_dim))
    settings = dict(causal=causal, block_size=128, sample_size=96, lsh_num_projs=5, min_seq_len=700, seed=1)
    out = hyper_attention(q, k, v, backend="triton", **settings)
    plan = draw_plan(q, k, generator=None, **settings)
    expected, _ = hyper_attention_torch(q, k, v, plan, causal=causal, scale=head_dim ** -0.5, block_size=128)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
    assert (out.float() - exact(q.float(), k.float(), v.float(), causal)[0]).abs().max() > 0.05
