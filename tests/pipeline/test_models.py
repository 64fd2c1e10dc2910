"""Teacher models: deterministic random weights per layer equal the whole model's; real layers load alone."""

import subprocess
import sys

import pytest
import torch

from pipeline.config import load_model_config
import pipeline.models as models
from pipeline.models import load_layer_stack, load_model, random_tensor

TINY = {"name": "tiny", "architecture": "LlamaForCausalLM", "weights": "random", "seed": 3,
        "hf_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 256,
                      "rope_theta": 10000.0}}


def test_random_layers_are_a_function_of_seed_and_name():
    cfg = load_model_config(TINY)
    model = load_model(cfg)
    stack = load_layer_stack(cfg, 1, 3)
    ids = torch.randint(0, 100, (1, 30))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        out = stack(states[1], torch.arange(30).unsqueeze(0))
    torch.testing.assert_close(out, states[3], atol=1e-5, rtol=1e-5)
    other = load_model(load_model_config({**TINY, "seed": 4}))
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_random_tensors_do_not_depend_on_the_thread_count(monkeypatch):
    """A tensor of several RANDOM_CHUNK pieces is generated in a thread pool; its values must not depend on how
    many threads there are (a Ray worker and the export process have different core counts)."""
    monkeypatch.setattr(models, "RANDOM_CHUNK", 1000)
    many = random_tensor(5, "model.layers.0.mlp.up_proj.weight", (37, 101))
    monkeypatch.setattr(models.os, "cpu_count", lambda: 1)
    one = random_tensor(5, "model.layers.0.mlp.up_proj.weight", (37, 101))
    assert torch.equal(many, one)
    pieces = many.view(-1)[:3000].view(3, 1000)
    assert not torch.equal(pieces[0], pieces[1]) and not torch.equal(pieces[1], pieces[2])  # own generator each
    assert abs(many.std().item() - 0.02) < 0.002
    assert not torch.equal(many, random_tensor(5, "model.layers.0.mlp.down_proj.weight", (37, 101)))


def test_layer_range_errors():
    with pytest.raises(ValueError, match=r"layers \[3, 9\) are outside 0..4"):
        load_layer_stack(load_model_config(TINY), 3, 9)


def test_a_block_of_a_large_preset_builds_without_the_rest():
    """One 8B-shaped layer on its own: 218M params, built from the seed, never the whole model."""
    stack = load_layer_stack(load_model_config("llama3-8b"), 31, 32, dtype=torch.bfloat16)
    assert sum(p.numel() for p in stack.parameters()) == load_model_config("llama3-8b").params_per_layer
    assert stack.start == 31 and stack.layers[0].self_attn.layer_idx == 31


@pytest.mark.real_model
def test_real_layers_load_alone_and_match_the_model(smollm2_dir):
    cfg = load_model_config("smollm2-135m")
    model = load_model(cfg)
    stack = load_layer_stack(cfg, 28, 30)
    ids = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        out = stack(states[28], torch.arange(16).unsqueeze(0))
    # hidden_states[30] is after the final norm, so compare through it
    torch.testing.assert_close(model.model.norm(out), states[30], atol=1e-4, rtol=1e-4)


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("assets", "convert"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr
