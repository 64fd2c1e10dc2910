"""Export to a Hugging Face directory and generation with the constant-size hybrid cache.

* the export loads in a fresh interpreter (no PYTHONPATH, cwd elsewhere, never importing this project) and
  its greedy generate() equals the in-process converted model token for token; a LEFT-padded batch equals
  per-sequence generation; sampling works; the cache does not grow;
* recurrent decoding equals the quadratic forward on the same tokens (in-process model, both window kinds,
  and the export with padding);
* --no-merge leaves a PEFT adapter that reproduces the merged model; `linearize generate` streams the text.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from blocks.hybrid_attention import HybridCache
from blocks.lora import load_adapter_files, merge_lora
from pipeline import export as export_module
from pipeline import generate as generate_module
from pipeline.export import export_run, read_adapter
from pipeline.finetune import load_stitched
from tests.pipeline.tiny_run import make_model_dir, make_tiny_run, write_random_adapter

PROMPTS = [[5, 9, 17, 33, 40], [7, 8, 9, 10, 11, 12, 13, 40, 41, 42, 43, 44, 45], list(range(20, 41))]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run with stitched/ and a (random, non-zero) stage-2 adapter in finetune/adapter/."""
    base = tmp_path_factory.mktemp("export")
    run = make_tiny_run(str(base / "run"), make_model_dir(base / "model"))
    write_random_adapter(run)
    return run


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    return export_run(tiny_run.url, str(tmp_path_factory.mktemp("out") / "export"))


@pytest.fixture(scope="module")
def in_process(tiny_run):
    """The converted model with the adapter merged, built from the project's own modules."""
    stitched = load_stitched(tiny_run)
    return merge_lora(load_adapter_files(stitched.model, read_adapter(tiny_run))).eval()


@pytest.fixture(scope="module")
def remote_model(exported):
    """The export loaded with trust_remote_code in this process (for the numerical checks)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    directory, prompts, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    single = [model.generate(torch.tensor([p]), **greedy)[0, len(p):].tolist() for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(ids, attention_mask=mask, **greedy)[:, width:].tolist()
    sampled = []
    for _ in range(2):
        torch.manual_seed(0)
        sampled.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.8,
                                      top_p=0.9)[:, width:].tolist())
    # Cache bytes after 32 and 72 tokens (same position in the terrace block): constant, not growing.
    sizes = [model.generate(torch.tensor([prompts[1][:12]]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            return_dict_in_generate=True).past_key_values.nbytes() for n in (20, 60)]
    project = sorted(name for name, module in sys.modules.items()
                     if name.split(".")[0] in ("pipeline", "blocks", "cluster", "configs", "kernels")
                     and "{repo}" in str(getattr(module, "__file__", "") or ""))
    print(json.dumps({"single": single, "batch": batch, "sampled": sampled, "sizes": sizes, "project": project,
                      "class": type(model).__name__}))
""")


def test_export_directory_layout(exported):
    names = set(os.listdir(exported))
    assert {"config.json", "model.safetensors", "modeling_linearize.py", "configuration_linearize.py", "padding.py",
            "naive.py", "feature_map.py", "tokenizer.json", "chat_template.jinja"} <= names
    config = json.loads(open(os.path.join(exported, "config.json")).read())
    assert config["model_type"] == "linearize_llama"
    assert config["hybrid_attention"] == {"window_size": 8, "window_kind": "terrace", "feature_dim": 8,
                                          "layers": [0, 1]}
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_linearize.LinearizedLlamaForCausalLM"
    assert config["linearize"]["lora"] == "merged"
    # The math is the project's file, byte for byte.
    assert open(os.path.join(exported, "naive.py")).read() == export_module.COPIED_SOURCES["naive.py"].read_text()


def test_fresh_process_generates_like_the_in_process_model(exported, in_process, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    script = tmp_path / "load_export.py"
    script.write_text(FRESH_PROCESS.replace("{repo}", str(export_module.PROJECT_ROOT)))
    done = subprocess.run([sys.executable, str(script), exported, json.dumps(PROMPTS), str(NEW_TOKENS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["class"] == "LinearizedLlamaForCausalLM"
    assert result["project"] == [], f"the export imported project modules: {result['project']}"

    for prompt, tokens in zip(PROMPTS, result["single"]):
        expected = in_process.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                       do_sample=False, past_key_values=HybridCache())[0, len(prompt):].tolist()
        assert tokens == expected
    assert result["batch"] == result["single"], "a left-padded batch must generate what each prompt generates alone"
    assert result["sampled"][0] == result["sampled"][1]
    assert all(0 <= t < 128 for row in result["sampled"][0] for t in row) and len(result["sampled"][0][0]) == 8
    assert result["sizes"][0] == result["sizes"][1] > 0


@pytest.mark.parametrize("window_kind", ["sliding", "terrace"])
def test_recurrent_decode_equals_quadratic_forward(tiny_run, window_kind):
    """The project's model: prefill 10 tokens, decode 30 one by one == one forward over all 40."""
    model = load_stitched(tiny_run).model
    # Re-convert with the kind under test (stitched/ uses terrace): same feature maps, other window partition.
    for layer in model.model.layers:
        layer.self_attn.window_kind = window_kind
    ids = torch.randint(4, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = HybridCache()
        steps = [model(ids[:, :10], past_key_values=cache).logits[:, -1]]
        for t in range(10, 39):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 9:39], rtol=1e-4, atol=1e-4)
    assert cache.num_tokens == 39


def test_export_padding_and_decoding_match_unpadded_forward(remote_model):
    model = remote_model
    ids, mask = left_pad(PROMPTS)
    width = ids.shape[1]
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, use_cache=False).logits
        for i, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt]), use_cache=False).logits[0]
            torch.testing.assert_close(padded[i, width - len(prompt):], alone, rtol=1e-4, atol=1e-4)
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        decoded = torch.stack(generated.logits, dim=1)
        full_mask = torch.cat([mask, torch.ones(len(PROMPTS), 24, dtype=torch.long)], dim=1)
        forward = model(generated.sequences, attention_mask=full_mask, use_cache=False).logits
    torch.testing.assert_close(decoded, forward[:, width - 1:-1], rtol=1e-4, atol=1e-4)


def test_export_rejects_right_padding_for_generation(remote_model):
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="LEFT padding"):
        remote_model.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2)


def test_no_merge_keeps_a_peft_adapter_that_reproduces_the_merged_model(tiny_run, exported, remote_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_run(tiny_run.url, str(tmp_path / "unmerged"), merge=False)
    assert json.loads(open(os.path.join(out, "config.json")).read())["linearize"]["lora"] == "adapter/"
    base = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        merged = remote_model(ids).logits
        assert (base(ids).logits - merged).abs().max() > 1e-3  # the adapter matters
        with_adapter = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
        torch.testing.assert_close(with_adapter(ids).logits, merged, rtol=1e-4, atol=1e-4)


def _generate_args(source, *extra):
    parser = argparse.ArgumentParser()
    generate_module.add_arguments(parser)
    return parser.parse_args([source, "--max-new-tokens", "12", "--device", "cpu", *extra])


@pytest.mark.parametrize("source", ["run", "export"])
def test_generate_command_streams_the_greedy_continuation(tiny_run, exported, in_process, capsys, source):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    prompt = "Hello there"
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = in_process.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=HybridCache(),
                                   pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert generate_module.main(_generate_args(tiny_run.url if source == "run" else exported, "--prompt", prompt)) == 0
    assert capsys.readouterr().out.rstrip("\n") == prompt + text


def test_generate_chat_uses_the_chat_template(exported, capsys):
    generator = generate_module.load_generator(exported)
    messages = generate_module.chat(generator, io.StringIO("hi\nmore\n\nignored\n"), max_new_tokens=6)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_export_command_defaults_to_the_run_directory(tiny_run):
    parser = argparse.ArgumentParser()
    export_module.add_arguments(parser)
    assert export_module.main(parser.parse_args([tiny_run.url])) == 0
    assert tiny_run.exists("export/config.json") and tiny_run.status("export") == "done"


def test_partially_converted_export_keeps_softmax_layers_and_pads_correctly(tmp_path):
    """Layer 0 stays softmax attention (growing k/v in the same cache), layer 1 is hybrid."""
    from transformers import AutoModelForCausalLM

    run = make_tiny_run(str(tmp_path / "run"), make_model_dir(tmp_path / "model"), layers=[1])
    out = export_run(run.url, str(tmp_path / "export"))
    project = load_stitched(run).model.eval()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ids, mask = left_pad(PROMPTS)
    batch = model.generate(ids, attention_mask=mask, **greedy)[:, ids.shape[1]:]
    for i, prompt in enumerate(PROMPTS):
        expected = project.generate(torch.tensor([prompt]), past_key_values=HybridCache(), **greedy)[0, len(prompt):]
        assert torch.equal(model.generate(torch.tensor([prompt]), **greedy)[0, len(prompt):], expected)
        assert torch.equal(batch[i], expected)


def test_beam_search_reorders_the_hybrid_states(remote_model):
    """Beams with the cache (states reordered every step) == beams recomputing everything without a cache."""
    beams = dict(max_new_tokens=10, min_new_tokens=10, num_beams=3, do_sample=False)
    ids, mask = left_pad(PROMPTS[:2])
    with torch.no_grad():
        cached = remote_model.generate(ids, attention_mask=mask, **beams)
        uncached = remote_model.generate(ids, attention_mask=mask, use_cache=False, **beams)
    assert torch.equal(cached, uncached)


def test_bf16_export_keeps_feature_maps_exact_and_reads_the_run_config_default(tiny_run, in_process, tmp_path):
    """The bf16 export (the one a 70B run needs) stores the base weights in bf16 and the feature maps and gamma
    bit-exactly in fp32; with no --dtype the run config's export.dtype decides."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    out = export_run(tiny_run.url, str(tmp_path / "bf16"), dtype="bfloat16")
    stored = load_file(os.path.join(out, "model.safetensors"))
    reference = dict(in_process.named_parameters())
    feature_names = [n for n in stored if any(p in n for p in export_module.FP32_PARAMETERS)]
    assert feature_names
    for name in feature_names:
        assert stored[name].dtype == torch.float32
        assert torch.equal(stored[name], reference[name].detach())  # not rounded through bf16 on the way
    q_proj = next(n for n in stored if n.endswith("self_attn.q_proj.weight"))
    assert stored[q_proj].dtype == torch.bfloat16
    torch.testing.assert_close(stored[q_proj].float(), reference[q_proj].detach(), rtol=1e-2, atol=1e-2)

    # Default from RUN/run.yaml's export section: flip it to bfloat16 in a copy of the run.
    config = yaml.safe_load(tiny_run.read_text("run.yaml"))
    config["export"] = {"dtype": "bfloat16"}
    copy = tmp_path / "run_copy"
    shutil.copytree(tiny_run.url.removeprefix("file://"), copy)
    (copy / "run.yaml").write_text(yaml.safe_dump(config))
    default_out = export_run(str(copy), str(tmp_path / "default"))
    assert load_file(os.path.join(default_out, "model.safetensors"))[q_proj].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_by_layer_export_equals_the_model_built_whole_and_merged_by_peft(tiny_run, tmp_path, dtype):
    """The export makes one decoder layer at a time and folds LoRA in itself; its tensors are exactly those of
    the whole stitched model with PEFT's merge, in fp32 and in bf16 (same names, the tied lm_head left out as
    save_pretrained leaves it out)."""
    from safetensors.torch import load_file

    torch_dtype = export_module.DTYPES[dtype]
    whole = merge_lora(load_adapter_files(load_stitched(tiny_run, dtype=torch_dtype).model, read_adapter(tiny_run)))
    expected = {name: p.detach() for name, p in whole.named_parameters()}  # a tied weight once
    stored = load_file(os.path.join(export_run(tiny_run.url, str(tmp_path / dtype), dtype=dtype), "model.safetensors"))
    assert set(stored) == set(expected)
    for name, tensor in stored.items():
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name
        fp32 = any(part in name for part in export_module.FP32_PARAMETERS)
        assert tensor.dtype == (torch.float32 if fp32 else torch_dtype), name


def test_a_large_export_is_sharded_with_an_index_that_loads(tiny_run, remote_model, monkeypatch, tmp_path):
    """Over MAX_SHARD_BYTES the weights go to model-0000i-of-0000N.safetensors files and an index, as
    save_pretrained writes them; the sharded export loads and computes what the single file does."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(export_module, "MAX_SHARD_BYTES", 40_000)
    out = export_run(tiny_run.url, str(tmp_path / "sharded"))
    index = json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == files
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    sharded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert torch.equal(sharded(ids).logits, remote_model(ids).logits)


def test_layer_by_layer_export_of_random_weights_equals_the_model_built_whole(tiny_run, tmp_path):
    """Random weights (the 70B preset's path), lm_head not tied: each tensor generated by name as load_model
    generates it, the adapter merged as PEFT merges it."""
    import shutil

    from safetensors.torch import load_file

    from pipeline.finetune import STITCHED_META
    from pipeline.rundir import RunDir

    shutil.copytree(tiny_run.url.removeprefix("file://"), tmp_path / "run")
    run = RunDir(str(tmp_path / "run"))
    meta = run.read_json(STITCHED_META)
    meta["model"].update(weights="random", hf_config={**meta["model"]["hf_config"], "tie_word_embeddings": False})
    run.write_json(STITCHED_META, meta)
    whole = merge_lora(load_adapter_files(load_stitched(run).model, read_adapter(run)))
    expected = {name: p.detach() for name, p in whole.named_parameters()}
    out = export_run(run.url, str(tmp_path / "export"))
    stored = load_file(os.path.join(out, "model.safetensors"))
    assert "lm_head.weight" in stored and set(stored) == set(expected)
    for name, tensor in stored.items():
        assert torch.equal(tensor, expected[name]), name
    assert not any(n.startswith("tokenizer") for n in os.listdir(out))  # random weights have no tokenizer


def test_export_benchmark_fabricates_a_run_the_export_reads(tmp_path):
    """pipeline/bench_export.py: stitched state and adapter drawn at random for a preset's shape, exported in a
    child process, its size and peak host memory in the JSON, the work directory removed."""
    from pipeline import bench_export

    out = tmp_path / "bench.json"
    assert bench_export.main(["--model", "smollm2-135m", "--layers", "2", "--dtype", "float32",
                              "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["layers"] == 2 and result["shards"] == 1 and result["peak_host_bytes"] > 0
    assert result["export_bytes"] >= result["model_bytes"] == result["parameters"] * 4
    assert not (tmp_path / "work").exists()
