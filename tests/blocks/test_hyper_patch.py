"""HyperAttention patch of tiny random Hugging Face models (blocks/hyper_attention.py): selection, prefill
through HyperAttention, decode through the original attention, generate(), unpatch."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from blocks.convert import NoMatchingLayerError
from blocks.hyper_attention import (HyperAttentionConfig, hyper_patched_layers, patch_hyper_attention,
                                    select_hyper_layers, unpatch_hyper_attention)
from conftest import tiny_llama_config

PROMPT_LEN = 48


def tiny_model(architecture="llama", num_layers=3, **overrides):
    torch.manual_seed(0)
    config = tiny_llama_config(num_layers=num_layers, architecture=architecture)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()


def prompt(batch=2, length=PROMPT_LEN, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def approximate(**overrides):
    """Settings under which a PROMPT_LEN prompt really is approximated (3 recursion levels, sampling on)."""
    return HyperAttentionConfig(**{**dict(block_size=4, sample_size=8, min_seq_len=8), **overrides})


def hyper_calls(model):
    return {idx: state.num_hyper_calls for idx, state in hyper_patched_layers(model).items()}


@torch.no_grad()
def test_patched_forward_uses_hyper_attention_on_the_chosen_layers_only():
    model, ids = tiny_model(), prompt()
    reference = model(ids).logits
    assert patch_hyper_attention(model, num_last_layers=2, config=approximate()) == [1, 2]
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert hyper_calls(model) == {1: 1, 2: 1}
    assert (logits - reference).abs().max() > 1e-3  # the approximation is in use
    assert model.config._attn_implementation == "sdpa"  # the model-level config (masks) is untouched
    assert model.model.layers[0].self_attn.config is model.config


@torch.no_grad()
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
def test_exact_settings_reproduce_the_unpatched_model(architecture):
    # One LSH block covering every sub-problem and no samples is exact attention, while min_seq_len=8 still
    # sends the prompt through HyperAttention: this checks layout, scale and GQA of the patch.
    model = tiny_model(architecture, **({"sliding_window": None} if architecture != "llama" else {}))
    ids = prompt()
    reference = model(ids).logits
    patch_hyper_attention(model, layers=[0, 1, 2], config=approximate(block_size=PROMPT_LEN, sample_size=0))
    logits = model(ids).logits
    assert hyper_calls(model) == {0: 1, 1: 1, 2: 1}
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_generate_equals_unpatched_when_the_prompt_is_short():
    model, ids = tiny_model(), prompt(length=20)
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **settings)
    patch_hyper_attention(model, num_last_layers=3, config=approximate(min_seq_len=64))
    assert torch.equal(model.generate(ids, **settings), expected)
    assert hyper_calls(model) == {0: 0, 1: 0, 2: 0}


@torch.no_grad()
def test_generate_prefills_with_hyper_attention_and_decodes_exactly():
    model, ids = tiny_model(), prompt()
    patch_hyper_attention(model, num_last_layers=1, config=approximate())
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               pad_token_id=0)
    assert generated.shape == (2, PROMPT_LEN + 5)
    state = hyper_patched_layers(model)[2]
    assert (state.num_hyper_calls, state.num_fallback_calls) == (1, 4)  # the prefill; the 4 cached decode steps


@torch.no_grad()
def test_decode_step_is_exact_attention_over_the_cache():
    # Only the last layer is patched, so the KV cache after the prefill is the unpatched model's; a decode
    # step from it must then give the unpatched logits exactly, while the prefill's own logits differ.
    model, ids = tiny_model(), prompt()
    next_ids = prompt(length=1, seed=1)

    def prefill_then_step():
        prefill = model(ids, use_cache=True)
        step = model(next_ids, past_key_values=prefill.past_key_values, use_cache=True)
        return prefill.logits[:, -1], step.logits[:, -1]

    exact_prefill, exact_step = prefill_then_step()
    patch_hyper_attention(model, num_last_layers=1, config=approximate())
    hyper_prefill, hyper_step = prefill_then_step()
    assert (hyper_prefill - exact_prefill).abs().max() > 1e-3
    torch.testing.assert_close(hyper_step, exact_step, atol=1e-5, rtol=1e-5)
    assert hyper_calls(model) == {2: 1}


@torch.no_grad()
def test_padded_batches_fall_back_to_exact_attention():
    model, ids = tiny_model(), prompt()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in the first row
    reference = model(ids, attention_mask=mask).logits
    patch_hyper_attention(model, num_last_layers=3, config=approximate())
    logits = model(ids, attention_mask=mask).logits
    assert hyper_calls(model) == {0: 0, 1: 0, 2: 0}
    torch.testing.assert_close(logits, reference)


@torch.no_grad()
def test_unpatch_restores_the_original_model():
    model, ids = tiny_model(), prompt()
    reference = model(ids).logits
    original_configs = [layer.self_attn.config for layer in model.model.layers]
    patch_hyper_attention(model, layers=[-1, 0], config=approximate())
    with pytest.raises(ValueError, match="already patched"):
        patch_hyper_attention(model, layers=[0])
    assert unpatch_hyper_attention(model) == [0, 2]
    assert [layer.self_attn.config for layer in model.model.layers] == original_configs
    assert torch.equal(model(ids).logits, reference)


def test_selection():
    assert select_hyper_layers(30, num_last_layers=4) == [26, 27, 28, 29]
    assert select_hyper_layers(30, layers=[-1, 3, 3]) == [3, 29]
    with pytest.raises(ValueError, match="exactly one"):
        select_hyper_layers(30)
    for bad, message in ((dict(layers=[30]), "index 30"), (dict(layers=[-31]), "index -31"),
                         (dict(layers=[]), "layers=\\[\\]"), (dict(num_last_layers=0), "num_last_layers=0"),
                         (dict(num_last_layers=31), "num_last_layers=31")):
        with pytest.raises(NoMatchingLayerError, match=message):
            select_hyper_layers(30, **bad)


def test_matched_nothing_and_bad_settings_raise_value_errors():
    model = tiny_model()
    with pytest.raises(NoMatchingLayerError, match="index 7"):
        patch_hyper_attention(model, layers=[7])
    assert hyper_patched_layers(model) == {}
    with pytest.raises(ValueError, match="sliding window of 16"):
        patch_hyper_attention(tiny_model("mistral", sliding_window=16), num_last_layers=1)
    with pytest.raises(ValueError, match="block_size"):
        HyperAttentionConfig(block_size=0)
    with pytest.raises(ValueError, match="backend"):
        HyperAttentionConfig(backend="flash")
