"""Planner: the paper's 405B setting, how the choice moves with the cluster, the JSON schema, partial last
blocks, input errors, speed, calibration, and the memory model against a reference stage-1 step."""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_model_config
from pipeline.planner import (KERNEL_PROFILES, Limits, Workload, add_arguments, hardware_names, layer_terms,
                              load_hardware, main, plan, plan_to_dict)

REPO = Path(__file__).resolve().parents[2]
PAPER_405B = ["--model", "llama3.1-405b", "--tokens", "20M", "--seq-len", "1024", "--gpus", "14",
              "--gpu-memory", "80GB"]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def run_json(argv, capsys):
    code = main(parse(argv + ["--json"]))
    return code, json.loads(capsys.readouterr().out)


def by_k(result, k):
    return next(c for c in result["candidates"] if c["k"] == k)


def test_paper_405b_setting(capsys):
    code, result = run_json(PAPER_405B, capsys)
    assert code == 0
    assert (result["k"], result["num_blocks"], result["waves"], result["last_block_layers"]) == (9, 14, 1, 9)
    assert 9.0e12 <= result["cache_bytes"] <= 9.4e12
    assert result["blocks"][0] == [0, 9] and result["blocks"][-1] == [117, 126]
    assert result["per_block_memory_bytes"] <= 80e9
    # Larger k: the block does not fit an 80 GB GPU, and the reason says by how much.
    for k in (10, 11, 126):
        assert by_k(result, k)["status"] == "rejected"
        assert by_k(result, k)["reasons"][0].startswith("does not fit GPU memory")
        assert "> 80.0 GB" in by_k(result, k)["reasons"][0]
    # Smaller k fits but needs more waves on 14 GPUs (or more layers in sequence), and more cache.
    k8 = by_k(result, 8)
    assert k8["status"] == "kept" and k8["memory_bytes"] <= 80e9
    assert any("needs 2 waves on 14 GPUs" in r for r in k8["reasons"])
    assert any("slower than k=9" in r for r in k8["reasons"])
    assert any("needs 9 waves" in r for r in by_k(result, 1)["reasons"])
    # The text table says the same.
    assert main(parse(PAPER_405B)) == 0
    text = capsys.readouterr().out
    assert "Chosen: k=9: 14 blocks of 9 layers, 1 wave on 14 GPUs" in text
    assert re.search(r"rejected: does not fit GPU memory: 8\d\.\d GB > 80.0 GB", text)
    assert "frozen weights" in text and "saved activations" in text and "k=10: GPU memory" in text


@pytest.mark.parametrize("gpus", [14, 24])
def test_405b_cost_in_gpu_hours_beside_the_paper(gpus, capsys):
    """Issue 8, item 4: the schedule's cost in GPU-hours, and stage 2's FLOP-bound lower bound, next to the
    LoLCATs paper's published times (stage 1: 5 h on 14 H100s; LoRA: 16 h on 24 H100s)."""
    argv = [a if a != "14" else str(gpus) for a in PAPER_405B]
    code, result = run_json(argv, capsys)
    assert code == 0
    stage1, stage2 = result["cost"]["stage 1"], result["cost"]["stage 2 (LoRA)"]
    wall_s = result["predicted_times_s"]["collect_s"] + result["predicted_times_s"]["transfer_s"]
    assert stage1["gpus"] == gpus and stage1["gpu_hours"] == pytest.approx(wall_s / 3600 * gpus, rel=1e-3)
    assert stage1["paper"] == {"wall_h": 5.0, "gpus": 14, "gpu_hours": 70.0}
    assert stage2["paper"] == {"wall_h": 16.0, "gpus": 24, "gpu_hours": 384.0}
    # 4 x 405B params x 20M tokens at the preset's layer rate on all GPUs: independent of the GPU count in GPU-hours.
    params = 126 * result["model"]["params_per_layer"]
    expected = 4 * params * 20_000_000 / (result["hardware"]["layer_tflops"] * 1e12) / 3600
    assert stage2["lower_bound"] and stage2["gpu_hours"] == pytest.approx(expected, rel=1e-6)
    assert main(parse(argv)) == 0
    text = capsys.readouterr().out
    assert f"cost, stage 1: {stage1['wall_h']:.2f} h × {gpus} GPUs" in text
    assert "LoLCATs paper: 16 h on 24 H100s = 384 GPU-hours" in text


def test_more_gpus_or_less_disk_moves_k(capsys):
    _, wide = run_json(PAPER_405B + ["--gpus", "24"], capsys)
    assert wide["k"] < 9 and wide["waves"] == 1 and wide["num_blocks"] <= 24
    assert any(f"slower than k={wide['k']}" in r for r in by_k(wide, 9)["reasons"])

    disk = 12e12
    _, tight = run_json(PAPER_405B + ["--gpus", "24", "--disk", "12TB"], capsys)
    assert tight["k"] > wide["k"] and tight["cache_bytes"] <= disk
    rejected = by_k(tight, wide["k"])
    assert rejected["status"] == "rejected" and rejected["cache_bytes"] > disk
    assert any(r.startswith("cache ") and "> disk 12.00 TB" in r for r in rejected["reasons"])


def test_nothing_feasible_returns_1_and_explains(capsys):
    code, result = run_json(PAPER_405B + ["--disk", "9TB"], capsys)
    assert code == 1 and result["k"] is None and result["feasible"] is False
    assert main(parse(PAPER_405B + ["--disk", "9TB"])) == 1
    assert "k <= 9 fit in memory but need more disk" in capsys.readouterr().out


def test_json_schema(capsys):
    _, result = run_json(PAPER_405B, capsys)
    for key in ("k", "num_blocks", "waves", "blocks", "per_block_memory_bytes", "memory", "cache_bytes", "cache",
                "host_bytes_per_node", "shard_rows", "predicted_times_s", "model", "workload", "limits", "hardware",
                "candidates"):
        assert key in result, key
    assert set(result["memory"]) == {"weights", "saved_activations", "working_set", "trainable_state",
                                     "runtime_reserve"}
    assert sum(result["memory"].values()) == pytest.approx(result["per_block_memory_bytes"], abs=5)
    assert {"collect_s", "block_s", "transfer_s", "wall_s"} <= set(result["predicted_times_s"])
    assert len(result["candidates"]) == 126
    for cand in result["candidates"]:
        assert {"k", "num_blocks", "last_block_layers", "waves", "memory_bytes", "cache_bytes", "times_s",
                "status", "reasons"} <= set(cand)
        assert cand["status"] in ("chosen", "kept", "rejected")
        assert (cand["status"] == "chosen") == (cand["k"] == 9)
        assert cand["status"] == "chosen" or cand["reasons"]


def test_last_block_may_be_partial(capsys):
    _, result = run_json(PAPER_405B + ["--gpus", "8"], capsys)
    # 126 = 15 × 8 + 6: the last block has 6 layers and the cache holds 16 boundaries.
    assert (result["k"], result["num_blocks"], result["last_block_layers"], result["waves"]) == (8, 16, 6, 2)
    assert result["blocks"][-1] == [120, 126] and len(result["blocks"]) == 16
    assert result["cache"]["hidden"] == 16 * result["workload"]["train_tokens_stored"] * 16384 * 2
    # SmolLM2 (30 layers), k=7: 5 blocks, last one of 2 layers.
    _, small = run_json(["--model", "smollm2-135m", "--tokens", "1M", "--seq-len", "512", "--gpus", "2"], capsys)
    k7 = by_k(small, 7)
    assert (k7["num_blocks"], k7["last_block_layers"], k7["waves"]) == (5, 2, 3)


@pytest.mark.parametrize("argv, flag", [
    (["--gpus", "-1"], "--gpus"),
    (["--model", "llama-9000"], "--model"),
    (["--tokens", "0"], "--tokens"),
    (["--tokens", "many"], "--tokens"),
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--disk", "0TB"], "--disk"),
    (["--seq-len", "0"], "--seq-len"),
    (["--micro-batch", "-2"], "--micro-batch"),
    (["--hardware", "tpu-v9"], "--hardware"),
    (["--cluster", "nowhere"], "--cluster"),
])
def test_invalid_inputs_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        main(parse(PAPER_405B + argv))


def test_model_from_config_json(tmp_path, capsys):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, result = run_json(["--model", str(tmp_path), "--tokens", "100K", "--seq-len", "256", "--gpus", "0",
                          "--host-memory", "16GB"], capsys)
    assert result["model"]["num_layers"] == 6 and result["k"] == 6  # one CPU worker: no parallelism to gain
    with pytest.raises(ConfigError, match="--model"):
        main(parse(["--model", str(tmp_path / "missing.json"), "--tokens", "1M"]))


def test_cli_runs_under_5_seconds():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipeline.planner", *PAPER_405B, "--json"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert time.perf_counter() - start < 5.0
    assert json.loads(out)["k"] == 9


def test_hardware_presets_load():
    assert {"h100", "h200"} <= set(hardware_names())
    for name in hardware_names():
        hw = load_hardware(name)
        assert hw.layer_tflops > 0 and hw.disk_read_GBps > 0
    assert load_hardware("h100").measured is True and load_hardware("h200").measured is True  # both calibrated on the GPU machines


def test_calibrate_writes_a_usable_preset(tmp_path, capsys):
    out = tmp_path / "ci.yaml"
    code = main(parse(["--calibrate", "--name", "ci", "--out", str(out), "--disk-dir", str(tmp_path),
                       "--disk-bytes", "16MiB"]))
    assert code == 0 and out.exists()
    assert f"wrote {out}" in capsys.readouterr().out
    hw = load_hardware(str(out))
    assert hw.measured and hw.name == "ci"
    assert hw.layer_tflops > 0 and hw.fp32_tflops > 0 and hw.memory_GBps > 0 and hw.disk_write_GBps > 0
    _, result = run_json(["--model", "smollm2-135m", "--tokens", "1M", "--gpus", "0", "--hardware", str(out)],
                         capsys)
    assert result["hardware"]["name"] == "ci" and result["k"] is not None


# --------------------------------------------------------------------------------------------------
# The memory model against the real stage-1 step of blocks/ (blocks.transfer.transfer_loss + one backward):
# bytes saved for backward and peak bytes above the weights, for k layers.


def _measure_block_step(implementation, K, B, n, H, Hkv, D, f, w, d, inter, device="cpu", dtype=torch.float32):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from blocks.convert import AttentionSettings, convert_layers, freeze_for_transfer
    from blocks.stack import LayerStack
    from blocks.transfer import transfer_loss

    config = LlamaConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=K, num_attention_heads=H,
                         num_key_value_heads=Hkv, head_dim=D, vocab_size=64)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the big layers directly in their dtype
    try:
        with torch.device(device):
            layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(K))
            rotary = LlamaRotaryEmbedding(config)
    finally:
        torch.set_default_dtype(default_dtype)
    convert_layers(layers, config, AttentionSettings(feature_dim=f, window_size=w, implementation=implementation))
    stack = LayerStack(layers, rotary, 0, config)
    freeze_for_transfer(stack)
    persistent = {t.untyped_storage().data_ptr() for t in [*stack.parameters(), *stack.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in persistent:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hidden = torch.randn(B, n, d, device=device, dtype=dtype)
    positions = torch.arange(n, device=device).expand(B, n)

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _, _ = transfer_loss(stack, hidden, positions)
        loss.backward()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return sum(saved.values()), torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return sum(saved.values()), peak


def _modelled(kernel, K, B, n, H, Hkv, D, f, w, d, inter, teacher_bytes):
    """(saved, peak) of the planner's model for the same shapes, with the teacher MLP in teacher_bytes."""
    model = load_model_config({"name": "probe", "hf_config": dict(
        hidden_size=d, intermediate_size=inter, num_hidden_layers=K, num_attention_heads=H,
        num_key_value_heads=Hkv, head_dim=D, vocab_size=64)})
    terms = layer_terms(model, Workload(tokens=n, seq_len=n, micro_batch=B, feature_dim=f, window_size=w,
                                        kernel=kernel))
    profile = KERNEL_PROFILES[kernel]
    saved = K * (profile.saved_maps * terms["score_map"] + terms["per_token_saved"] + terms["chunk_states"])
    working = profile.working_maps * terms["score_map"] + terms["chunk_states"]
    return saved, saved + working + terms["teacher_transient"] * teacher_bytes / 2


SMALL = dict(K=2, B=1, n=256, H=8, Hkv=2, D=32, f=16, w=64, d=256, inter=256)


@pytest.mark.parametrize("implementation, kernel, saved_range, peak_range", [
    ("quadratic", "quadratic", (0.99, 1.03), (0.85, 1.02)),  # the quadratic path is modelled exactly
    ("blocked", "chunked", (0.85, 1.0), (0.8, 1.02)),  # the CPU default; the model is an upper bound
])
def test_memory_model_matches_the_blocks_step(implementation, kernel, saved_range, peak_range):
    saved, peak = _measure_block_step(implementation, **SMALL)
    saved_model, peak_model = _modelled(kernel, **SMALL, teacher_bytes=4)
    assert saved_range[0] <= saved / saved_model <= saved_range[1], (saved, saved_model)
    assert peak_range[0] <= peak / peak_model <= peak_range[1], (peak, peak_model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("implementation, kernel", [("quadratic", "quadratic")])
def test_memory_model_matches_the_blocks_step_at_405b_shapes(implementation, kernel):
    """Two Llama 3.1 405B decoder layers in bf16, n=1024, the real stage-1 step on the GPU. (The 'triton'
    path is not measured here yet: autotuning its backward at these shapes took over 3 minutes.)"""
    shape = dict(K=2, B=1, n=1024, H=128, Hkv=8, D=128, f=64, w=64, d=16384, inter=53248)
    saved, peak = _measure_block_step(implementation, **shape, device="cuda", dtype=torch.bfloat16)
    saved_model, peak_model = _modelled(kernel, **shape, teacher_bytes=2)
    print(f"\n405B shapes, 2 layers, {implementation}: saved {saved / 1e9:.3f} GB (model {saved_model / 1e9:.3f}), "
          f"peak above weights {peak / 1e9:.3f} GB (model {peak_model / 1e9:.3f})")
    assert 0.8 <= saved / saved_model <= 1.05
    assert 0.8 <= peak / peak_model <= 1.05


def test_plan_api_without_cli():
    model = load_model_config("llama3.1-70b")
    result = plan(model, Workload(tokens=20_000_000, seq_len=1024), Limits(gpus=16, gpu_memory=80 * 10**9,
                  host_memory=None, disk=None), load_hardware("h100"))
    assert result.chosen is not None and result.chosen.num_blocks <= 16
    assert plan_to_dict(result)["k"] == result.chosen.k
