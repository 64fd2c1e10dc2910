"""LoRA on the converted layers: which modules, what trains, the PEFT adapter round trip, merging."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from blocks.convert import AttentionSettings, convert_model
from blocks.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSettings,
    adapter_files,
    add_lora,
    load_adapter_files,
    lora_parameters,
    lora_target_modules,
    merge_lora,
    mix_adapters,
    teacher_view,
)
from tests.conftest import tiny_llama_config

SETTINGS = AttentionSettings(window_size=4, window_kind="terrace", feature_dim=8)


def converted(layers=None, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=3)).eval()
    convert_model(model, SETTINGS, layers=layers)
    return model


def tokens(batch=2, length=12, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_lora(peft_model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(peft_model).values():
            param.copy_(0.1 * torch.randn(param.shape, generator=g))


def test_targets_only_the_projections_of_converted_layers():
    names = lora_target_modules(converted(layers=[0, 2]))
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 2) for p in projections]
    with pytest.raises(ValueError, match="convert_model first"):
        lora_target_modules(AutoModelForCausalLM.from_config(tiny_llama_config()))


def test_only_lora_trains_and_starts_as_the_identity():
    model = converted(layers=[1])
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8))
    params = lora_parameters(peft_model)
    assert len(params) == 8 and all(".layers.1." in name for name in params)
    frozen = {n: p for n, p in peft_model.named_parameters() if "feature_map" in n or "window_logit" in n}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, before, rtol=0, atol=0)  # B = 0 at init
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in params.items() if "lora_A" in n or "lora_B" in n)
    assert all(p.grad is None for p in frozen.values())


def test_teacher_view_computes_the_original_model_and_restores_the_student():
    """Stage 2's distillation teacher: the converted model with LoRA off and softmax attention is the original."""
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=3)).eval()
    ids = tokens()
    with torch.no_grad():
        expected = original(ids).logits
    convert_model(original, SETTINGS, layers=[0, 2])  # converts in place: `original` is now the student
    peft_model = add_lora(original, LoraSettings(r=4, alpha=8))
    randomize_lora(peft_model)
    with torch.no_grad():
        student = peft_model(ids).logits
        with teacher_view(peft_model):
            teacher = peft_model(ids).logits
        after = peft_model(ids).logits
    torch.testing.assert_close(teacher, expected, rtol=1e-5, atol=1e-5)
    assert (student - expected).abs().max() > 1e-2  # the converted, adapted model really differs
    torch.testing.assert_close(after, student, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no converted"):
        with teacher_view(torch.nn.Linear(2, 2)):
            pass


def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone():
    model_a, model_b = converted(), converted()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = {n: p.detach().clone() for n, p in lora_parameters(add_lora(model_a, seed=7)).items()}
    assert torch.equal(torch.rand(1), expected_next)
    second = {n: p.detach().clone() for n, p in lora_parameters(add_lora(model_b, seed=7)).items()}
    assert any(p.abs().sum() > 0 for p in first.values())
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_adapter_files_round_trip_and_merge():
    peft_model = add_lora(converted(), LoraSettings(r=4, alpha=8))
    randomize_lora(peft_model)
    ids = tokens()
    with torch.no_grad():
        expected = peft_model(ids).logits
    full = {n: p.detach().clone() for n, p in lora_parameters(peft_model).items()}
    files = adapter_files(peft_model, full)
    assert set(files) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}

    reloaded = load_adapter_files(converted(), files).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
        merged = merge_lora(reloaded)
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_adapter_for_other_layers_is_rejected():
    peft_model = add_lora(converted(layers=[0, 1, 2]))
    files = adapter_files(peft_model, {n: p.detach() for n, p in lora_parameters(peft_model).items()})
    with pytest.raises(ValueError, match="same layers"):
        load_adapter_files(converted(layers=[0]), files)


def _random_adapter(settings, seed):
    peft_model = add_lora(converted(), settings)
    randomize_lora(peft_model, seed=seed)
    return adapter_files(peft_model, {n: p.detach().clone() for n, p in lora_parameters(peft_model).items()})


def test_mixed_adapter_applies_the_weighted_sum_of_the_updates():
    """Two adapters of different rank and scaling: the mix's merged q/k/v/o equal the base weights plus
    0.3 x the first's update plus 0.7 x the second's, and so do its outputs."""
    first, second = _random_adapter(LoraSettings(r=4, alpha=8), 2), _random_adapter(LoraSettings(r=2, alpha=7), 3)
    mixed = mix_adapters([first, second], [0.3, 0.7])
    merged = merge_lora(load_adapter_files(converted(), mixed)).eval()
    expected = converted().eval()
    with torch.no_grad():
        for files, weight in ((first, 0.3), (second, 0.7)):
            for name, param in merge_lora(load_adapter_files(converted(), files)).named_parameters():
                if name.rpartition(".")[0].endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                    base = expected.get_parameter(name)
                    base += weight * (param - converted().get_parameter(name))
        for name, param in expected.named_parameters():
            torch.testing.assert_close(merged.get_parameter(name), param, rtol=0, atol=1e-6)
        ids = tokens()
        torch.testing.assert_close(merged(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)


def test_mixing_adapters_of_other_layers_or_without_weights_is_rejected():
    peft_model = add_lora(converted(layers=[0]))
    other = adapter_files(peft_model, {n: p.detach() for n, p in lora_parameters(peft_model).items()})
    adapter = _random_adapter(LoraSettings(r=4, alpha=8), 2)
    with pytest.raises(ValueError, match="adapter 1 targets"):
        mix_adapters([adapter, other], [0.5, 0.5])
    with pytest.raises(ValueError, match="one weight for each"):
        mix_adapters([adapter, adapter], [1.0])


@pytest.mark.parametrize("kwargs, match", [({"r": 0}, "rank"), ({"dropout": 1.0}, "dropout")])
def test_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(**kwargs)
