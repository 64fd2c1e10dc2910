"""Configs: every preset loads; bad input is rejected before any model loads, naming key, value and fix."""

import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import (
    ConfigError,
    load_model_config,
    load_run_config,
    load_yaml,
    parse_bytes,
    parse_count,
    preset_names,
    resolve_run_config,
)


def test_all_model_presets_load_with_published_shapes():
    assert set(preset_names("models")) >= {"smollm2-135m", "llama3-8b", "llama3.1-70b", "llama3.1-405b", "mistral-7b"}
    shapes = {name: load_model_config(name) for name in preset_names("models")}
    assert (shapes["llama3.1-405b"].num_layers, shapes["llama3.1-405b"].hidden_size) == (126, 16384)
    assert (shapes["llama3.1-70b"].num_layers, shapes["llama3.1-70b"].num_heads) == (80, 64)
    assert shapes["smollm2-135m"].num_kv_heads == 3 and shapes["smollm2-135m"].head_dim == 64
    assert shapes["mistral-7b"].architecture == "MistralForCausalLM"
    # ~3.2B parameters per 405B layer (attention 0.57B + MLP 2.6B), as the cost model assumes
    assert 3.1e9 < shapes["llama3.1-405b"].params_per_layer < 3.3e9


def test_every_shipped_run_config_loads():
    """configs/runs/*.yaml are what results.md's commands run: each must still load with today's fields."""
    from pathlib import Path
    paths = sorted((Path(__file__).resolve().parents[2] / "configs" / "runs").glob("*.yaml"))
    assert len(paths) >= 10
    configs = {path.stem: load_run_config(path) for path in paths}
    keep3 = configs["smollm2-quality-20m-window128-keep3"]
    assert keep3.attention.keep_softmax == [18, 23, 24] and keep3.attention.window_size == 128
    distilled = configs["smollm2-quality-20m-window128-keep3-distill"]
    assert distilled.finetune.objective == "distill"
    mixed = configs["smollm2-quality-20m-window128-keep3-mixed"]
    assert (mixed.finetune.objective, mixed.finetune.distill_weight) == ("mixed", 0.5)
    # The distilled and mixed runs continue the next-token run's stage 1, so everything before stage 2 must be equal.
    for other in (distilled, mixed):
        assert (other.attention, other.data, other.transfer) == (keep3.attention, keep3.data, keep3.transfer)


def test_run_config_composes_presets_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: smollm2-135m\nrecipe: lolcats\ncluster: local\ntransfer: {train_tokens: 2M, lr: 5e-3}\n")
    config = load_run_config(path)
    assert config.transfer.train_tokens == 2_000_000
    assert config.transfer.lr == 5e-3 and isinstance(config.transfer.lr, float)
    assert config.attention.window_kind == "terrace" and config.finetune.lora_r == 8
    assert config.cluster.host_memory == 24 * 10**9


BASE = {"model": "smollm2-135m", "recipe": "smoke"}


@pytest.mark.parametrize("override, message", [
    ({"attention": {"window_sise": 64}}, r"attention\.window_sise: unknown key; did you mean 'window_size'"),
    ({"transfer": {"lr": "fast"}}, r"transfer\.lr: expected a number, got 'fast'"),
    ({"attention": {"window_size": 0}}, r"attention\.window_size: must be a positive number of tokens, got 0"),
    ({"transfer": {"layers_per_block": 31}}, r"transfer\.layers_per_block: 31 is outside 1\.\.30"),
    ({"attention": {"window_kind": "global"}}, r"attention\.window_kind: 'global' is not one of"),
    ({"finetune": {"zero_stage": 1}}, r"finetune\.zero_stage: 1 is not supported; use 2 or 3"),
    ({"attention": {"feature_dtype": "bf16"}}, r"attention\.feature_dtype: 'bf16' is not one of \['float32', 'model'\]"),
    ({"finetune": {"objective": "kd"}}, r"finetune\.objective: 'kd' is not one of \['next_token', 'distill', "),
    ({"finetune": {"objective": "mixed", "distill_weight": 1.0}}, r"finetune\.distill_weight: 1\.0 is not strict"),
    ({"attention": {"layers": [0, 30]}}, r"attention\.layers: index 30 does not exist"),
    ({"attention": {"keep_softmax": [-31]}}, r"attention\.keep_softmax: index -31 does not exist"),
    ({"attention": {"layers": [3, -1], "keep_softmax": [29, 3]}}, r"attention\.keep_softmax: \[29, 3\] keeps every"),
    ({"attention": {"layers": []}}, r"attention\.layers: the selection is empty"),
    ({"modle": "x"}, r"modle: unknown top-level key; did you mean 'model'"),
    ({"model": "llama-9000"}, r"no preset named 'llama-9000'; available: \["),
    ({"transfer": {"train_tokens": "lots"}}, r"transfer\.train_tokens: expected a count like"),
])
def test_bad_values_are_rejected_with_key_value_and_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_run_config({**BASE, **override})


def test_keep_softmax_removes_layers_from_the_converted_set():
    assert resolve_run_config(BASE).converted_layers == list(range(30))
    config = resolve_run_config({**BASE, "attention": {"keep_softmax": [23, -6, -3]}})
    assert config.converted_layers == [i for i in range(30) if i not in (23, 24, 27)]
    config = resolve_run_config({**BASE, "attention": {"layers": [0, 1, 2, -1], "keep_softmax": [1]}})
    assert config.converted_layers == [0, 2, 29]


def test_feature_dim_must_match_checkpoint(tmp_path):
    ckpt = tmp_path / "phi.safetensors"
    save_file({"layers.0.feature_map_q.weight": torch.zeros(9, 64, 32),
               "layers.0.feature_map_k.weight": torch.zeros(9, 64, 32)}, str(ckpt))
    with pytest.raises(ConfigError, match=r"attention\.feature_dim: 64 does not match the checkpoint .*feature_dim 32"):
        resolve_run_config({**BASE, "attention": {"init_from": str(ckpt)}})
    config = resolve_run_config({**BASE, "attention": {"init_from": str(ckpt), "feature_dim": 32}})
    assert config.attention.feature_dim == 32


def test_yaml_rejects_duplicate_keys_and_reads_exponents_as_floats(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("a: 1\nb: 1e-2\na: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'a' at line 3"):
        load_yaml(path)
    path.write_text("b: 1e-2\n")
    assert load_yaml(path) == {"b": 0.01}


def test_quantities():
    assert parse_count("20M") == 20_000_000 and parse_count(512) == 512 and parse_count("1.5k") == 1500
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("64GiB") == 64 * 2**30
    with pytest.raises(ConfigError):
        parse_bytes("eighty")


def test_model_shape_errors():
    with pytest.raises(ConfigError, match=r"model\.hf_config: missing \['vocab_size'\]"):
        load_model_config({"name": "x", "hf_config": {"hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 8}})
    with pytest.raises(ConfigError, match="num_key_value_heads: 3 must divide num_attention_heads 4"):
        load_model_config({"name": "x", "hf_config": {"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 10,
                                                      "num_attention_heads": 4, "num_key_value_heads": 3,
                                                      "intermediate_size": 8}})
