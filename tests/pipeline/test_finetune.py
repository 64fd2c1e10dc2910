"""Stage 2 (LoRA with DeepSpeed in Ray workers) on a tiny model: ZeRO-2/3 with one and two workers, the
adapter it leaves, kill-and-resume (same and different worker count, and a LINEARIZE_FAULT killing rank 1)
ending where an undisturbed run ends, and the ZeRO-3 model built partitioned yet equal to load_model's (random
weights: each rank generating only its own partitions, for one, two and three workers).

One Ray instance and one group of worker actors per world size are shared by the whole module: actor
start-up (importing torch, transformers, peft, deepspeed) dominates the cost of these tests.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from blocks.lora import (  # noqa: E402
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, add_lora, load_adapter_files, lora_parameters, teacher_view)
from cluster.deepspeed_worker import DeepSpeedWorkerGroup, WorkerGroupError  # noqa: E402
from pipeline import finetune  # noqa: E402
from pipeline.finetune import (  # noqa: E402
    ADAPTER_DIR, LATEST, RESULT, STITCHED_META, VALIDATION_DATA, finetune_faults, latest_checkpoint, load_stitched,
    run_finetune)
from pipeline.stages import FAULT_ENV, Fault, parse_faults, read_run_config  # noqa: E402
from tests.pipeline.tiny_run import make_model_dir, make_tiny_run  # noqa: E402

TRAIN_ROWS = 24  # 6 optimizer steps of 4 rows with two workers (micro 1 x accumulation 2 x 2)
FINETUNE = {"lr": 3e-2, "eval_every": 2, "checkpoint_every": 3}
ENV = {"PYTHONPATH": str(finetune.PROJECT_ROOT)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def groups(ray_local):
    """Live worker groups by world size, recreated when a test killed one (half a CPU each: 3 fit in 2)."""
    live: dict[int, DeepSpeedWorkerGroup] = {}

    def get(world_size: int) -> DeepSpeedWorkerGroup:
        if world_size not in live or not live[world_size].alive:
            live[world_size] = DeepSpeedWorkerGroup(world_size, cpus_per_worker=0.5, env=ENV)
        return live[world_size]

    yield get
    for group in live.values():
        if group.alive:
            group.shutdown()


def _run(tmp_path_factory, model_dir, zero_stage, name):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    return make_tiny_run(str(run_dir), model_dir, zero_stage=zero_stage, train_rows=TRAIN_ROWS, finetune=FINETUNE)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, model_dir, groups):
    """Uninterrupted two-worker runs for ZeRO-2 and ZeRO-3: the references of the resume tests."""
    results = {}
    for stage in (2, 3):
        run = _run(tmp_path_factory, model_dir, stage, f"undisturbed-z{stage}")
        results[stage] = (run, run_finetune(run.url, workers=groups(2), max_restarts=0, return_weights=True))
    return results


def _check_trained(run, result, world_size):
    history = result["history"]
    assert result["world_size"] == world_size
    assert [h["step"] for h in history] == list(range(0, result["steps"] + 1))
    initial, final = history[0]["eval_loss"], history[-1]["eval_loss"]
    assert final < initial - 0.5, f"eval loss did not decrease: {initial:.3f} -> {final:.3f}"
    weights = result["rank_weights"]
    assert len(weights) == world_size
    for name, tensor in weights[0].items():
        assert tensor.abs().sum() > 0
        for other in weights[1:]:
            assert torch.equal(other[name], tensor), f"{name} differs between ranks"
    assert run.exists(RESULT) and run.exists(f"{ADAPTER_DIR}/{ADAPTER_CONFIG}")
    # Every rank's cost of the (last) attempt, in the result and in result.json.
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world_size))
    for r in ranks:
        assert r["peak_gpu_bytes"] is None and r["peak_host_bytes"] > 0  # CPU workers
        assert 0 < r["build_s"] <= r["init_s"] < r["wall_s"] and 0 < r["train_s"] < r["wall_s"]
        assert r["steps_run"] == result["steps"] - r["resumed_from_step"] and r["tokens_per_s"] > 0
    assert run.read_json(RESULT)["ranks"] == ranks


def _adapter_validation_loss(run, rows_run) -> float:
    """Next-token loss of run's stitched model + its adapter on rows_run's validation rows (as stage 2 evaluates)."""
    files = {name: run.read_bytes(f"{ADAPTER_DIR}/{name}") for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    model = load_adapter_files(load_stitched(run).model, files).eval()
    rows = finetune._read_rows(rows_run, VALIDATION_DATA)
    with torch.no_grad():
        return sum(model(input_ids=row[None], labels=row[None]).loss.item() for row in rows) / len(rows)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_workers_train_equal_lora_and_best_adapter(undisturbed, zero_stage):
    run, result = undisturbed[zero_stage]
    _check_trained(run, result, world_size=2)
    # The adapter is the best-eval LoRA in PEFT format: the stitched model plus it reproduces that eval loss.
    assert math.isclose(_adapter_validation_loss(run, run), result["best"]["loss"], rel_tol=1e-5)
    assert result["best"]["loss"] == min(h["eval_loss"] for h in result["history"] if "eval_loss" in h)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_one_worker_trains(tmp_path_factory, model_dir, groups, zero_stage):
    run = _run(tmp_path_factory, model_dir, zero_stage, f"one-worker-z{zero_stage}")
    result = run_finetune(run.url, workers=groups(1), max_restarts=0, return_weights=True)
    _check_trained(run, result, world_size=1)
    assert result["steps"] == TRAIN_ROWS // 2


def test_zero3_with_gradient_checkpointing_trains_like_without(tmp_path_factory, model_dir, groups, undisturbed):
    """finetune.gradient_checkpointing (the 70B setting) changes memory, not the math: same losses and LoRA as the
    undisturbed ZeRO-3 run up to float reordering in the recompute."""
    run_dir = tmp_path_factory.mktemp("gradient-checkpointing") / "run"
    run = make_tiny_run(str(run_dir), model_dir, zero_stage=3, train_rows=TRAIN_ROWS,
                        finetune=dict(FINETUNE, gradient_checkpointing=True))
    result = run_finetune(run.url, workers=groups(2), max_restarts=0, return_weights=True)
    _, reference = undisturbed[3]
    for ours, theirs in zip(result["history"], reference["history"], strict=True):
        for key in ("train_loss", "eval_loss"):
            if key in theirs:
                assert math.isclose(ours[key], theirs[key], rel_tol=1e-4), (ours, theirs)
    for name, tensor in reference["final_weights"].items():
        torch.testing.assert_close(result["final_weights"][name], tensor, rtol=1e-3, atol=1e-5)


def _assert_same_training(run, result, reference_run, reference):
    """A disturbed run ended exactly where the undisturbed one did: history, final weights, adapter bytes."""
    assert [h["step"] for h in result["history"]] == [h["step"] for h in reference["history"]]
    for ours, theirs in zip(result["history"], reference["history"]):
        assert ours.get("eval_loss") == theirs.get("eval_loss")
        assert ours.get("train_loss") == theirs.get("train_loss")
    for name, tensor in reference["final_weights"].items():
        assert torch.equal(result["final_weights"][name], tensor), name
    assert reference_run.read_bytes(f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}") == run.read_bytes(
        f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}")


def test_killed_worker_restarts_from_checkpoint_and_matches(tmp_path_factory, model_dir, groups, undisturbed):
    """Rank 0 is SIGKILLed after step 4; the driver restarts a fresh group from the step-3 checkpoint."""
    reference_run, reference = undisturbed[2]
    run = _run(tmp_path_factory, model_dir, 2, "killed-same-count")
    group = groups(2)
    result = run_finetune(run.url, workers=group, kill_at_step=4, max_restarts=1, return_weights=True)
    assert not group.alive  # the first group died with its rank 0
    _assert_same_training(run, result, reference_run, reference)


def test_rank_killed_by_linearize_fault_restarts_from_checkpoint_and_matches(
        tmp_path_factory, model_dir, groups, undisturbed, monkeypatch):
    """ZeRO-3, two workers: LINEARIZE_FAULT kills rank 1 after step 5; the driver restarts from the step-3
    checkpoint and the fault, already fired (its marker), does not fire again. Same result as undisturbed."""
    reference_run, reference = undisturbed[3]
    run = _run(tmp_path_factory, model_dir, 3, "fault-rank1")
    monkeypatch.setenv(FAULT_ENV, "transfer:block=0:exit_after=1;finetune:exit_after=5:rank=1")
    group = groups(2)
    result = run_finetune(run.url, workers=group, max_restarts=1, return_weights=True)
    assert not group.alive  # the first group died with its rank 1
    assert run.exists("faults/finetune-rank1-5.fired")
    assert result["ranks"][0]["resumed_from_step"] == 3
    _assert_same_training(run, result, reference_run, reference)


def test_finetune_fault_specs():
    spec = "transfer:block=1:exit_after=5;finetune:exit_after=10:rank=1;finetune:exit_after=3"
    assert finetune_faults(spec) == (Fault("finetune", exit_after=10, rank=1), Fault("finetune", exit_after=3))
    assert [f.stage for f in parse_faults(spec)] == ["transfer", "finetune", "finetune"]  # one parser for all
    assert finetune_faults(None) == ()
    for bad in ("finetune:rank=1", "finetune:exit_after=2:block=1", "finetune:exit_after=x", "transfer:rank=1"):
        with pytest.raises(ValueError, match=FAULT_ENV):
            parse_faults(bad)


def test_zero3_first_eval_matches_zero2(undisturbed):
    """Step 0's eval (LoRA B = 0: the stitched model itself) is the same whether the model was built whole
    (ZeRO-2) or partitioned under zero.Init (ZeRO-3)."""
    zero2, zero3 = (undisturbed[stage][1]["history"][0]["eval_loss"] for stage in (2, 3))
    assert math.isclose(zero2, zero3, rel_tol=1e-6), (zero2, zero3)


def _random_weights(run, tied=True):
    """Point the run at deterministic random weights (the 70B preset's path), with tied embeddings or not."""
    meta = run.read_json(STITCHED_META)
    meta["model"]["weights"] = "random"
    meta["model"]["hf_config"]["tie_word_embeddings"] = tied
    run.write_json(STITCHED_META, meta)
    return run


@pytest.mark.parametrize("weights", ["directory", "random"])
def test_zero3_build_is_partitioned_and_equal_to_load_model(tmp_path_factory, model_dir, groups, weights):
    run = _run(tmp_path_factory, model_dir, 3, f"partitioned-{weights}")
    if weights == "random":
        _random_weights(run)

    def build(run_url):  # runs on every rank (pickled by value: a nested function)
        import deepspeed
        from pipeline.finetune import load_stitched_partitioned
        from pipeline.rundir import RunDir

        ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
        model = load_stitched_partitioned(RunDir(run_url), ds_config, torch.float32, torch.device("cpu")).model
        held, full = {}, {}
        for name, param in model.named_parameters():
            if hasattr(param, "ds_id"):
                held[name] = (param.data.numel(), param.ds_tensor.numel(), param.ds_numel)
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full[name] = param.detach().clone()
        return held, full, model.lm_head.weight is model.model.embed_tokens.weight

    results = groups(2).run(build, run.url)
    reference = load_stitched(run).model
    expected = dict(reference.named_parameters())
    for held, full, tied in results:
        assert tied == (weights == "random")
        # Each rank holds half of every base-model tensor (rounded up), and nothing materialised beside it.
        assert set(held) == {name for name in expected if ".feature_map_" not in name and "window_logit" not in name}
        for name, (materialised, local, numel) in held.items():
            assert materialised == 0 and local == math.ceil(numel / 2), (name, materialised, local, numel)
        assert set(full) == set(expected)
        for name, tensor in full.items():
            assert torch.equal(tensor, expected[name].detach()), name


SMALL_CHUNK = 100
"""RANDOM_CHUNK for the test below: it divides no partition boundary of the tiny model (ZeRO-3 partitions of
1024, 2048, 4096, 1366, 2731 ... elements), so every rank's partition starts and ends inside a piece."""


@pytest.mark.parametrize("world_size, tied", [(1, True), (2, True), (2, False), (3, True)])
def test_zero3_random_build_fills_each_partition_locally_and_equals_load_model(
        tmp_path_factory, model_dir, groups, monkeypatch, world_size, tied):
    """Random weights under ZeRO-3: every rank writes only its own partition of each tensor (random_value_range
    into param.ds_tensor, no full tensor, no gather), with pieces of 100 elements cut by the partition
    boundaries and 3 ranks leaving padding; gathered, every parameter is bit-identical to load_model's."""
    run = _random_weights(_run(tmp_path_factory, model_dir, 3, f"local-partitions-{world_size}-{tied}"), tied)

    def build(run_url, chunk):  # runs on every rank (pickled by value: a nested function)
        import deepspeed
        import pipeline.models as models
        from pipeline import finetune
        from pipeline.rundir import RunDir

        ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
        default_chunk, models.RANDOM_CHUNK = models.RANDOM_CHUNK, chunk
        try:  # the actors are shared by the module: restore the piece size for the next test
            model = finetune.load_stitched_partitioned(RunDir(run_url), ds_config, torch.float32,
                                                       torch.device("cpu")).model
        finally:
            models.RANDOM_CHUNK = default_chunk
        local, full = {}, {}
        for name, param in model.named_parameters():
            if hasattr(param, "ds_id"):
                local[name] = (param.data.numel(), param.ds_tensor.numel(), param.ds_numel,
                               finetune._partition_is_writable(param))
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full[name] = param.detach().clone()
        return local, full, model.lm_head.weight is model.model.embed_tokens.weight

    if world_size == 3:  # its own group, beside the module's groups of 1 and 2 (0.5 CPU each): 1.5 of 2 CPUs taken
        group = DeepSpeedWorkerGroup(3, cpus_per_worker=0.1, env=ENV)
        try:
            results = group.run(build, run.url, SMALL_CHUNK)
        finally:
            group.shutdown()
    else:
        results = groups(world_size).run(build, run.url, SMALL_CHUNK)
    from pipeline import models
    monkeypatch.setattr(models, "RANDOM_CHUNK", SMALL_CHUNK)
    expected = {name: param.detach() for name, param in load_stitched(run).model.named_parameters()}
    assert not torch.equal(expected["model.embed_tokens.weight"].view(-1)[:SMALL_CHUNK],
                           expected["model.embed_tokens.weight"].view(-1)[SMALL_CHUNK:2 * SMALL_CHUNK])
    assert len(results) == world_size
    for local, full, is_tied in results:
        assert is_tied == tied
        assert "lm_head.weight" in local or tied  # a tied lm_head is the embedding's parameter, filled once
        for name, (materialised, held, numel, writable) in local.items():
            # The local path was taken: a plain partition of ceil(numel / world_size), nothing materialised.
            assert writable and materialised == 0 and held == math.ceil(numel / world_size), (name, held, numel)
        assert set(full) == set(expected)
        for name, tensor in full.items():
            assert torch.equal(tensor, expected[name]), name


def test_resume_with_a_different_worker_count(tmp_path_factory, model_dir, groups, undisturbed):
    """ZeRO-3 on two workers killed after step 4; resumed on ONE worker (accumulation 4 instead of 2)."""
    _, reference = undisturbed[3]
    run = _run(tmp_path_factory, model_dir, 3, "killed-other-count")
    with pytest.raises(WorkerGroupError, match="rank 0"):
        run_finetune(run.url, workers=groups(2), kill_at_step=4, max_restarts=0)
    checkpoint = latest_checkpoint(run)
    assert checkpoint["step"] == 3 and checkpoint["world_size"] == 2 and not run.exists(RESULT)
    assert run.read_json(LATEST)["dir"].endswith("step-000003")
    # The checkpoint keeps each rank's pace, so the scale proof can report a run stopped mid-stage.
    from pipeline.bench_scale import summarize

    partial = summarize(Path(run.url))["finetune"]
    assert partial["partial"] and partial["step"] == 3 and partial["steps_run"] == 3 and partial["steps"] == 6
    assert [r["rank"] for r in partial["ranks"]] == [0, 1] and all(r["tokens_per_s"] > 0 for r in partial["ranks"])

    result = run_finetune(run.url, workers=groups(1), max_restarts=0, return_weights=True)
    assert result["world_size"] == 1
    assert [h["step"] for h in result["history"]] == [h["step"] for h in reference["history"]]
    # Same rows, same order, same optimizer state: only the float summation order differs.
    for ours, theirs in zip(result["history"], reference["history"]):
        if "eval_loss" in theirs:
            assert math.isclose(ours["eval_loss"], theirs["eval_loss"], rel_tol=1e-5)
    for name, tensor in reference["final_weights"].items():
        torch.testing.assert_close(result["final_weights"][name], tensor, rtol=1e-5, atol=1e-6)


def test_plan_fixes_the_global_batch_and_resume_needs_a_dividing_worker_count(tmp_path_factory, model_dir):
    run = _run(tmp_path_factory, model_dir, 2, "plan")
    config = finetune.read_run_config(run)
    plan = finetune.make_plan(config, world_size=2)
    assert plan["global_batch"] == 4 and plan["total_steps"] == TRAIN_ROWS // 4
    assert [finetune.accumulation_steps(4, 1, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match=r"resume with one of \[1, 2, 4\] workers"):
        finetune.accumulation_steps(4, 1, 3)
    with pytest.raises(ValueError, match="train_tokens"):
        finetune.make_plan(config, world_size=64)


def test_distillation_loss_is_the_token_mean_kl_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    for rows in (1, 2, 3):
        kl = finetune.distillation_token_kl(student, teacher, rows_per_chunk=rows)
        torch.testing.assert_close(kl.mean(), expected)
    assert finetune.distillation_token_kl(teacher, teacher).abs().max() < 1e-6
    with pytest.raises(ValueError, match="differs from the student"):
        finetune.distillation_token_kl(student, teacher[:, :4])


def _kl_to_teacher(run, weights: dict | None, rows: torch.Tensor | None = None) -> float:
    """KL(original || converted + LoRA) over `rows` (default: the run's training rows); weights=None: LoRA zero."""
    model = add_lora(load_stitched(run).model, LoraSettings(r=4, alpha=8)).eval()
    if weights is not None:
        with torch.no_grad():
            for name, param in lora_parameters(model).items():
                param.copy_(weights[name])
    rows = finetune._read_rows(run, finetune.TRAIN_DATA) if rows is None else rows
    with torch.no_grad():
        with teacher_view(model):
            teacher = model(input_ids=rows).logits
        return finetune.distillation_token_kl(model(input_ids=rows).logits, teacher).mean().item()


def test_distill_objective_under_zero3_pulls_the_model_toward_its_teacher(tmp_path_factory, model_dir, groups,
                                                                         undisturbed):
    """finetune.objective=distill on two ZeRO-3 ranks (the teacher view gathers partitioned weights): the KL to the
    original model falls on the rows it trained on (and rises under next-token training); the eval loss is that KL."""
    run_dir = tmp_path_factory.mktemp("distill") / "run"
    run = make_tiny_run(str(run_dir), model_dir, zero_stage=3, train_rows=TRAIN_ROWS,
                        finetune=dict(FINETUNE, objective="distill"))
    assert read_run_config(run).finetune.objective == "distill"
    result = run_finetune(run.url, workers=groups(2), max_restarts=0, return_weights=True)
    assert result["objective"] == "distill"
    before, after = _kl_to_teacher(run, None), _kl_to_teacher(run, result["final_weights"])
    # The first step's train loss is this KL with the LoRA still at zero, but on that step's 4 rows, not all 24:
    # the same quantity up to which rows (a sanity check that train_loss is the KL, hence the loose tolerance).
    assert math.isclose(result["history"][1]["train_loss"], before, rel_tol=0.5)
    # The eval loss (which picks the best adapter) is the same KL on the validation rows: at step 0, LoRA zero.
    validation = finetune._read_rows(run, VALIDATION_DATA)
    assert math.isclose(result["history"][0]["eval_loss"], _kl_to_teacher(run, None, validation), rel_tol=1e-4)
    # Same stitched model and rows trained on the next-token objective: the rows' narrow token set pulls the model
    # away from the original (KL 0.97 -> 2.69 when written), where distillation pulls it closer (0.97 -> 0.86).
    next_token_run, next_token = undisturbed[3]
    moved_away = _kl_to_teacher(next_token_run, next_token["final_weights"])
    assert after < 0.95 * before < moved_away, (before, after, moved_away)


def test_mixed_objective_is_the_weighted_sum_and_stays_nearer_the_teacher(tmp_path_factory, model_dir, groups,
                                                                         undisturbed):
    """finetune.objective=mixed (one ZeRO-2 rank): the eval loss is (1 - w) * next-token CE + w * KL over the
    positions that have a next token, it falls with training, and the KL term keeps the trained model nearer the
    original than next-token training alone leaves it (same stitched model, rows and steps)."""
    weight = 0.75
    run_dir = tmp_path_factory.mktemp("mixed") / "run"
    run = make_tiny_run(str(run_dir), model_dir, zero_stage=2, train_rows=TRAIN_ROWS,
                        finetune=dict(FINETUNE, objective="mixed", distill_weight=weight))
    result = run_finetune(run.url, workers=groups(2), max_restarts=0, return_weights=True)
    assert result["objective"] == "mixed"
    rows = finetune._read_rows(run, VALIDATION_DATA)
    model = add_lora(load_stitched(run).model, LoraSettings(r=4, alpha=8)).eval()
    with torch.no_grad():
        with teacher_view(model):
            teacher = model(input_ids=rows).logits
        student = model(input_ids=rows).logits
    cross_entropy = torch.nn.functional.cross_entropy(student[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
    kl = finetune.distillation_token_kl(student[:, :-1], teacher[:, :-1]).mean()
    history = result["history"]
    assert math.isclose(history[0]["eval_loss"], (1 - weight) * cross_entropy.item() + weight * kl.item(),
                        rel_tol=1e-4)
    assert history[-1]["eval_loss"] < history[0]["eval_loss"] - 0.1
    next_token_run, next_token = undisturbed[3]
    assert _kl_to_teacher(run, result["final_weights"]) < _kl_to_teacher(next_token_run, next_token["final_weights"])


def test_finetune_mix_writes_the_weighted_adapter_of_runs_on_the_same_stitched_model(tmp_path, undisturbed):
    """`linearize finetune RUN --mix A B --weights 0.25 0.75` with A = B: the adapter reproduces A's best eval loss
    (0.25 + 0.75 = 1) at twice A's rank; a source stitched differently is refused."""
    import argparse
    import shutil

    from pipeline.rundir import RunDir

    source, result = undisturbed[2]
    run = RunDir(str(tmp_path / "mix"))
    for rel in ("run.yaml", finetune.STITCHED_META, finetune.STITCHED_WEIGHTS):
        run.write_bytes(rel, source.read_bytes(rel))
    args = argparse.Namespace(run=run.url, mix=[source.url, source.url], weights=[0.25, 0.75])
    assert finetune.main(args) == 0
    mixed = run.read_json(RESULT)
    assert run.is_done("finetune") and mixed["objective"] == "mix"
    trained = [entry["tokens"] for entry in result["history"] if "tokens" in entry][-1]
    # The blend's budget: the same run named twice trained once.
    assert mixed["source_tokens"] == [trained, trained] and mixed["tokens"] == trained > 0
    assert math.isclose(_adapter_validation_loss(run, source), result["best"]["loss"], rel_tol=1e-5)

    twin = RunDir(str(tmp_path / "twin"))  # another run of the same training: two runs' tokens
    shutil.copytree(source.root, twin.root)
    assert finetune.write_mixed_adapter(run.url, [source.url, twin.url], [0.5, 0.5])["tokens"] == 2 * trained

    other = RunDir(str(tmp_path / "other"))
    shutil.copytree(source.root, other.root)
    stitched = load_safetensors(other.read_bytes(finetune.STITCHED_WEIGHTS))
    stitched = {name: tensor + 1.0 for name, tensor in stitched.items()}
    other.write_bytes(finetune.STITCHED_WEIGHTS, save_safetensors(stitched))
    with pytest.raises(ValueError, match="stitched state differs"):
        finetune.write_mixed_adapter(run.url, [source.url, other.url], [0.5, 0.5])
    with pytest.raises(SystemExit, match="one weight per source"):
        finetune.main(argparse.Namespace(run=run.url, mix=[source.url], weights=None))


@pytest.mark.parametrize("written, expected", [(None, "float32"), ("model", "model"), ("float32", "float32")])
def test_stitched_state_keeps_the_feature_dtype_it_was_trained_with(tmp_path, written, expected):
    """A stitched.json from before attention.feature_dtype existed was trained with fp32 features (the default then),
    so stage 2 and eval keep fp32 for it although the default is now 'model'."""
    from safetensors.torch import save

    from pipeline.rundir import RunDir

    attention = {"window_size": 64, "window_kind": "terrace", "feature_dim": 8, "gamma_init": 0.1}
    if written is not None:
        attention["feature_dtype"] = written
    model = {"name": "tiny", "hf_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "intermediate_size": 32, "vocab_size": 64}}
    run = RunDir(str(tmp_path))
    run.write_json(finetune.STITCHED_META, {"model": model, "attention": attention})
    run.write_bytes(finetune.STITCHED_WEIGHTS, save({"layers.0.window_logit": torch.zeros(2)}))
    *_, settings = finetune.read_stitched(run)
    assert settings.feature_dtype == expected
