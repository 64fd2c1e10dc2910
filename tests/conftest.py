"""Test-wide settings. Environment first: Triton reads TRITON_INTERPRET when kernels are defined, Ray must bind
to loopback, DeepSpeed must use the CPU accelerator, and nothing may reach a model hub."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before any @triton.jit runs: the CPU has no Triton driver, so kernels run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray 2.60 clusters use token auth; Ray reads this once, when first imported (test collection imports it), so a
# Jobs client created later would otherwise be stuck with 'disabled' and be refused by the head.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """GPU tests run only on a machine with CUDA (`pytest -m gpu` there)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_llama_config(num_layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, architecture="llama"):
    """A tiny random model config for CPU tests (same code path as the real models)."""
    from transformers import AutoConfig
    config = AutoConfig.for_model(architecture, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=num_layers, num_attention_heads=heads,
                                  num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=1024,
                                  rope_theta=10000.0)
    config._attn_implementation = "sdpa"
    return config


@pytest.fixture
def tiny_llama():
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a Hugging Face directory (converted once into the asset cache)."""
    from pipeline.assets import ensure_smollm2
    return ensure_smollm2()


# A 4-layer random Llama run config (k = 2: two blocks) that the pipeline, resume and Ray Jobs tests run in seconds.
TINY_RUN = {
    "model": {"name": "tiny-random", "architecture": "LlamaForCausalLM", "weights": "random", "seed": 0,
              "hf_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                            "max_position_embeddings": 256}},
    "attention": {"window_size": 8, "window_kind": "terrace", "feature_dim": 8, "gamma_init": 0.1},
    "data": {"seq_len": 32, "validation_sequences": 4, "eval_seq_len": 32, "eval_sequences": 2},
    "transfer": {"train_tokens": 48 * 32, "layers_per_block": 2, "lr": 1e-2, "micro_batch_size": 2, "grad_accum": 2,
                 "eval_every": 2, "patience": 10, "checkpoint_every": 2},
    "cluster": {"name": "local", "address": "local", "num_gpus": 0, "num_cpus": 2},
    "seed": 0,
}


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module (startup costs 5-9 s on the CI machine)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    import yaml
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RUN))
    return path
