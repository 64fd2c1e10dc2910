"""Planner: the paper's 405B setting, how the choice moves with the cluster, the JSON schema, partial last
blocks, input errors, speed, calibration, the memory model against a reference stage-1 step, and the fitted time
terms with `--check` against the measured GPU runs in docs/results/scale/."""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_model_config, resolve_run_config
from pipeline.planner import (KERNEL_PROFILES, Limits, Workload, add_arguments, block_times, check_runs,
                              hardware_names, layer_terms, load_hardware, lora_memory, lora_stage_s, lora_tokens_per_s,
                              main, measured_run_config, plan, plan_to_dict, run_inputs, schedule_wall_s,
                              total_params)

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
    """The paper's k <= 9 is the memory limit: k = 9 (14 blocks, one wave) is the largest block that fits an 80 GB
    GPU. Which feasible k is fastest is the time model's call: with the bf16 kernels (features in the model dtype,
    the default) one wave of k = 9 is fastest; with fp32 features the hybrid's share of a step is 5.5x longer
    (42.6 against 7.80 times its model), a block 2.4x, the collect chain (one task per boundary) matters less against
    it, and k = 8 (two waves, its last block of 6 layers) wins."""
    code, result = run_json(PAPER_405B, capsys)
    assert code == 0
    k9 = by_k(result, 9)
    assert (k9["num_blocks"], k9["waves"], k9["last_block_layers"], k9["status"]) == (14, 1, 9, "chosen")
    assert (result["k"], result["num_blocks"], result["waves"]) == (9, 14, 1)
    assert any("slower than k=9" in r for r in by_k(result, 8)["reasons"])
    _, result = run_json(PAPER_405B + ["--feature-dtype", "float32"], capsys)
    k9 = by_k(result, 9)
    assert (k9["num_blocks"], k9["waves"], k9["last_block_layers"], k9["status"]) == (14, 1, 9, "kept")
    assert 9.0e12 <= k9["cache_bytes"] <= 9.4e12 and k9["memory_bytes"] <= 80e9
    # Larger k: the block does not fit an 80 GB GPU, and the reason says by how much.
    for k in (10, 11, 126):
        assert by_k(result, k)["status"] == "rejected"
        assert by_k(result, k)["reasons"][0].startswith("does not fit GPU memory")
        assert "> 80.0 GB" in by_k(result, k)["reasons"][0]
    # The chosen k is the fastest feasible one; every other feasible k says why it lost.
    feasible = [c for c in result["candidates"] if c["status"] != "rejected"]
    assert [c["k"] for c in feasible] == list(range(1, 10))
    assert result["predicted_times_s"]["wall_s"] == min(c["times_s"]["wall_s"] for c in feasible)
    assert (result["k"], result["num_blocks"], result["waves"], result["last_block_layers"]) == (8, 16, 2, 6)
    assert result["blocks"][0] == [0, 8] and result["blocks"][-1] == [120, 126]
    assert any("slower than k=8" in r for r in k9["reasons"])
    assert any("needs 9 waves" in r for r in by_k(result, 1)["reasons"])
    # The text table says the same.
    assert main(parse(PAPER_405B + ["--feature-dtype", "float32"])) == 0
    text = capsys.readouterr().out
    assert "Chosen: k=8: 16 blocks (15 of 8 layers + a last block of 6), 2 waves on 14 GPUs" in text
    assert re.search(r"rejected: does not fit GPU memory: 8\d\.\d GB > 80.0 GB", text)
    assert "frozen weights" in text and "saved activations" in text and "k=10: GPU memory" in text
    assert "collect: a chain of 16 tasks" in text


@pytest.mark.parametrize("gpus", [14, 24])
def test_405b_cost_in_gpu_hours_beside_the_paper(gpus, capsys):
    """Issue 8, item 4: the schedule's cost in GPU-hours, and stage 2's, next to the LoLCATs paper's published
    times (stage 1: 5 h on 14 H100s; LoRA: 16 h on 24 H100s)."""
    argv = [a if a != "14" else str(gpus) for a in PAPER_405B]
    code, result = run_json(argv, capsys)
    assert code == 0
    stage1, stage2 = result["cost"]["stage 1"], result["cost"]["stage 2 (LoRA)"]
    wall_s = result["predicted_times_s"]["collect_s"] + result["predicted_times_s"]["transfer_s"]
    assert stage1["gpus"] == gpus and stage1["gpu_hours"] == pytest.approx(wall_s / 3600 * gpus, rel=1e-3)
    assert stage1["paper"] == {"wall_h": 5.0, "gpus": 14, "gpu_hours": 70.0}
    assert stage2["paper"] == {"wall_h": 16.0, "gpus": 24, "gpu_hours": 384.0}
    # The eval gate's token budget reads stage 1's count from this plan.
    from pipeline.evaluate import stage1_tokens_of_plan
    assert stage1["tokens"] == 20_000_000 and stage1_tokens_of_plan(result) == 20_000_000
    # Without gradient checkpointing a 405B rank would hold ~450 GB of activations, so stage 2 recomputes: 6 FLOPs
    # per matmul weight (405B layers + LM head) x 20M tokens at the preset's layer rate times its measured stage-2
    # efficiency with model-dtype features (the default); h100 has no start-up constant, so the GPU-hours do not
    # depend on the GPU count.
    hw = result["hardware"]
    params = 126 * result["model"]["params_per_layer"] + 128256 * 16384
    expected = 6 * params * 20_000_000 / (hw["layer_tflops"] * 1e12 * hw["lora_efficiency_model_features"]) / 3600
    assert stage2["gradient_checkpointing"] and stage2["fits"] == (gpus == 24)
    assert not stage2["lower_bound"] and stage2["gpu_hours"] == pytest.approx(expected, rel=1e-6)
    assert main(parse(argv)) == 0
    text = capsys.readouterr().out
    assert f"cost, stage 1: {stage1['wall_h']:.2f} h × {gpus} GPUs" in text
    assert "LoLCATs paper: 16 h on 24 H100s = 384 GPU-hours" in text
    assert "not measured for h100, so left out: weight_build_params_per_s" in text
    assert "GPU-hours over 20M tokens (LoLCATs paper: 16 h" in text
    # --lora-tokens: stage 2 on more tokens than stage 1 costs more; a bad count names the flag.
    code, longer = run_json(argv + ["--lora-tokens", "40M"], capsys)
    assert longer["cost"]["stage 2 (LoRA)"]["gpu_hours"] == pytest.approx(2 * stage2["gpu_hours"], rel=1e-6)
    assert longer["cost"]["stage 2 (LoRA)"]["tokens"] == 40_000_000 and longer["cost"]["stage 1"] == stage1
    with pytest.raises(ConfigError, match="--lora-tokens"):
        main(parse(argv + ["--lora-tokens", "-5"]))


def test_less_disk_moves_k_and_more_gpus_do_not_shorten_the_collect_chain(capsys):
    fp32 = PAPER_405B + ["--feature-dtype", "float32"]  # where k = 8 is chosen, so a smaller disk can push it up
    _, narrow = run_json(fp32, capsys)
    _, wide = run_json(fp32 + ["--gpus", "24"], capsys)
    # Collect runs one boundary at a time whatever the GPU count, and here it dominates: 24 GPUs give the same plan.
    assert wide["k"] == narrow["k"] and wide["waves"] == 1
    assert wide["predicted_times_s"]["collect_s"] == narrow["predicted_times_s"]["collect_s"]
    assert wide["predicted_times_s"]["wall_s"] == pytest.approx(narrow["predicted_times_s"]["wall_s"], rel=1e-9)

    disk = 10e12
    _, tight = run_json(fp32 + ["--disk", "10TB"], capsys)
    assert tight["k"] > narrow["k"] and tight["cache_bytes"] <= disk
    rejected = by_k(tight, narrow["k"])
    assert rejected["status"] == "rejected" and rejected["cache_bytes"] > disk
    assert any(r.startswith("cache ") and "> disk 10.00 TB" in r for r in rejected["reasons"])


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
        assert (cand["status"] == "chosen") == (cand["k"] == result["k"])
        assert cand["status"] == "chosen" or cand["reasons"]


def test_last_block_may_be_partial(capsys):
    _, result = run_json(PAPER_405B + ["--gpus", "8", "--feature-dtype", "float32"], capsys)
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


# --------------------------------------------------------------------------------------------------
# The fitted terms of the time model and `--check` against the measured runs (docs/results/scale/).

SCALE = REPO / "docs" / "results" / "scale"
RUN_8B, RUN_70B = SCALE / "scale_run_llama3-8b_4gpu.json", SCALE / "scale_run_llama3.1-70b_4gpu.json"


def measured_runs() -> list[str]:
    return sorted(str(p) for p in SCALE.glob("*.json"))


def test_check_reproduces_the_committed_json(tmp_path, capsys):
    """`--check docs/results/scale/*.json --hardware h200` gives the rows committed in planner_check.json (its own
    output in the glob is skipped), and the 70B run of session 3, which the constants were not fitted on, is within
    20%."""
    committed = json.loads((SCALE / "planner_check.json").read_text())
    out = tmp_path / "check.json"
    assert main(parse(["--check", *measured_runs(), "--hardware", "h200", "--out", str(out)])) == 0
    text = capsys.readouterr().out
    checked_json = json.loads(out.read_text())
    rows = checked_json["rows"]
    # task_start_s is the mean of the collect chain's gaps that the check reports (13 gaps in the 6 stamped runs).
    starts = checked_json["worker_starts"]
    assert (starts["runs"], starts["gaps"]) == (6, 13) and "13 gaps in 6 runs" in text
    assert starts["mean_s"] == pytest.approx(load_hardware("h200").task_start_s, abs=0.005)
    assert [(r["run"], r["quantity"]) for r in rows] == [(r["run"], r["quantity"]) for r in committed["rows"]]
    for row, old in zip(rows, committed["rows"]):
        assert row["ratio"] == pytest.approx(old["ratio"], rel=1e-9), row["quantity"]
        assert row["measured"] == pytest.approx(old["measured"], rel=1e-12) and row["within"] == old["within"]
    # The 70B runs are checks, except session 11's, on which three constants were refitted (also_fitted_on_run).
    assert {r["run"] for r in rows if r["model"] == "llama3.1-70b" and r["role"] == "fit"} == {
        "scale_run_llama3.1-70b_2gpu_session11"}
    # Session 3's 70B run (64K tokens, Triton cache warm from the 8B run before it) is the check the constants
    # must pass. Session 4's 70B runs (16K tokens, each first on a fresh machine) trained 4-6x slower per
    # micro-step than planned, for a reason the JSON cannot separate (cold compile or CPU contention); the
    # committed JSON records them as misses.
    # Its collect is 87% building random layers, which it did the old way (a whole block in fp32 on the host, then
    # cast); weight_build_params_per_s is now fitted on today's build, 1.33x faster, so that row is just outside.
    checked = [r for r in rows if r["run"] == "scale_run_llama3.1-70b_4gpu"]
    old_build = "collect: chain of 4 tasks (s)"
    assert checked and all(r["within"] for r in checked if r["quantity"] != old_build)
    assert next(r["ratio"] for r in checked if r["quantity"] == old_build) == pytest.approx(0.79, abs=0.01)
    quantities = {r["quantity"] for r in checked}
    assert {"collect: chain of 4 tasks (s)", "one block: task wall (s)", "collect + transfer wall (s)",
            "block memory, torch peak (GB; plan minus runtime reserve)"} <= quantities
    # The fit itself: the stage-1-alone blocks' training and the stage-2 rate come back to within 1%.
    fitted = {(r["run"], r["quantity"]): r["ratio"] for r in rows}
    assert fitted[("scale_transfer_llama3-8b-4gpu (4 GPUs)", "one block: training, timed micro-steps (s)")] == \
        pytest.approx(1, abs=0.01)
    assert fitted[("scale_run_llama3-8b_4gpu", "stage 2: tokens/s per rank")] == pytest.approx(1, abs=0.01)
    for quantity in ("stage 2: tokens/s per rank", "stage 2: model build + engine start (s)",
                     "one block: load = overhead + weights + first evaluation (s)"):  # the session-11 refits
        assert fitted[("scale_run_llama3.1-70b_2gpu_session11", quantity)] == pytest.approx(1, abs=0.02), quantity
    # Session 12's 70B run, which no constant was fitted on, through 200 LoRA steps and the export: every time and
    # memory row within 20% but the 16 timed stage-1 micro-steps (3.6 s measured; the constant is from 8B blocks);
    # the collect chain and the wall since task_start_s (fresh workers), the whole stage 2 with its tokens.
    session12 = {r["quantity"]: r for r in rows if r["run"] == "scale_run_llama3.1-70b_2gpu_session12"}
    assert session12 and {r["role"] for r in session12.values()} == {"check"}
    assert [q for q, r in session12.items() if not r["within"]] == ["one block: training, timed micro-steps (s)"]
    assert session12["stage 2: the stage's wall, 410K tokens (s)"]["ratio"] == pytest.approx(1, abs=0.03)
    # Runs from before session 4's fresh workers are planned without worker starts, and say so.
    old_8b = next(r for r in rows if r["run"] == "scale_run_llama3-8b_4gpu" and r["quantity"].startswith("collect:"))
    assert "workers reused" in old_8b["note"] and old_8b["within"]
    assert "one block: task wall (s)" in text and "within 20%?" in text


def _without(data: dict, path: str) -> dict:
    data = json.loads(json.dumps(data))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key] if not key.isdigit() else node[int(key)]
    del node[last]
    return data


@pytest.mark.parametrize("path", ["config", "plan.k", "blocks.collect_wall_s", "blocks.transfer.0.train_s",
                                  "cache_bytes"])
def test_check_names_a_missing_field_and_the_file(path, tmp_path):
    broken = tmp_path / "broken_70b.json"
    broken.write_text(json.dumps(_without(json.loads(RUN_70B.read_text()), path)))
    field_name = path.split(".")[-1]
    with pytest.raises(ConfigError, match=rf"broken_70b\.json.*{re.escape(field_name)}"):
        main(parse(["--check", str(broken), "--hardware", "h200"]))


def test_check_needs_the_run_behind_a_scaling_or_resumed_json(tmp_path):
    with pytest.raises(ConfigError, match="give that run's JSON too"):
        main(parse(["--check", str(SCALE / "scale_transfer_llama3-8b-4gpu.json"), "--hardware", "h200"]))
    # A resumed run's JSON has no config of its own: it is read with the first run's JSON (same run_dir).
    with pytest.raises(ConfigError, match="has no 'config'"):
        main(parse(["--check", str(SCALE / "scale_run_llama3-8b_4gpu_resumed.json"), "--hardware", "h200"]))
    ranks = _without(json.loads((SCALE / "scale_run_llama3-8b_4gpu_resumed.json").read_text()),
                     "finetune.ranks.2.tokens_per_s")
    (tmp_path / "resumed.json").write_text(json.dumps(ranks))
    with pytest.raises(ConfigError, match=r"finetune\.ranks\[2\].*tokens_per_s"):
        main(parse(["--check", str(RUN_8B), str(tmp_path / "resumed.json"), "--hardware", "h200"]))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        main(parse(["--check", str(tmp_path / "list.json")]))


def test_check_picks_up_a_new_finetune_section(tmp_path):
    """A later run JSON with a 'finetune' section (here: the 70B run given the 8B run's stage-2 figures) adds the
    stage-2 rows, planned for that run's model and rank count."""
    data = json.loads(RUN_70B.read_text())
    data["finetune"] = json.loads((SCALE / "scale_run_llama3-8b_4gpu_resumed.json").read_text())["finetune"]
    path = tmp_path / "scale_run_llama3.1-70b_4gpu.json"
    path.write_text(json.dumps(data))
    rows = {r["quantity"]: r for r in check_runs([str(path)], "h200")["rows"]}
    hw, model = load_hardware("h200"), load_model_config("llama3.1-70b")
    # That run's JSON predates the feature_dtype field, so it is planned with fp32 features (its kernels then).
    assert rows["stage 2: tokens/s per rank"]["planned"] == pytest.approx(
        lora_tokens_per_s(model, hw, feature_dtype="float32"))
    assert rows["stage 2: tokens/s per rank"]["measured"] == pytest.approx(567.24, abs=0.01)
    assert rows["stage 2: model build + engine start (s)"]["planned"] == pytest.approx(
        total_params(model) / 4 / hw.lora_startup_params_per_s)
    assert rows["stage 2: tokens/s per rank"]["role"] == "check"


def _run_8b():
    """The 8B run's planner inputs (its config, fp32 features as it ran) and its k."""
    config = measured_run_config(json.loads(RUN_8B.read_text())["config"])
    workload, limits = run_inputs(config)
    return config.model, workload, limits


def times(hw, workload=None, k=8, gpus=None):
    model, run_workload, limits = _run_8b()
    if gpus is not None:
        limits = dataclasses.replace(limits, gpus=gpus)
    return block_times(model, k, workload or run_workload, hw, limits)


def test_each_fitted_term_moves_the_plan_the_expected_way():
    h200 = load_hardware("h200")
    model, workload, _ = _run_8b()
    base = times(h200)
    d, k, P = model.hidden_size, 8, model.params_per_layer
    tokens = workload.train_tokens_stored + workload.val_tokens
    # Weight build: random weights at the per-task rate, in every block and every collect task but the embedding's.
    none = times(dataclasses.replace(h200, weight_build_params_per_s=None))
    assert none["block_build_s"] == 0 and none["collect_build_s"] == 0
    assert base["block_build_s"] == pytest.approx(k * P / h200.weight_build_params_per_s)
    assert base["collect_build_s"] == pytest.approx((model.vocab_size * d + 3 * k * P) / h200.weight_build_params_per_s)
    assert base["block_s"] - none["block_s"] == pytest.approx(base["block_build_s"])
    # A checkpoint is read in bf16 at the disk's rate instead.
    read = times(h200, dataclasses.replace(workload, weights="checkpoint"))
    assert read["block_build_s"] == pytest.approx(k * P * 2 / (h200.disk_read_GBps * 1e9))
    # Evaluations: 500 micro-steps / 8 = 62 optimizer steps, every 20 -> steps 0, 20, 40, 60 and the end: 5 passes.
    assert workload.evaluations == 5 and dataclasses.replace(workload, eval_every=100).evaluations == 2
    assert dataclasses.replace(workload, tokens=1024).evaluations == 1
    assert times(dataclasses.replace(h200, eval_step_fraction=None))["block_eval_s"] == 0
    fewer = times(h200, dataclasses.replace(workload, eval_every=100))
    assert fewer["block_eval_s"] == pytest.approx(base["block_eval_s"] * 2 / 5) and fewer["block_s"] < base["block_s"]
    # The stage-1 step: the hybrid at the slowdown times its chunked model; without the factor, the FLOP model.
    plain = times(dataclasses.replace(h200, stage1_attention_slowdown=None))
    assert plain["block_attention_s"] == pytest.approx(plain["block_hybrid_s"] + plain["block_map_passes_s"])
    assert base["block_attention_s"] == pytest.approx(h200.stage1_attention_slowdown * plain["block_attention_s"])
    assert base["block_train_s"] > 10 * plain["block_train_s"]
    # Features in the model dtype (the default since session 9) take the bf16 kernels: their own, smaller constant.
    assert workload.feature_dtype == "float32"
    bf16 = times(h200, dataclasses.replace(workload, feature_dtype="model"))
    assert bf16["block_attention_s"] == pytest.approx(
        h200.stage1_attention_slowdown_model_features * plain["block_attention_s"])
    only_fp32 = dataclasses.replace(h200, stage1_attention_slowdown_model_features=None)
    assert times(only_fp32, dataclasses.replace(workload, feature_dtype="model")) == base  # falls back
    # The quadratic kernel (not measured) adds its extra FLOPs and passes over the chunked model at face value.
    quadratic = times(h200, dataclasses.replace(workload, kernel="quadratic"))
    plain_q = times(dataclasses.replace(h200, stage1_attention_slowdown=None),
                    dataclasses.replace(workload, kernel="quadratic"))
    assert quadratic["block_attention_s"] == pytest.approx(
        base["block_attention_s"] + plain_q["block_attention_s"] - plain["block_attention_s"])
    # Collect's GPU<->host copies: boundary 0 out once, boundaries 1-3 in and out: 7 boundaries.
    no_copy = times(dataclasses.replace(h200, host_copy_GBps=None))
    assert base["collect_compute_s"] - no_copy["collect_compute_s"] == pytest.approx(
        7 * tokens * d * 2 / (h200.host_copy_GBps * 1e9))
    # Cache writes at the measured effective rate (slower than the raw disk), else the raw disk's.
    raw = times(dataclasses.replace(h200, cache_write_GBps=None))
    assert base["collect_io_s"] > raw["collect_io_s"]
    # The per-task overhead: once per collect task and once per block.
    no_overhead = times(dataclasses.replace(h200, task_overhead_s=None))
    assert base["collect_s"] - no_overhead["collect_s"] == pytest.approx(4 * h200.task_overhead_s)
    assert base["block_s"] - no_overhead["block_s"] == pytest.approx(h200.task_overhead_s)
    # A fresh worker's start: before each collect task (the chain waits for it) and before each block in the
    # schedule, but outside a block's own wall. On one GPU everything runs in sequence: 4 + 4 starts.
    no_start = times(dataclasses.replace(h200, task_start_s=None))
    assert h200.task_start_s > 5 and base["task_start_s"] == h200.task_start_s and no_start["task_start_s"] == 0
    assert base["collect_s"] - no_start["collect_s"] == pytest.approx(4 * h200.task_start_s)
    assert base["block_s"] == no_start["block_s"]
    one_gpu = times(h200, gpus=1)["wall_s"] - times(dataclasses.replace(h200, task_start_s=None), gpus=1)["wall_s"]
    assert one_gpu == pytest.approx(8 * h200.task_start_s)


def test_collect_is_a_chain_and_blocks_start_when_their_boundary_is_complete():
    h200 = load_hardware("h200")
    four, many = times(h200, gpus=4), times(h200, gpus=64)
    assert four["collect_s"] == many["collect_s"]  # one boundary at a time, whatever the GPUs
    # One wave: the last block starts after the whole chain.
    assert four["wall_s"] == pytest.approx(four["collect_s"] + four["task_start_s"] + four["block_s"])
    # The schedule: one GPU runs everything in sequence; blocks alone run in waves.
    assert schedule_wall_s([1.0, 2.0, 3.0], [10.0, 10.0, 10.0], 1) == pytest.approx(36.0)
    assert schedule_wall_s([0.0] * 4, [5.0] * 4, 2) == pytest.approx(10.0)
    assert schedule_wall_s([1.0, 2.0, 3.0], [10.0, 10.0, 10.0], 4) == pytest.approx(1 + 2 + 3 + 10)
    # Two GPUs: collect 1 (t 1-3), block 0 (t 1-11); collect 2 waits for a GPU (t 3-6), block 1 (t 6-16), block 2
    # (t 11-21).
    assert schedule_wall_s([1.0, 2.0, 3.0], [10.0, 10.0, 10.0], 2) == pytest.approx(21.0)


def test_stage2_rate_and_startup():
    h200, model = load_hardware("h200"), load_model_config("llama3-8b")
    bound = lora_tokens_per_s(model, dataclasses.replace(h200, lora_efficiency=None,
                                                         lora_efficiency_model_features=None))
    assert bound == pytest.approx(h200.layer_tflops * 1e12 / (4 * (32 * model.params_per_layer + 128256 * 4096)))
    # Each feature dtype has its constant; without a model-dtype one, the fp32 one is used for both.
    assert lora_tokens_per_s(model, h200) == pytest.approx(bound * h200.lora_efficiency_model_features)
    assert lora_tokens_per_s(model, h200, feature_dtype="float32") == pytest.approx(bound * h200.lora_efficiency)
    assert lora_tokens_per_s(model, dataclasses.replace(h200, lora_efficiency_model_features=None)) == \
        pytest.approx(bound * h200.lora_efficiency)
    workload = Workload(tokens=20_000_000, seq_len=1024)
    slow = lora_stage_s(model, workload, h200, 4)
    # fp32 features (0.0286) are slower than model-dtype ones (0.160), and both slower than the FLOP bound.
    assert lora_stage_s(model, workload, dataclasses.replace(h200, lora_efficiency_model_features=None), 4) > slow \
        > lora_stage_s(model, workload, dataclasses.replace(h200, lora_efficiency=None,
                                                            lora_efficiency_model_features=None), 4)
    assert slow - lora_stage_s(model, workload, dataclasses.replace(h200, lora_startup_params_per_s=None), 4) == \
        pytest.approx(8_030_261_248 / 4 / h200.lora_startup_params_per_s)
    # Stage 2 trains on as many tokens as stage 1 unless told otherwise (finetune.train_tokens in a run config).
    training_20m = lora_stage_s(model, workload, dataclasses.replace(h200, lora_startup_params_per_s=None), 4)
    twice = lora_stage_s(model, dataclasses.replace(workload, lora_tokens=40_000_000), h200, 4)
    assert twice - slow == pytest.approx(training_20m)
    config = resolve_run_config({"model": "llama3-8b", "transfer": {"train_tokens": "16K"},
                                 "finetune": {"train_tokens": 409600}})
    assert run_inputs(config)[0].lora_tokens == 409600 and run_inputs(config)[0].tokens == 16_000


def test_fitted_constants_in_presets(tmp_path):
    h200, h100 = load_hardware("h200"), load_hardware("h100")
    assert h200.fitted_on == "llama3-8b" and h200.left_out() == []
    # h100 carries only the hardware-independent ratios; the host-side constants are not measured there.
    ratios = ("stage1_attention_slowdown", "stage1_attention_slowdown_model_features", "eval_step_fraction",
              "lora_efficiency", "lora_efficiency_model_features")
    assert [getattr(h100, key) for key in ratios] == [getattr(h200, key) for key in ratios]
    assert h100.left_out() == ["weight_build_params_per_s", "host_copy_GBps", "task_overhead_s", "task_start_s",
                               "lora_startup_params_per_s"]
    base = (REPO / "configs" / "hardware" / "h100.yaml").read_text()
    for extra, message in [("host_copy_GBps: -1\n", "host_copy_GBps must be a positive number"),
                           ("stage1_slowdown: 3\n", "unknown keys"),
                           ("task_overhead_s: fast\n", "task_overhead_s must be a number >= 0"),
                           ("task_start_s: -10\n", "task_start_s must be a number >= 0")]:
        (tmp_path / "bad.yaml").write_text(base + extra)
        with pytest.raises(ConfigError, match=message):
            load_hardware(str(tmp_path / "bad.yaml"))


def test_stage2_with_gradient_checkpointing_plans_the_recomputed_forward(tmp_path):
    """finetune.gradient_checkpointing (the 70B stage-2 setting) runs each layer's forward again in the backward:
    6 FLOPs per matmul weight and token instead of 4, so the check plans 2/3 of the rate for such a run."""
    h200, model = load_hardware("h200"), load_model_config("llama3.1-70b")
    assert lora_tokens_per_s(model, h200, True) == pytest.approx(lora_tokens_per_s(model, h200) * 4 / 6)
    data = json.loads(RUN_70B.read_text())
    data["config"]["finetune"]["gradient_checkpointing"] = True
    data["finetune"] = json.loads((SCALE / "scale_run_llama3-8b_4gpu_resumed.json").read_text())["finetune"]
    (tmp_path / "run.json").write_text(json.dumps(data))
    row = next(r for r in check_runs([str(tmp_path / "run.json")], "h200")["rows"]
               if r["quantity"] == "stage 2: tokens/s per rank")
    assert row["planned"] == pytest.approx(lora_tokens_per_s(model, h200, True, "float32"))
    assert "checkpointing" in row["note"] and "float32 features" in row["note"]


def test_stage2_memory_model_fits_the_8b_run_and_checks_on_both_70b_runs():
    """lora_memory: the ZeRO-3 partition, two gathered layers, fp32 logits and saved activations (all layers', or
    with gradient checkpointing each layer's input plus one layer's). lora_activation_bytes is fitted on the 8B
    run; the two 70B runs (gradient checkpointing, 4 and 2 ranks) are the check, within 3%."""
    rows = {(r["run"], r["quantity"]): r for r in check_runs(measured_runs(), "h200")["rows"]}
    quantity = "stage 2: GPU memory per rank, torch peak (GB)"
    assert rows[("scale_run_llama3-8b_4gpu", quantity)]["ratio"] == pytest.approx(1, abs=0.005)
    for run in ("scale_run_llama3.1-70b_4gpu_session6", "scale_run_llama3.1-70b_2gpu_session11"):
        assert rows[(run, quantity)]["ratio"] == pytest.approx(1, abs=0.03), run
    h200, model = load_hardware("h200"), load_model_config("llama3.1-70b")
    terms = lora_memory(model, 1024, 1, 2, h200, gradient_checkpointing=True)
    assert terms["weights_partition"] == total_params(model)  # 2 bytes over 2 ranks
    assert terms["saved_activations"] == pytest.approx(80 * 1024 * 8192 * 2 + h200.lora_activation_bytes * 1024 * 8192)


@pytest.mark.parametrize("gpus, memory, checkpointing, fits", [
    (4, "141GB", False, True),   # 8B on 4 x H200: no need to recompute
    (1, "24GB", True, True),     # 8B on one 24 GB GPU: only with gradient checkpointing
    (1, "16GB", True, False),    # its 16 GB of weights alone do not fit
])
def test_stage2_recomputes_only_when_it_must(gpus, memory, checkpointing, fits, capsys):
    code, result = run_json(["--model", "llama3-8b", "--tokens", "1M", "--seq-len", "1024", "--gpus", str(gpus),
                             "--gpu-memory", memory, "--hardware", "h200"], capsys)
    stage2 = result["cost"]["stage 2 (LoRA)"]
    assert (stage2["gradient_checkpointing"], stage2["fits"]) == (checkpointing, fits)
    main(parse(["--model", "llama3-8b", "--tokens", "1M", "--seq-len", "1024", "--gpus", str(gpus), "--gpu-memory",
                memory, "--hardware", "h200"]))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  stage 2 (LoRA): ZeRO-3"))
    assert ("gradient checkpointing on" in line) == checkpointing and ("over the" in line) == (not fits)
