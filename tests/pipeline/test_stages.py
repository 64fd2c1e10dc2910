"""The block-wise stages on a tiny random model (4 layers, d=64, k=2) in one local Ray instance: plan, the cache
boundaries against the whole teacher model, per-block transfer results and metrics, stitch (and its contract
with stage 2), a rerun that does nothing, and collect rewriting exactly the missing and corrupt shards."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors_bytes

from pipeline.cache import BoundaryCache
from pipeline.config import load_run_config
from pipeline.rundir import RunDir
from pipeline.run import RunError, resume, run_pipeline
from pipeline.stages import (STITCHED_META, STITCHED_WEIGHTS, TRANSFER_MSE_JSON, TRANSFER_MSE_PNG, collect_boundary,
                             parse_faults, read_tokens)

from tests.conftest import TINY_RUN as TINY  # noqa: E402

SHARD_BYTES = 32 * 1024  # 8 rows of 32 tokens x 64 dims in bf16: 48 train rows -> 6 shards



@pytest.fixture(scope="module")
def reference(ray_local, tiny_config, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "reference")
    return run_pipeline(tiny_config, run_dir, until="stitch", shard_bytes=SHARD_BYTES)


def test_plan_state_and_cache_layout(reference):
    plan = reference.read_json("plan.json")
    assert (plan["k"], plan["num_blocks"], plan["k_source"], plan["blocks"]) == (2, 2, "config", [[0, 2], [2, 4]])
    assert plan["shard_rows"] == 8
    assert plan["splits"] == {"train": {"rows": 48, "shards": 6}, "validation": {"rows": 4, "shards": 1}}
    assert set(plan["predicted_times_s"]) >= {"collect_s", "block_s", "wall_s"}
    resolved = yaml.safe_load(reference.read_text("run.yaml"))
    assert resolved["transfer"]["layers_per_block"] == 2 and resolved["run_dir"] == reference.url
    assert {k: v for k, v in reference.state().items() if v != "pending"} == {
        "plan": "done", "collect": "done", "transfer": "done", "stitch": "done"}
    for split, shards in (("train", 6), ("validation", 1)):
        cache = BoundaryCache(reference, split)
        assert cache.layers() == [0, 2]  # the last block's output is never needed
        for layer in (0, 2):
            index = cache.index(layer)
            assert index["complete"] and index["num_shards"] == shards
    assert BoundaryCache(reference, "train").reader(2).num_rows == 48
    # Wall seconds of every finished stage (the scale proof compares them with the plan's prediction).
    assert set(reference.read_json("stage_times.json")) == {"plan", "collect", "stitch"}
    summary = reference.read_json("blocks/summary.json")
    assert all(task["peak_gpu_bytes"] is None for task in summary["collect"])  # CPU workers: no GPU peak
    assert all(task["attempt"]["peak_gpu_bytes"] is None for task in summary["transfer"])
    # Wall-clock spans (to line tasks up across processes) and the first step and evaluation timed apart.
    for task in summary["collect"] + [t["attempt"] for t in summary["transfer"]]:
        assert task["started_at"] <= task["ended_at"] <= time.time()
    for task in summary["transfer"]:
        attempt = task["attempt"]
        assert 0 < attempt["first_micro_step_s"] <= attempt["train_s"]
        assert 0 < attempt["first_eval_s"] <= min(attempt["eval_s"], attempt["load_s"])
        # The time before training, split: building the layers, reading the validation rows, the first evaluation.
        assert 0 < attempt["build_s"] and 0 <= attempt["validation_read_s"]
        assert attempt["build_s"] + attempt["validation_read_s"] + attempt["first_eval_s"] <= attempt["load_s"]


def test_boundaries_are_the_teachers_raw_residual_stream(reference):
    """Boundary 0 = embeddings, boundary 2 = the stream entering layer 2 (before its input_layernorm),
    exactly as the whole model computes it (up to the bf16 storage of boundary 0)."""
    from pipeline.models import load_model

    config = load_run_config_from(reference)
    tokens = read_tokens(reference, "train")
    assert tokens.shape == (48, 32) and 0 <= tokens.min() and tokens.max() < 128
    model = load_model(config.model)
    with torch.no_grad():
        states = model(tokens[:8], output_hidden_states=True).hidden_states  # states[l]: input of layer l
    reader0 = BoundaryCache(reference, "train").reader(0)
    hidden0, positions = reader0.read_shard(0)
    assert torch.equal(hidden0, states[0].to(torch.bfloat16))
    assert torch.equal(positions, torch.arange(32).expand(8, 32))
    hidden2, _ = BoundaryCache(reference, "train").reader(2).read_shard(0)
    assert hidden2.dtype == torch.bfloat16
    torch.testing.assert_close(hidden2.float(), states[2], rtol=2e-2, atol=2e-2)
    # Not the normalized input: the layer's input_layernorm output is far from the stored stream.
    normed = model.model.layers[2].input_layernorm(states[2])
    assert (normed - hidden2.float()).abs().max() > 0.5


def load_run_config_from(run):
    path = run.path("run.yaml")
    return load_run_config(path)


def test_blocks_train_and_record_metrics(reference):
    for block, layers in ((0, [0, 1]), (1, [2, 3])):
        folder = f"blocks/B{block:03d}"
        result = reference.read_json(f"{folder}/result.json")
        assert result["converted_layers"] == layers and result["layers"] == [layers[0], layers[-1] + 1]
        assert result["optimizer_steps"] == 12 and result["micro_steps"] == 24 and result["tokens"] == 48 * 32
        assert result["best_val_loss"] < result["val_loss_before"]
        assert len(result["mse_before"]) == len(result["mse_after"]) == 2
        lines = [yaml.safe_load(line) for line in reference.read_text(f"{folder}/metrics.jsonl").splitlines()]
        evals = [r["optimizer_step"] for r in lines if r["event"] == "eval"]
        steps = [r["optimizer_step"] for r in lines if r["event"] == "train"]
        assert evals == [0, 2, 4, 6, 8, 10, 12] and steps == list(range(1, 13))
        assert lines[0]["val_per_layer_mse"] == result["mse_before"]
        final = load_safetensors_bytes(reference.read_bytes(f"{folder}/final.safetensors"))
        assert sorted(final) == sorted(f"layers.{i}.{name}" for i in layers
                                       for name in ("feature_map_k.weight", "feature_map_q.weight", "window_logit"))
        assert final[f"layers.{layers[0]}.feature_map_q.weight"].shape == (4, 16, 8)
        assert reference.exists(f"{folder}/checkpoint.pt")
    summary = reference.read_json("blocks/summary.json")
    assert len(summary["collect"]) == 2 and len(summary["transfer"]) == 2


def test_stitch_writes_the_stage_two_contract(reference):
    state = load_safetensors_bytes(reference.read_bytes(STITCHED_WEIGHTS))
    assert len(state) == 12
    for block in (0, 1):
        final = load_safetensors_bytes(reference.read_bytes(f"blocks/B{block:03d}/final.safetensors"))
        for key, value in final.items():
            assert torch.equal(state[key], value), key
    meta = reference.read_json(STITCHED_META)
    assert meta["attention"] == {**TINY["attention"], "feature_dtype": "model"}
    assert meta["model"]["name"] == "tiny-random"
    assert meta["layers"] == 4 and meta["converted_layers"] == [0, 1, 2, 3] and len(meta["base_model_sha256"]) == 64
    mse = reference.read_json(TRANSFER_MSE_JSON)
    assert mse["layers"] == [0, 1, 2, 3] and sum(mse["mse_after"]) < sum(mse["mse_before"])
    assert reference.read_bytes(TRANSFER_MSE_PNG)[:8] == b"\x89PNG\r\n\x1a\n"
    # Stage 2 loads it: the teacher with those layers converted and the trained feature maps in place.
    from pipeline.finetune import load_stitched

    stitched = load_stitched(reference)
    assert stitched.layers == [0, 1, 2, 3]
    layer = stitched.model.model.layers[3].self_attn
    assert torch.equal(layer.feature_map_k.weight, state["layers.3.feature_map_k.weight"])


def test_rerun_does_nothing_and_other_configs_are_refused(reference, tiny_config, tmp_path):
    files = {p: os.stat(p).st_mtime_ns for p in _files(reference.root)}
    run_pipeline(tiny_config, reference.url, until="stitch")
    resume(reference.url, until="stitch")
    assert {p: os.stat(p).st_mtime_ns for p in _files(reference.root)} == files
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "seed": 1}))
    with pytest.raises(RunError, match="different run"):
        run_pipeline(other, reference.url)
    with pytest.raises(RunError, match="nothing to resume"):
        resume(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown field"):
        parse_faults("transfer:blok=1")


def test_a_new_run_starts_at_stage_2_from_another_runs_stage_1(reference, tmp_path):
    """--stage1-from: a stage-2 A/B reuses the stitched state; it is refused where stage 1 would differ."""
    variant = tmp_path / "distill.yaml"
    variant.write_text(yaml.safe_dump({**TINY, "finetune": {"objective": "distill", "lr": 3e-4}}))
    run = run_pipeline(variant, str(tmp_path / "distill"), until="stitch", stage1_from=reference.url)
    assert [run.is_done(stage) for stage in ("plan", "collect", "transfer", "stitch")] == [True] * 4
    for rel in (STITCHED_WEIGHTS, STITCHED_META, TRANSFER_MSE_JSON, "plan.json"):
        assert run.read_bytes(rel) == reference.read_bytes(rel)
    assert not run.exists("cache") and run.read_json("stage1_source.json")["source"] == reference.url
    config = load_run_config(run.path("run.yaml"))
    assert (config.finetune.objective, config.finetune.lr) == ("distill", 3e-4)
    # The same command again continues that run; another stage 1 is refused, naming what differs.
    run_pipeline(variant, run.url, until="stitch", stage1_from=reference.url)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "seed": 1, "attention": {**TINY["attention"], "window_size": 16}}))
    with pytest.raises(RunError, match=r"its attention, seed differ from this config's"):
        run_pipeline(other, str(tmp_path / "other"), stage1_from=reference.url)
    with pytest.raises(RunError, match="not a run whose stitch stage is done"):
        run_pipeline(variant, str(tmp_path / "third"), stage1_from=str(tmp_path / "distill-missing"))


def _files(root):
    return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)


def test_collect_rewrites_only_missing_and_corrupt_shards(reference, tmp_path):
    """A boundary left unfinished by a crash: one indexed shard damaged, one written but never indexed.
    Collect verifies, rewrites those two, keeps the rest, and ends with the same bytes."""
    run = RunDir(str(tmp_path / "copy"))
    shutil.copytree(reference.root, run.root)
    cache = BoundaryCache(run, "train")
    original = {i: open(cache.shard_path(2, i), "rb").read() for i in range(6)}
    with open(cache.shard_path(2, 1), "r+b") as f:  # flip one byte of the hidden states
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    cache.invalidate(2, [4])  # shard 4 on disk but not in the index: the crash came between the two writes
    untouched = {i: os.stat(cache.shard_path(2, i)).st_mtime_ns for i in (0, 2, 3, 5)}
    stats = collect_boundary(run.url, 1)
    assert stats["status"] == "ok"
    assert stats["regenerated"] == [["train", 1]]
    assert (stats["shards_written"], stats["shards_skipped"]) == (2, 5)  # 6 train + 1 validation shards
    assert cache.is_complete(2) and cache.verify(2) == []
    for i in range(6):
        assert open(cache.shard_path(2, i), "rb").read() == original[i], i
    assert {i: os.stat(cache.shard_path(2, i)).st_mtime_ns for i in (0, 2, 3, 5)} == untouched


def test_scale_proof_reruns_transfer_alone_on_a_linked_copy_of_the_cache(reference, tmp_path):
    """pipeline/bench_scale.py's scaling mode: a copy with the plan and hard-linked cache, marked collected, runs
    stage 1 only, and its summary carries what the table prints."""
    from pathlib import Path

    from pipeline.bench_scale import copy_for_transfer, summarize

    source = Path(reference.url)
    target = tmp_path / "transfer-again"
    copy_for_transfer(source, target)
    shard = next((source / "cache").rglob("*.safetensors"))
    assert os.stat(target / shard.relative_to(source)).st_ino == os.stat(shard).st_ino  # linked, not copied
    assert not (target / "blocks").exists()
    resume(str(target), until="transfer")
    summary = summarize(target)
    assert [t["block"] for t in sorted(summary["blocks"]["transfer"], key=lambda t: t["block"])] == [0, 1]
    assert summary["blocks"]["collect"] == [] and summary["blocks"]["transfer_wall_s"] > 0
    assert summary["plan"]["k"] == 2 and summary["cache_bytes"] == summarize(source)["cache_bytes"]
    before = load_safetensors_bytes((source / "blocks/B001/final.safetensors").read_bytes())
    after = load_safetensors_bytes((target / "blocks/B001/final.safetensors").read_bytes())
    for key in before:  # the same cache and seed: the same trained feature maps
        torch.testing.assert_close(after[key], before[key])


def test_a_block_says_where_its_time_before_training_went(reference, tmp_path, capsys):
    """Printed as it happens (a killed run's log still has it) and kept in the result's attempt."""
    from pipeline.bench_scale import copy_for_transfer
    from pipeline.stages import transfer_block

    target = tmp_path / "one-block"
    copy_for_transfer(Path(reference.url), target)
    attempt = transfer_block(str(target), 1)["attempt"]
    out = capsys.readouterr().out
    assert (f"transfer block 1: layers built in {attempt['build_s']:.1f} s, validation rows read in "
            f"{attempt['validation_read_s']:.1f} s, first evaluation {attempt['first_eval_s']:.1f} s") in out
    assert f"transfer block 1: first micro-step {attempt['first_micro_step_s']:.1f} s" in out


def test_start_waits_from_the_session6_70b_run():
    """bench_scale's start waits, on the committed 70B run: each block started 12-15 s after its boundary was
    written, each collect task 11-13 s after the one before it (docs/results.md, section 8, session 6)."""
    import json
    from pathlib import Path

    from pipeline.bench_scale import start_waits, table

    path = Path(__file__).resolve().parents[2] / "docs/results/scale/scale_run_llama3.1-70b_4gpu_session6.json"
    result = json.loads(path.read_text())
    waits = start_waits(result["blocks"])
    assert {block: round(s, 1) for block, s in waits["transfer"].items()} == {0: 12.3, 1: 12.7, 2: 15.0}
    assert sorted(waits["collect"]) == [1, 2] and all(11 < s < 13 for s in waits["collect"].values())
    result["blocks"]["start_wait_s"] = waits
    assert "task start wait (s, max)" in table(result) and "15.0" in table(result)
    assert start_waits({"collect": [], "transfer": [{"block": 0}]}) == {"collect": {}, "transfer": {}}


def test_timeline_of_the_session12_70b_run(tmp_path):
    """bench_scale's timeline, on the committed 70B run through every stage: the stages end to end, each collect
    task and block placed by its own stamps after the wait before it, the stage-2 ranks' build then training, and
    a PNG drawn from it."""
    import json
    from pathlib import Path

    from pipeline.bench_scale import main, timeline_rows

    path = Path(__file__).resolve().parents[2] / "docs/results/scale/scale_run_llama3.1-70b_2gpu_session12.json"
    result = json.loads(path.read_text())
    rows = dict(timeline_rows(result))
    stages = rows["stages"]
    assert [kind for _, _, kind in stages] == ["plan", "collect", "stitch", "finetune", "export", "eval"]
    assert all(a + length == pytest.approx(b) for (a, length, _), (b, _, _) in zip(stages, stages[1:]))
    collect_start, collect_s = stages[1][0], stages[1][1]
    # Boundary 1 waits (its worker starts) after boundary 0 ends, then runs; all of stage 1 lies inside collect.
    (wait0, run0), (wait1, run1) = rows["collect boundary 0"], rows["collect boundary 1"]
    assert wait1[0] == pytest.approx(run0[0] + run0[1]) and wait1[1] == pytest.approx(11.0, abs=0.1)
    for label in ("collect boundary 1", "transfer block 0", "transfer block 1", "kernel warm-up"):
        start, length, _ = rows[label][-1]
        assert collect_start <= rows[label][0][0] and start + length <= collect_start + collect_s + 1e-6, label
    block0 = {kind: length for _, length, kind in rows["transfer block 0"]}
    assert block0["block load"] == pytest.approx(result["blocks"]["transfer"][0]["load_s"])
    rank = {kind: (start, length) for start, length, kind in rows["stage 2 rank 0"]}
    assert rank["stage-2 build"][0] == pytest.approx(stages[3][0]) and rank["stage-2 training"][1] == \
        pytest.approx(result["finetune"]["ranks"][0]["train_s"])
    copy = tmp_path / "run.json"
    copy.write_text(path.read_text())
    assert main(["timeline", "--run-json", str(copy)]) == 0 and (tmp_path / "run.png").stat().st_size > 10_000


@pytest.mark.parametrize("gpus, with_transfer, ready, trained, expected", [
    (4, True, [True, False, False], [False, False, False], True),    # collect under way, blocks to train
    (0, True, [True, False, False], [False, False, False], False),   # CPU: the torch path compiles nothing
    (1, True, [True, False, False], [False, False, False], False),   # one GPU: blocks in turn, the first compiles
    (4, True, [True, True, True], [False, False, False], False),     # resumed after collect: only a delay
    (4, False, [False, False, False], [False, False, False], False),  # --until collect
    (4, True, [True, False, False], [True, True, False], False),     # one block left: it compiles its own
])
def test_kernel_warm_up_only_where_it_overlaps_collect(gpus, with_transfer, ready, trained, expected):
    from pipeline.run import needs_kernel_warm_up

    assert needs_kernel_warm_up(gpus, with_transfer, ready, trained) is expected


def test_kernel_warm_up_runs_before_every_block(ray_local, tiny_config, tmp_path, monkeypatch):
    """The driver's warm-up wiring, forced on the CPU (it runs there only in this test): one task runs a
    converted layer's evaluation and micro-step at the run's shapes, and no block is submitted before the driver
    has its result. The driver is made to see the warm-up finish only 8 s after submitting it, later than the
    first boundary is ready, so blocks that did not wait for it would be submitted before."""
    from cluster import blocks as ray_blocks
    from pipeline import run as run_module

    events, submitted = [], {}
    submit, wait_any = ray_blocks.submit, ray_blocks.wait_any

    def recording_submit(fn, kwargs, spec, name, **options):
        ref = submit(fn, kwargs, spec, name, **options)
        submitted[ref] = (name, time.monotonic())
        events.append(f"submit {name}")
        return ref

    def late_warm_up(refs, timeout=None):
        while True:
            done = [ref for ref in wait_any(refs, timeout) if
                    submitted[ref][0] != "warm-up" or time.monotonic() - submitted[ref][1] > 8]
            if done:
                events.extend(f"done {submitted[ref][0]}" for ref in done)
                return done
            time.sleep(0.2)

    monkeypatch.setattr(run_module, "needs_kernel_warm_up", lambda *args: True)
    monkeypatch.setattr(ray_blocks, "submit", recording_submit)
    monkeypatch.setattr(ray_blocks, "wait_any", late_warm_up)
    run = run_pipeline(tiny_config, str(tmp_path / "run"), until="transfer", shard_bytes=SHARD_BYTES)
    summary = json.loads((Path(run.url) / "blocks" / "summary.json").read_text())
    warm = summary["warm_up"]
    assert warm["status"] == "ok" and warm["layer"] == 0 and warm["batch_shapes"] and warm["seconds"] > 0
    assert events[0] == "submit warm-up" and "done collect-L000" in events
    transfers = [i for i, event in enumerate(events) if event.startswith("submit transfer")]
    assert len(transfers) == 2 and min(transfers) > events.index("done warm-up")
    from pipeline.bench_scale import summarize  # the scale proof's JSON carries it

    assert summarize(Path(run.url))["blocks"]["warm_up"] == warm


@pytest.mark.parametrize("checkpointing, warned", [(False, True), (True, False)])
def test_plan_warns_when_stage_2_would_not_fit_without_gradient_checkpointing(checkpointing, warned, capsys):
    """70B on 2 x 141 GB: a stage-2 rank needs ~200 GB without recomputation (planner.lora_plan), so the plan
    stage says to set finetune.gradient_checkpointing, an hour before stage 2 would run out of memory."""
    from pipeline.config import resolve_run_config
    from pipeline.run import plan_run

    config = resolve_run_config({
        "model": "llama3.1-70b", "recipe": "lolcats",
        "cluster": {"name": "h200", "address": "local", "num_gpus": 2, "gpu_memory": "141GB",
                    "host_memory": "240GB", "disk": "120GB"},
        "transfer": {"train_tokens": "16K", "layers_per_block": 40},
        "finetune": {"train_tokens": "16K", "zero_stage": 3, "gradient_checkpointing": checkpointing}})
    plan_run(config)
    out = capsys.readouterr().out
    assert ("set finetune.gradient_checkpointing: true" in out) == warned
    assert "even with gradient checkpointing" not in out
