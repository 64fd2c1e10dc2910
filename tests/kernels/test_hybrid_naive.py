"""Tests of kernels/hybrid_attention/naive.py: the three forms of the hybrid attention agree with each
other and with the definition, the windows are the ones specified, prefill hands decode the right
state, the limits (whole window, γ → 0) reduce to softmax and linear attention, gradients match,
and bad inputs raise ValueError. fp32, small seeded inputs.
"""

import math

import pytest
import torch

from kernels.hybrid_attention import (
    WINDOW_KINDS,
    causal_linear_attention,
    causal_softmax_attention,
    chunked_hybrid_attention,
    empty_hybrid_state,
    hybrid_normalizer_split,
    prefill_hybrid_state,
    quadratic_hybrid_attention,
    recurrent_hybrid_attention,
    recurrent_hybrid_step,
    window_masks,
)

HEADS = [pytest.param((4, 2), id="gqa-4q2kv"), pytest.param((3, 3), id="mha-3")]
HEAD_DIM = 24  # deliberately not a power of two
FEATURE_DIM = 16


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which costs ~15x
    when the 2 CPU cores are shared with other work. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_inputs(num_tokens, heads=(4, 2), batch=2, seed=0, dtype=torch.float32,
                head_dim=HEAD_DIM, feature_dim=FEATURE_DIM):
    """Random hybrid-attention inputs; features are positive like Hedgehog's [softmax(x) ‖ softmax(−x)]."""
    num_q_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def features():
        x = randn(batch, num_q_heads, num_tokens, feature_dim // 2)
        return torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1)

    inputs = dict(
        q=randn(batch, num_q_heads, num_tokens, head_dim),
        k=randn(batch, num_kv_heads, num_tokens, head_dim),
        v=randn(batch, num_kv_heads, num_tokens, head_dim),
        q_feat=features(),
        k_feat=features(),
        gamma=torch.rand(num_q_heads, generator=gen) * 0.8 + 0.1,
    )
    return {name: t.to(dtype) if name != "gamma" else t for name, t in inputs.items()}


def in_window(n, i, window_size, window_kind):
    """The specification, written independently of naive.py: is key i in W(n)?"""
    if window_kind == "sliding":
        return n - window_size < i <= n
    return i <= n and i // window_size >= n // window_size - 1


def in_linear(n, i, window_size, window_kind):
    """Is key i in Λ(n)?"""
    if window_kind == "sliding":
        return i <= n - window_size
    return i // window_size <= n // window_size - 2


def hybrid_by_definition(q, k, v, q_feat, k_feat, gamma, window_size, window_kind):
    """Position by position, head by head, straight from the formula (slow; tiny inputs only)."""
    batch, num_q_heads, num_tokens, head_dim = q.shape
    group = num_q_heads // k.shape[1]
    y = torch.zeros(batch, num_q_heads, num_tokens, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_q_heads):
            kv_head = h // group
            for n in range(num_tokens):
                window = [i for i in range(n + 1) if in_window(n, i, window_size, window_kind)]
                linear = [j for j in range(n + 1) if in_linear(n, j, window_size, window_kind)]
                scores = {i: float(q[b, h, n] @ k[b, kv_head, i]) / math.sqrt(head_dim) for i in window}
                c = max(scores.values())
                num = torch.zeros(head_dim, dtype=torch.float64)
                den = 0.0
                for i in window:
                    weight = float(gamma[h]) * math.exp(scores[i] - c)
                    num += weight * v[b, kv_head, i].double()
                    den += weight
                for j in linear:
                    weight = float(q_feat[b, h, n] @ k_feat[b, h, j])
                    num += weight * v[b, kv_head, j].double()
                    den += weight
                y[b, h, n] = num / den
    return y.float()


def assert_rel_close(actual, expected, tol, name=""):
    """‖actual − expected‖ ≤ tol·‖expected‖ (fails on NaN / inf)."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = (actual - expected).norm().item()
    scale = expected.norm().item()
    assert error <= tol * scale, f"{name}: relative error {error / max(scale, 1e-30):.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
@pytest.mark.parametrize("window_size", [1, 3, 8, 64])
def test_masks_match_specification(window_kind, window_size):
    num_tokens = 150
    window_mask, linear_mask = window_masks(num_tokens, window_size, window_kind)
    assert window_mask.dtype == torch.bool and window_mask.shape == (num_tokens, num_tokens)
    expected_window = torch.tensor(
        [[in_window(n, i, window_size, window_kind) for i in range(num_tokens)] for n in range(num_tokens)]
    )
    expected_linear = torch.tensor(
        [[in_linear(n, i, window_size, window_kind) and i <= n for i in range(num_tokens)] for n in range(num_tokens)]
    )
    assert torch.equal(window_mask, expected_window)
    assert torch.equal(linear_mask, expected_linear)
    # Partition of the causal keys: disjoint, and together exactly i <= n.
    assert not (window_mask & linear_mask).any()
    assert torch.equal(window_mask | linear_mask, torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril())
    counts = window_mask.sum(dim=1)
    positions = torch.arange(num_tokens)
    if window_kind == "sliding":
        assert torch.equal(counts, torch.clamp(positions + 1, max=window_size))
    else:
        assert counts.min() >= 1 and counts.max() <= 2 * window_size
        # From the second block on, the whole previous block is in the window: w + 1 .. 2w keys.
        later = counts[window_size:]
        assert later.min() == window_size + 1 and later.max() == min(2 * window_size, num_tokens)


def test_terrace_blocks_are_aligned_to_the_sequence_start():
    # Position 70 with w = 64 is in block 1: its window is keys 0..70, with nothing linear yet, at
    # any sequence length (the reference code would align blocks to the end instead).
    for num_tokens in (71, 100, 130):
        window_mask, linear_mask = window_masks(num_tokens, 64, "terrace")
        assert window_mask[70, :71].all() and not linear_mask[70].any()
    window_mask, linear_mask = window_masks(130, 64, "terrace")
    assert linear_mask[128, :64].all() and not linear_mask[128, 64:].any()  # block 2 drops block 0


# ----------------------------------------------------------------------------------------------
# The three forms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
@pytest.mark.parametrize("heads", HEADS)
def test_quadratic_matches_the_definition(window_kind, heads):
    inputs = make_inputs(num_tokens=21, heads=heads, batch=1, seed=1)
    expected = hybrid_by_definition(**inputs, window_size=4, window_kind=window_kind)
    actual = quadratic_hybrid_attention(**inputs, window_size=4, window_kind=window_kind)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


LENGTHS = [(64, t) for t in (1, 63, 64, 65, 200)] + [(8, t) for t in (1, 7, 8, 9, 17, 50)]


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window_size,num_tokens", LENGTHS)
def test_quadratic_chunked_recurrent_agree(window_kind, heads, window_size, num_tokens):
    inputs = make_inputs(num_tokens, heads=heads, seed=num_tokens)
    quadratic = quadratic_hybrid_attention(**inputs, window_size=window_size, window_kind=window_kind)
    chunked = chunked_hybrid_attention(**inputs, window_size=window_size, window_kind=window_kind)
    recurrent = recurrent_hybrid_attention(**inputs, window_size=window_size, window_kind=window_kind)
    assert quadratic.shape == (2, heads[0], num_tokens, HEAD_DIM)
    torch.testing.assert_close(chunked, quadratic, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recurrent, quadratic, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_kind,chunk_size",
                         [("sliding", 13), ("sliding", 24), ("terrace", 16), ("terrace", 24)])
def test_chunked_with_larger_chunks(window_kind, chunk_size):
    inputs = make_inputs(num_tokens=70, seed=3)
    expected = quadratic_hybrid_attention(**inputs, window_size=8, window_kind=window_kind)
    actual = chunked_hybrid_attention(**inputs, window_size=8, window_kind=window_kind, chunk_size=chunk_size)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_empty_sequence():
    inputs = make_inputs(num_tokens=0)
    for attention in (quadratic_hybrid_attention, chunked_hybrid_attention, recurrent_hybrid_attention):
        assert attention(**inputs, window_size=8).shape == (2, 4, 0, HEAD_DIM)


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
@pytest.mark.parametrize("heads", HEADS)
def test_gradients_agree(window_kind, heads):
    inputs = make_inputs(num_tokens=45, heads=heads, seed=4)
    leaves = {name: t.clone().requires_grad_(True) for name, t in inputs.items()}
    upstream = torch.randn(2, heads[0], 45, HEAD_DIM, generator=torch.Generator().manual_seed(5))

    def gradients(attention):
        y = attention(**leaves, window_size=8, window_kind=window_kind)
        return torch.autograd.grad((y * upstream).sum(), list(leaves.values()))

    expected = gradients(quadratic_hybrid_attention)
    for attention in (chunked_hybrid_attention, recurrent_hybrid_attention):
        for name, actual, reference in zip(leaves, gradients(attention), expected):
            assert reference.abs().sum() > 0, f"{name}: zero gradient, the test would be vacuous"
            assert_rel_close(actual, reference, 1e-5, f"{attention.__name__} d/d{name}")


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
def test_bf16_inputs_are_computed_in_fp32(window_kind):
    inputs = make_inputs(num_tokens=40, seed=6, dtype=torch.bfloat16)
    upcast = {name: t.float() for name, t in inputs.items()}
    expected = quadratic_hybrid_attention(**upcast, window_size=8, window_kind=window_kind)
    for attention in (quadratic_hybrid_attention, chunked_hybrid_attention, recurrent_hybrid_attention):
        actual = attention(**inputs, window_size=8, window_kind=window_kind)
        assert actual.dtype == torch.bfloat16
        # Only the final rounding to bf16 differs from the fp32 result.
        torch.testing.assert_close(actual.float(), expected, atol=1e-2, rtol=1e-2)
    assert torch.equal(quadratic_hybrid_attention(**inputs, window_size=8, window_kind=window_kind),
                       expected.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# Prefill and decode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window_size,prefill_tokens", [(64, 1), (64, 63), (64, 64), (64, 65), (64, 100),
                                                        (8, 0), (8, 7), (8, 8), (8, 9), (8, 30)])
def test_prefill_then_decode_matches_quadratic(window_kind, heads, window_size, prefill_tokens):
    num_tokens = prefill_tokens + 2 * window_size + 3  # decode across at least two block boundaries
    inputs = make_inputs(num_tokens, heads=heads, seed=7)
    expected = quadratic_hybrid_attention(**inputs, window_size=window_size, window_kind=window_kind)

    prompt = {name: t[:, :, :prefill_tokens] for name, t in inputs.items() if name != "gamma"}
    prompt_out = chunked_hybrid_attention(**prompt, gamma=inputs["gamma"], window_size=window_size,
                                          window_kind=window_kind)
    torch.testing.assert_close(prompt_out, expected[:, :, :prefill_tokens], atol=1e-5, rtol=1e-5)
    state = prefill_hybrid_state(prompt["k"], prompt["v"], prompt["k_feat"], window_size, window_kind)
    assert state.num_tokens == prefill_tokens

    decoded = []
    for n in range(prefill_tokens, num_tokens):
        token = {name: t[:, :, n:n + 1] for name, t in inputs.items() if name != "gamma"}
        y, state = recurrent_hybrid_step(**token, gamma=inputs["gamma"], state=state,
                                         window_size=window_size, window_kind=window_kind)
        decoded.append(y)
    torch.testing.assert_close(torch.cat(decoded, dim=2), expected[:, :, prefill_tokens:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
@pytest.mark.parametrize("num_tokens", [5, 8, 9, 20, 23, 24])
def test_prefill_state_holds_exactly_the_keys_outside_the_next_window(window_kind, num_tokens):
    window_size = 8
    inputs = make_inputs(num_tokens, seed=8)
    state = prefill_hybrid_state(inputs["k"], inputs["v"], inputs["k_feat"], window_size, window_kind)
    # Keys of the next query position T: the window part is kept raw, the linear part is summed.
    next_query = [in_window(num_tokens, i, window_size, window_kind) for i in range(num_tokens)]
    window = torch.tensor(next_query, dtype=torch.bool)
    assert torch.equal(state.window_k, inputs["k"][:, :, window])
    assert torch.equal(state.window_v, inputs["v"][:, :, window])
    assert torch.equal(state.window_k_feat, inputs["k_feat"][:, :, window])
    linear_feat = inputs["k_feat"][:, :, ~window]
    linear_v = inputs["v"].repeat_interleave(2, dim=1)[:, :, ~window]
    assert state.kv.dtype == torch.float32 and state.k_sum.dtype == torch.float32
    torch.testing.assert_close(state.kv, linear_feat.transpose(-1, -2) @ linear_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state.k_sum, linear_feat.sum(dim=2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
def test_state_size_does_not_grow_with_length(window_kind):
    window_size = 8
    max_window = window_size - 1 if window_kind == "sliding" else 2 * window_size - 1
    inputs = make_inputs(num_tokens=120, seed=9)
    bound = empty_hybrid_state(2, 4, 2, HEAD_DIM, FEATURE_DIM, torch.float32, "cpu").nbytes() + max_window * (
        2 * 2 * HEAD_DIM + 4 * FEATURE_DIM
    ) * 2 * 4  # per window key: k and v at Hkv=2, features at Hq=4; batch 2; fp32
    sizes = []
    state = empty_hybrid_state(2, 4, 2, HEAD_DIM, FEATURE_DIM, torch.float32, "cpu")
    for n in range(120):
        token = {name: t[:, :, n:n + 1] for name, t in inputs.items() if name != "gamma"}
        _, state = recurrent_hybrid_step(**token, gamma=inputs["gamma"], state=state, window_size=window_size,
                                         window_kind=window_kind)
        assert state.window_length <= max_window
        sizes.append(state.nbytes())
    assert max(sizes) <= bound
    assert max(sizes) == bound  # the bound is reached, so the check above is not vacuous
    # Periodic in the block length once the window is full: the size at T and T + w is the same.
    assert sizes[40:60] == sizes[48:68]
    long_state = prefill_hybrid_state(inputs["k"], inputs["v"], inputs["k_feat"], window_size, window_kind)
    short = {name: t[:, :, :120 - 6 * window_size] for name, t in inputs.items() if name != "gamma"}
    short_state = prefill_hybrid_state(short["k"], short["v"], short["k_feat"], window_size, window_kind)
    assert long_state.nbytes() == short_state.nbytes()


def test_step_does_not_modify_its_input_state():
    inputs = make_inputs(num_tokens=12, seed=10)
    state = prefill_hybrid_state(inputs["k"][:, :, :11], inputs["v"][:, :, :11], inputs["k_feat"][:, :, :11], 4,
                                 "terrace")
    kv_before, window_before = state.kv.clone(), state.window_k.clone()
    token = {name: t[:, :, 11:] for name, t in inputs.items() if name != "gamma"}
    y1, _ = recurrent_hybrid_step(**token, gamma=inputs["gamma"], state=state, window_size=4, window_kind="terrace")
    y2, _ = recurrent_hybrid_step(**token, gamma=inputs["gamma"], state=state, window_size=4, window_kind="terrace")
    assert torch.equal(y1, y2)
    assert torch.equal(state.kv, kv_before) and torch.equal(state.window_k, window_before)
    assert state.num_tokens == 11


# ----------------------------------------------------------------------------------------------
# Limits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window_kind,window_size,num_tokens", [
    ("sliding", 64, 64), ("sliding", 100, 64), ("terrace", 64, 64), ("terrace", 32, 64), ("terrace", 8, 16),
])
@pytest.mark.parametrize("gamma_value", [1e-3, 0.1, 0.9])
@pytest.mark.parametrize("heads", HEADS)
def test_window_covering_everything_is_softmax_attention(window_kind, window_size, num_tokens, gamma_value, heads):
    inputs = make_inputs(num_tokens, heads=heads, seed=11)
    inputs["gamma"] = torch.full((heads[0],), gamma_value)
    expected = causal_softmax_attention(inputs["q"], inputs["k"], inputs["v"])
    for attention in (quadratic_hybrid_attention, chunked_hybrid_attention, recurrent_hybrid_attention):
        actual = attention(**inputs, window_size=window_size, window_kind=window_kind)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
@pytest.mark.parametrize("heads", HEADS)
def test_tiny_gamma_is_linear_attention_over_the_tail(window_kind, heads):
    window_size, num_tokens = 8, 60
    inputs = make_inputs(num_tokens, heads=heads, seed=12)
    inputs["gamma"] = torch.full((heads[0],), 1e-12)
    window_mask, linear_mask = window_masks(num_tokens, window_size, window_kind)
    has_tail = linear_mask.any(dim=1)
    assert has_tail.sum() > num_tokens // 2 and not has_tail.all()

    # Linear attention over Λ(n) only, written out here.
    group = heads[0] // heads[1]
    v = inputs["v"].repeat_interleave(group, dim=1)
    tail_weights = (inputs["q_feat"] @ inputs["k_feat"].transpose(-1, -2)) * linear_mask
    tail_only = (tail_weights @ v) / tail_weights.sum(-1, keepdim=True).clamp_min(1e-30)
    # Where Λ(n) is empty, γ cancels and the hybrid is softmax over the window, which is all keys 0..n.
    softmax = causal_softmax_attention(inputs["q"], inputs["k"], inputs["v"])

    for attention in (quadratic_hybrid_attention, chunked_hybrid_attention, recurrent_hybrid_attention):
        actual = attention(**inputs, window_size=window_size, window_kind=window_kind)
        torch.testing.assert_close(actual[:, :, has_tail], tail_only[:, :, has_tail], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(actual[:, :, ~has_tail], softmax[:, :, ~has_tail], atol=1e-5, rtol=1e-5)

    # With no window at all (w = 1 leaves only the query itself, weighted 1e-12) it is causal linear
    # attention shifted by one key; check the plain reference against the hand-written form instead.
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    all_weights = (inputs["q_feat"] @ inputs["k_feat"].transpose(-1, -2)) * causal
    torch.testing.assert_close(
        causal_linear_attention(inputs["q"], inputs["k"], inputs["v"], inputs["q_feat"], inputs["k_feat"]),
        (all_weights @ v) / all_weights.sum(-1, keepdim=True), atol=1e-5, rtol=1e-5,
    )


def test_window_max_is_part_of_the_model():
    # c_n is the max over the window only and the linear terms are not rescaled by exp(−c_n): adding
    # a constant to one query's scores (scaling q) changes the output when Λ(n) is non-empty.
    inputs = make_inputs(num_tokens=20, seed=13)
    base = quadratic_hybrid_attention(**inputs, window_size=4, window_kind="sliding")
    scaled = dict(inputs, q=inputs["q"] * 3.0)
    changed = quadratic_hybrid_attention(**scaled, window_size=4, window_kind="sliding")
    assert (base[:, :, 4:] - changed[:, :, 4:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def _replace(**changes):
    inputs = make_inputs(num_tokens=10, seed=14)
    inputs.update(changes)
    return inputs


def _bf16_state():
    state = empty_hybrid_state(2, 4, 2, HEAD_DIM, FEATURE_DIM, torch.float32, "cpu")
    state.kv = state.kv.bfloat16()
    return state


BAD_CALLS = [
    ("kv heads do not divide q heads", lambda: quadratic_hybrid_attention(
        **_replace(k=torch.randn(2, 3, 10, HEAD_DIM), v=torch.randn(2, 3, 10, HEAD_DIM))), "multiple of"),
    ("unknown window kind", lambda: chunked_hybrid_attention(**_replace(), window_kind="banded"), "window_kind"),
    ("zero window", lambda: quadratic_hybrid_attention(**_replace(), window_size=0), "window_size"),
    ("float window", lambda: quadratic_hybrid_attention(**_replace(), window_size=8.0), "window_size"),
    ("mismatched T in q", lambda: quadratic_hybrid_attention(
        **_replace(q=torch.randn(2, 4, 9, HEAD_DIM))), "q must be"),
    ("mismatched T in k_feat", lambda: chunked_hybrid_attention(
        **_replace(k_feat=torch.rand(2, 4, 9, FEATURE_DIM))), "k_feat"),
    ("q_feat differs from k_feat", lambda: chunked_hybrid_attention(
        **_replace(q_feat=torch.rand(2, 4, 10, FEATURE_DIM + 1))), "q_feat"),
    ("v differs from k", lambda: quadratic_hybrid_attention(
        **_replace(v=torch.randn(2, 2, 10, HEAD_DIM + 1))), "v must"),
    ("3-D q", lambda: quadratic_hybrid_attention(**_replace(q=torch.randn(4, 10, HEAD_DIM))), "4-D"),
    ("gamma with the reference layout", lambda: quadratic_hybrid_attention(
        **_replace(gamma=torch.rand(1, 4, 1, 1))), "gamma"),
    ("chunk smaller than a sliding window", lambda: chunked_hybrid_attention(
        **_replace(), window_size=8, chunk_size=4), "chunk_size"),
    ("chunk not a multiple of the terrace block", lambda: chunked_hybrid_attention(
        **_replace(), window_size=8, window_kind="terrace", chunk_size=12), "chunk_size"),
    ("several tokens in one step", lambda: recurrent_hybrid_step(
        **_replace(), state=empty_hybrid_state(2, 4, 2, HEAD_DIM, FEATURE_DIM, torch.float32, "cpu")), "one token"),
    ("state of other shapes", lambda: recurrent_hybrid_step(
        **{name: t[:, :, :1] if t.dim() == 4 else t for name, t in _replace().items()},
        state=empty_hybrid_state(2, 4, 4, HEAD_DIM, FEATURE_DIM, torch.float32, "cpu")), "state"),
    ("state with a bf16 linear part", lambda: recurrent_hybrid_step(
        **{name: t[:, :, :1] if t.dim() == 4 else t for name, t in _replace().items()},
        state=_bf16_state()), "fp32"),
    ("bad window in masks", lambda: window_masks(10, 8, "sliding-window"), "window_kind"),
    ("bad prefill heads", lambda: prefill_hybrid_state(
        torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), torch.rand(1, 4, 5, 4), 8, "sliding"), "multiple of"),
]


@pytest.mark.parametrize("description,call,fragment", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_raise_value_error(description, call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


@pytest.mark.parametrize("attention", [quadratic_hybrid_attention, chunked_hybrid_attention])
@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
def test_gradients_match_finite_differences(attention, window_kind):
    # Checks the gradient itself (the agreement test above cannot see a mistake shared by all forms,
    # such as detaching the window max c_n, which the output depends on). fp64 computes in fp64.
    inputs = make_inputs(num_tokens=10, heads=(2, 1), batch=1, seed=15, dtype=torch.float64,
                         head_dim=5, feature_dim=4)
    inputs["gamma"] = inputs["gamma"].double()
    leaves = tuple(t.requires_grad_(True) for t in inputs.values())

    def function(*tensors):
        return attention(*tensors, window_size=3, window_kind=window_kind)

    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("window_kind", WINDOW_KINDS)
@pytest.mark.parametrize("heads", HEADS)
def test_normalizer_split_sums_to_the_definition(window_kind, heads):
    """Window mass + linear mass is the hybrid's normalizer (the weights' row sum), chunking queries changes
    nothing, and the linear mass is zero exactly where Λ(n) is empty."""
    from kernels.hybrid_attention.naive import _hybrid_weights, _repeat_kv

    inputs = make_inputs(37, heads=heads)
    window_size = 5
    window, linear = hybrid_normalizer_split(inputs["q"], inputs["k"], inputs["q_feat"], inputs["k_feat"],
                                             inputs["gamma"], window_size, window_kind, query_chunk=7)
    window_mask, linear_mask = window_masks(37, window_size, window_kind)
    k = _repeat_kv(inputs["k"], heads[0])
    full = _hybrid_weights(inputs["q"], k, inputs["q_feat"], inputs["k_feat"], inputs["gamma"], window_mask,
                           linear_mask).sum(-1)
    torch.testing.assert_close(window + linear, full, rtol=1e-5, atol=1e-6)
    has_linear = linear_mask.any(dim=-1)
    assert torch.all(linear[..., ~has_linear] == 0) and torch.all(linear[..., has_linear] > 0)
    whole = hybrid_normalizer_split(inputs["q"], inputs["k"], inputs["q_feat"], inputs["k_feat"], inputs["gamma"],
                                    window_size, window_kind, query_chunk=1000)
    torch.testing.assert_close(whole[0], window) and torch.testing.assert_close(whole[1], linear)
