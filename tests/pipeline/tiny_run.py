"""A tiny run directory for stage-2 and export tests: a 2-layer random Llama saved as a Hugging Face directory
(with a character-level tokenizer and a chat template), run.yaml, stitched/ in the stitch stage's format
(perturbed feature maps, so they differ from the identity init) and finetune data with learnable structure."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors_bytes

from blocks.convert import AttentionSettings, convert_model, hybrid_state_dict
from pipeline.config import resolve_run_config, run_config_to_yaml
from pipeline.finetune import STITCHED_META, STITCHED_WEIGHTS, write_finetune_data
from pipeline.rundir import RunDir
from tests.conftest import tiny_llama_config

SEQ_LEN = 32
ATTENTION = {"window_size": 8, "window_kind": "terrace", "feature_dim": 8, "gamma_init": 0.1}


def make_tokenizer():
    """Characters as tokens (75 of them), <s>/</s>/<pad>, and a one-line-per-turn chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_letters + string.digits + " .,!?'\n:-"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    return tokenizer


def make_model_dir(directory: Path) -> Path:
    """Save a tiny random Llama (+ tokenizer) as a Hugging Face directory; ModelConfig.weights points here."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(num_layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)
    # A larger init than the default 0.02 spreads the logits, so greedy choices are far from ties.
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def model_config_dict(model_dir: Path) -> dict:
    return {"name": "tiny", "architecture": "LlamaForCausalLM", "weights": str(model_dir), "seed": 0,
            "hf_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                          "max_position_embeddings": 1024}}


def structured_rows(num_rows: int, seed: int) -> torch.Tensor:
    """Tokens drawn from 8 of the 128 ids: LoRA learns to prefer them within a few steps."""
    g = torch.Generator().manual_seed(seed)
    return 40 + torch.randint(0, 8, (num_rows, SEQ_LEN), generator=g)


def make_tiny_run(run_dir: str, model_dir: Path, *, zero_stage: int = 2, train_rows: int = 48,
                  layers: list[int] | None = None, finetune: dict | None = None) -> RunDir:
    """A run directory ready for `finetune`: run.yaml, stitched/, finetune/data/."""
    run = RunDir(run_dir)
    model_cfg = model_config_dict(model_dir)
    overrides = {"train_tokens": SEQ_LEN * train_rows, "lr": 1e-2, "zero_stage": zero_stage, "micro_batch_size": 1,
                 "grad_accum": 2, "eval_every": 2, "checkpoint_every": 3, "lora_r": 4, "lora_alpha": 8}
    overrides.update(finetune or {})
    config = resolve_run_config({"model": model_cfg, "cluster": "local", "seed": 0, "finetune": overrides,
                                 "data": {"seq_len": SEQ_LEN, "validation_sequences": 4}})
    run.write_text(RunDir.run_yaml, run_config_to_yaml(config))

    from pipeline.models import load_model
    model = load_model(config.model)
    convert_model(model, AttentionSettings(**ATTENTION), layers=layers)
    generator = torch.Generator().manual_seed(1)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in hybrid_state_dict(model).items()}
    run.write_bytes(STITCHED_WEIGHTS, save_safetensors_bytes(state))
    run.write_json(STITCHED_META, {"model": model_cfg, "attention": ATTENTION, "base_model_sha256": None})
    write_finetune_data(run, structured_rows(train_rows, seed=2), structured_rows(4, seed=3))
    return run


def write_random_adapter(run: RunDir, seed: int = 5) -> None:
    """A stage-2 adapter in finetune/adapter/ with random, non-zero LoRA weights (A and B), as finetune would save
    one: the merged model then differs from the stitched one."""
    from blocks.lora import adapter_files, add_lora, lora_parameters
    from pipeline.finetune import ADAPTER_DIR, load_stitched

    peft_model = add_lora(load_stitched(run).model)
    generator = torch.Generator().manual_seed(seed)
    weights = {n: 0.2 * torch.randn(p.shape, generator=generator) for n, p in lora_parameters(peft_model).items()}
    for name, data in adapter_files(peft_model, weights).items():
        run.write_bytes(f"{ADAPTER_DIR}/{name}", data)
