"""Teacher models: deterministic random weights per layer equal the whole model's, any range of a random tensor
equals the same slice of the whole; real layers load alone."""

import subprocess
import sys

import pytest
import torch

from pipeline.config import load_model_config
import pipeline.models as models
from pipeline.models import (load_layer_stack, load_model, random_tensor, random_tensor_range, random_value,
                             random_value_range)

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
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        many = random_tensor(5, "model.layers.0.mlp.up_proj.weight", (37, 101))
        torch.set_num_threads(1)
        one = random_tensor(5, "model.layers.0.mlp.up_proj.weight", (37, 101))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many, one)
    pieces = many.view(-1)[:3000].view(3, 1000)
    assert not torch.equal(pieces[0], pieces[1]) and not torch.equal(pieces[1], pieces[2])  # own generator each
    assert abs(many.std().item() - 0.02) < 0.002
    assert not torch.equal(many, random_tensor(5, "model.layers.0.mlp.down_proj.weight", (37, 101)))


WEIGHT = "model.layers.0.mlp.up_proj.weight"
RANGES = [(0, 0), (150, 150), (481, 481),  # empty: at the start, inside, at the end
          (3, 40), (70, 128), (128, 192),  # inside one piece (the second ends on a boundary, the third is whole)
          (60, 70), (10, 300), (1, 480),  # across pieces
          (448, 481), (470, 481), (200, 481), (0, 481)]  # the short last piece (448..481) and the whole


def test_random_tensor_pieces_have_their_own_generators(monkeypatch):
    """Pins what a random tensor is (hidden-state caches of random-weight runs depend on it): piece c of the flat
    tensor is 0.02 * randn(its length) from a generator seeded by (seed, name, c), the last piece short."""
    monkeypatch.setattr(models, "RANDOM_CHUNK", 64)
    flat = random_tensor(5, WEIGHT, (13, 37)).view(-1)  # 481 elements: 7 pieces of 64 and one of 33
    for chunk in range(8):
        piece = flat[chunk * 64:(chunk + 1) * 64]
        gen = torch.Generator().manual_seed(models._tensor_seed(5, WEIGHT, chunk))
        assert torch.equal(piece, torch.randn(piece.numel(), generator=gen).mul_(0.02)), chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_range_of_a_random_tensor_is_the_slice_of_the_whole(monkeypatch, dtype):
    monkeypatch.setattr(models, "RANDOM_CHUNK", 64)
    whole = random_tensor(5, WEIGHT, (13, 37), dtype).view(-1)
    for start, stop in RANGES:
        part = random_tensor_range(5, WEIGHT, 481, start, stop, dtype)
        assert part.dtype == dtype and part.shape == (stop - start,)
        assert torch.equal(part, whole[start:stop]), (start, stop)
    # The range depends on the tensor's size (the last piece is generated at its own length), not its shape.
    tail = random_tensor_range(5, WEIGHT, 481, 400, 481, dtype)
    assert torch.equal(tail, random_tensor(5, WEIGHT, (481,), dtype)[400:])


def test_a_range_generates_only_the_pieces_it_overlaps(monkeypatch):
    monkeypatch.setattr(models, "RANDOM_CHUNK", 64)
    made = []
    real = models._chunk_normals
    monkeypatch.setattr(models, "_chunk_normals", lambda seed, name, numel, chunk: made.append(chunk) or
                        real(seed, name, numel, chunk))
    for (start, stop), pieces in {(150, 150): [], (70, 128): [1], (60, 70): [0, 1], (100, 300): [1, 2, 3, 4],
                                  (470, 481): [7]}.items():
        made.clear()
        random_tensor_range(5, WEIGHT, 481, start, stop)
        assert sorted(made) == pieces, (start, stop)


def test_a_range_of_a_random_value_follows_its_rules(monkeypatch):
    """Norms 1, biases 0, other weights random: every range equals the slice of random_value's tensor."""
    monkeypatch.setattr(models, "RANDOM_CHUNK", 64)
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.bias", WEIGHT):
        whole = random_value(5, name, (13, 37), torch.bfloat16).view(-1)
        for start, stop in RANGES:
            part = random_value_range(5, name, 481, start, stop, torch.bfloat16)
            assert part.dtype == torch.bfloat16 and torch.equal(part, whole[start:stop]), (name, start, stop)
    assert torch.equal(random_value_range(5, "model.norm.weight", 481, 5, 9), torch.ones(4))
    assert torch.equal(random_value_range(5, "lm_head.bias", 481, 5, 9), torch.zeros(4))
    assert random_value_range(5, WEIGHT, 481, 5, 9).abs().min() > 0


@pytest.mark.parametrize("start, stop", [(-1, 3), (5, 4), (0, 482)])
def test_a_range_outside_the_tensor_is_refused(start, stop):
    for make in (random_tensor_range, random_value_range):
        with pytest.raises(ValueError, match=f"start={start}, stop={stop}: need 0 <= start <= stop <= numel=481"):
            make(5, WEIGHT, 481, start, stop)


def test_layer_range_errors():
    with pytest.raises(ValueError, match=r"layers \[3, 9\) are outside 0..4"):
        load_layer_stack(load_model_config(TINY), 3, 9)


def test_a_block_of_a_large_preset_builds_without_the_rest():
    """One 8B-shaped layer on its own: 218M params, built from the seed, never the whole model."""
    stack = load_layer_stack(load_model_config("llama3-8b"), 31, 32, dtype=torch.bfloat16)
    assert sum(p.numel() for p in stack.parameters()) == load_model_config("llama3-8b").params_per_layer
    assert stack.start == 31 and stack.layers[0].self_attn.layer_idx == 31


def test_blocks_are_built_in_their_dtype_with_the_whole_models_rounding(monkeypatch):
    """A block never holds its layers in fp32 first (at 70B that was 137 GB of host memory per 40-layer task), and
    casting each generated tensor gives the same bf16 weights as the whole model built in fp32 then cast."""
    cfg = load_model_config(TINY)
    seen = []
    init = models.random_init_
    monkeypatch.setattr(models, "random_init_", lambda module, *a, **k: (
        seen.extend(p.dtype for p in module.parameters()), init(module, *a, **k)))
    stack = models.load_layer_stack(cfg, 1, 3, dtype=torch.bfloat16)
    embedding = models.load_embeddings(cfg, dtype=torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}
    whole = load_model(cfg).to(torch.bfloat16).model
    for offset, layer in enumerate(stack.layers):
        for name, param in layer.named_parameters():
            assert torch.equal(param, whole.layers[1 + offset].get_parameter(name)), name
    assert torch.equal(embedding.weight, whole.embed_tokens.weight)


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
