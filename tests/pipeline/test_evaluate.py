"""`linearize eval` (pipeline/evaluate.py): the gate's verdicts, the linear-mass diagnostic, and one whole
evaluation of a tiny run directory (teacher, SWA+sinks, after stage 1) writing results.json and the plot."""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from blocks.convert import AttentionSettings, convert_model, hybrid_modules
from pipeline.config import ConfigError, EvalConfig, resolve_run_config
from pipeline.evaluate import (add_arguments, combine, combine_main, evaluate, evaluate_run, gate,
                               linear_mass_by_layer, main as eval_main, perplexity, report)
from pipeline.rundir import RunDir
from tests.conftest import tiny_llama_config
from tests.pipeline.tiny_run import make_model_dir, make_tiny_run, write_random_adapter


def model_result(ppl, buckets, acc=None, passkey=None, hybrid=False, tokens=None):
    out = {"held_out": {"perplexity": ppl, "by_position": buckets}, "hybrid": hybrid}
    if tokens is not None:
        out["training_tokens"] = tokens
    if acc is not None:
        out["zero_shot"] = {"piqa": {"value": acc}, "average": {"avg5": acc}}
    if passkey is not None:
        out["passkey"] = {"512": {"accuracy": passkey}}
    return out


def test_gate_passes_a_model_close_to_the_teacher_and_better_than_swa():
    results = {"models": {
        "teacher": model_result(10.0, {"0-64": 20.0, "1024-2048": 8.0}, acc=0.70, passkey=1.0),
        "swa64+4sinks": model_result(12.0, {"0-64": 20.0, "1024-2048": 10.0}, acc=0.66, passkey=0.2),
        "stage2": model_result(10.3, {"0-64": 20.0, "1024-2048": 8.5}, acc=0.695, passkey=0.4, hybrid=True,
                               tokens={"stage1": 20_000_000, "stage2": 20_000_000})}}
    verdict = gate(results, EvalConfig())
    assert verdict["model"] == "stage2" and verdict["passed"], verdict
    names = [c["check"] for c in verdict["checks"]]
    assert "perplexity / teacher" in names and "perplexity 1024-2048 / teacher" in names
    assert "training tokens (stage 1 + stage 2)" in names
    # Results that do not record the tokens (older ones, an exported directory) skip that check, as does no limit.
    for tokens, limit in (({"stage1": 20_000_000, "stage2": None}, 40_000_000), (None, 40_000_000),
                          ({"stage1": 1, "stage2": 1}, None)):
        results["models"]["stage2"].pop("training_tokens", None)
        if tokens is not None:
            results["models"]["stage2"]["training_tokens"] = tokens
        names = [c["check"] for c in gate(results, EvalConfig(max_training_tokens=limit))["checks"]]
        assert "training tokens (stage 1 + stage 2)" not in names
    assert "piqa >= SWA+sinks" in names and "passkey 512 >= SWA+sinks" in names


@pytest.mark.parametrize("change, failing", [
    ({"ppl": 10.6}, "perplexity / teacher"),                      # 1.06x the teacher
    ({"late": 8.7}, "perplexity 1024-2048 / teacher"),            # 1.0875x at the last bucket
    ({"acc": 0.685}, "zero-shot mean: points below teacher"),     # 1.5 points below
    ({"passkey": 0.1}, "passkey 512 >= SWA+sinks"),
    ({"stage2": 40_000_000}, "training tokens (stage 1 + stage 2)"),  # a blend of two 20M stage 2s: 60M
])
def test_gate_names_the_failing_check(change, failing):
    final = model_result(change.get("ppl", 10.3), {"0-64": 20.0, "1024-2048": change.get("late", 8.5)},
                         acc=change.get("acc", 0.695), passkey=change.get("passkey", 0.4), hybrid=True,
                         tokens={"stage1": 20_000_000, "stage2": change.get("stage2", 20_000_000)})
    results = {"models": {
        "teacher": model_result(10.0, {"0-64": 20.0, "1024-2048": 8.0}, acc=0.70, passkey=1.0),
        "swa64+4sinks": model_result(12.0, {"0-64": 20.0, "1024-2048": 10.0}, acc=0.66, passkey=0.2),
        "stage1": final}}
    verdict = gate(results, EvalConfig())
    assert verdict["passed"] is False
    assert [c["check"] for c in verdict["checks"] if not c["passed"]] == [failing]


def test_gate_says_how_far_each_zero_shot_gap_is_from_the_noise():
    """The verdict stays the plain comparison; the note gives the difference and its standard error."""
    results = {"models": {
        "teacher": model_result(10.0, {"0-64": 20.0}, acc=0.70),
        "swa64+4sinks": model_result(12.0, {"0-64": 20.0}, acc=0.67),
        "stage2": model_result(10.3, {"0-64": 20.0}, acc=0.662, hybrid=True)}}
    results["models"]["swa64+4sinks"]["zero_shot"]["piqa"]["stderr"] = 0.021
    results["models"]["stage2"]["zero_shot"]["piqa"]["stderr"] = 0.020
    piqa = next(c for c in gate(results, EvalConfig())["checks"] if c["check"] == "piqa >= SWA+sinks")
    assert piqa["passed"] is False
    assert piqa["note"] == "-0.8 points, standard error of the difference 2.9"
    results["gate"] = {"model": "stage2", "passed": False, "checks": [piqa]}
    assert "(limit 0.67; -0.8 points, standard error of the difference 2.9)" in report(results)

    # With per-item outcomes on both sides the note adds the paired figure and the items that split them.
    results["models"]["swa64+4sinks"]["zero_shot"]["piqa"]["correct"] = "1100"
    results["models"]["stage2"]["zero_shot"]["piqa"]["correct"] = "1010"
    piqa = next(c for c in gate(results, EvalConfig())["checks"] if c["check"] == "piqa >= SWA+sinks")
    assert piqa["note"] == ("-0.8 points, standard error of the difference 2.9; paired over the same items 40.8 "
                            "(1 right here only, 1 for SWA+sinks only)")


def test_gate_without_a_converted_model_says_so():
    verdict = gate({"models": {"teacher": model_result(10.0, {})}}, EvalConfig())
    assert verdict["passed"] is None and "converted" in verdict["note"]


def test_eval_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"eval.tasks: \['mmlu5'\] unknown"):
        resolve_run_config({"model": "smollm2-135m", "eval": {"tasks": ["piqa", "mmlu5"]}})
    with pytest.raises(ConfigError, match="eval.passkey_lengths"):
        EvalConfig(passkey_lengths=[32])
    with pytest.raises(ConfigError, match="eval.mmlu_limit"):
        EvalConfig(mmlu_limit=0)
    with pytest.raises(ConfigError, match="eval.max_training_tokens: must be positive or null"):
        EvalConfig(max_training_tokens=0)


def converted_tiny_model(gamma: float):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=2)).eval()
    convert_model(model, AttentionSettings(window_size=8, window_kind="terrace", feature_dim=8, gamma_init=gamma))
    return model


def test_linear_mass_is_a_share_and_falls_as_the_window_weight_grows():
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    small, large = (linear_mass_by_layer(converted_tiny_model(g), ids, batch_size=2) for g in (0.05, 0.95))
    assert sorted(small) == sorted(large) == [0, 1]
    for layer in (0, 1):
        assert 0.0 < large[layer]["linear_share"] < small[layer]["linear_share"] < 1.0
        assert small[layer]["min_head_share"] <= small[layer]["linear_share"]
    # Sequences inside the terrace window (<= 16 tokens here) have no linear part anywhere: no entry.
    assert linear_mass_by_layer(converted_tiny_model(0.5), ids[:, :16]) == {}
    # The hooks are gone afterwards.
    assert all(not m._forward_pre_hooks for m in hybrid_modules(converted_tiny_model(0.5)).values())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    return make_tiny_run(str(base / "run"), make_model_dir(base / "model"))


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_settings_passkey_prompt_and_item_limits():
    from pipeline.evaluate import _settings_from_args

    assert _settings_from_args(eval_args("run"), EvalConfig()).passkey_aligned is True
    assert _settings_from_args(eval_args("run", "--passkey-unaligned"), EvalConfig()).passkey_aligned is False
    every = _settings_from_args(eval_args("run", "--limit", "all", "--mmlu-limit", "all"), EvalConfig())
    assert every.task_limit is None and every.mmlu_limit is None
    some = _settings_from_args(eval_args("run", "--limit", "300"), EvalConfig())
    assert some.task_limit == 300 and some.mmlu_limit == EvalConfig().mmlu_limit
    with pytest.raises(SystemExit):
        eval_args("run", "--limit", "most")
    with pytest.raises(ConfigError, match="task_limit"):
        _settings_from_args(eval_args("run", "--limit", "0"), EvalConfig())
    assert _settings_from_args(eval_args("run", "--stages", "stage2"), EvalConfig()).stages == ["stage2"]
    with pytest.raises(ConfigError, match="eval.stages"):
        _settings_from_args(eval_args("run", "--stages", "stage3"), EvalConfig())


def test_evaluate_a_run_directory_end_to_end(tiny_run, tmp_path, capsys):
    """Teacher, SWA+sinks and the stitched model on the same held-out rows (the tiny model has no Brown
    tokenizer fixture, so zero-shot and passkey are off here: their own tests cover them); the files and the gate."""
    code = eval_main(eval_args(tiny_run.url, "--out", str(tmp_path / "out"), "--seq-len", "80", "--sequences", "3",
                               "--tasks", "none", "--passkey-lengths", "none", "--batch-size", "2", "--device", "cpu"))
    assert code == 0  # the gate fails here, but only --strict turns that into the exit status
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "swa64+4sinks", "stage1"]
    teacher, swa, stage1 = (results["models"][k]["held_out"] for k in results["models"])
    assert teacher["tokens"] == swa["tokens"] == stage1["tokens"] == 3 * 79
    # SWA 64 + sinks sees every key up to position 63: it equals the teacher there and differs after.
    assert swa["by_position"]["0-64"] == pytest.approx(teacher["by_position"]["0-64"], rel=1e-5)
    assert swa["by_position"]["64-128"] != pytest.approx(teacher["by_position"]["64-128"], rel=1e-3)
    assert set(results["models"]["stage1"]["linear_mass"]) == {"0", "1"}
    # This tiny run has no plan.json, so stage 1's tokens are unknown (and the gate skips the budget check).
    assert results["models"]["stage1"]["training_tokens"] == {"stage1": None}
    assert "training_tokens" not in results["models"]["teacher"]
    # The attention path each model ran: the converted layers' torch path on CPU; nothing for the baselines.
    assert [results["models"][k]["hybrid_paths"] for k in results["models"]] == [[], [], ["blocked"]]
    assert results["gate"]["model"] == "stage1" and results["gate"]["checks"] and results["gate"]["passed"] is False
    assert (tmp_path / "out" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "gate for stage1" in printed and "swa64+4sinks" in printed
    assert report(results).splitlines()[0].split()[:3] == ["model", "ppl", "x"]


def test_a_run_with_a_stage_2_adapter_is_measured_merged_and_counts_both_stages_tokens(tiny_run, tmp_path):
    """stage2 is the stitched model with finetune/adapter merged (the same perplexity as merging it here), and
    carries stage 1's tokens (the planner's count in plan.json) and stage 2's (finetune/result.json), which the
    gate sums against eval.max_training_tokens."""
    import shutil

    from blocks.lora import load_adapter_files, merge_lora
    from pipeline.evaluate import _held_out
    from pipeline.export import read_adapter
    from pipeline.finetune import RESULT, load_stitched
    from pipeline.models import load_tokenizer
    from pipeline.stages import read_run_config

    run = RunDir(str(tmp_path / "run"))
    shutil.copytree(tiny_run.root, run.root)
    write_random_adapter(run)
    run.write_json(run.plan_json, {"cost": {"stage 1": {"tokens": 1000 * 1.5}}})  # 1,000 tokens, 1.5 epochs
    run.write_json(RESULT, {"objective": "next_token", "history": [{"step": 0, "eval_loss": 4.0},
                                                                    {"step": 1, "tokens": 256},
                                                                    {"step": 2, "tokens": 512}]})

    settings = EvalConfig(tasks=[], passkey_lengths=[], stages=["stage1", "stage2"], max_training_tokens=2000)
    results = evaluate(run.url, settings, seq_len=40, num_sequences=2, device="cpu")
    assert list(results["models"]) == ["teacher", "swa64+4sinks", "stage1", "stage2"]
    stage1, stage2 = results["models"]["stage1"], results["models"]["stage2"]
    assert stage1["training_tokens"] == {"stage1": 1500}
    assert stage2["training_tokens"] == {"stage1": 1500, "stage2": 512}

    merged = merge_lora(load_adapter_files(load_stitched(run).model, read_adapter(run))).eval()
    sequences = _held_out(load_tokenizer(read_run_config(run).model), 128, 40, 2, seed=0)
    expected = perplexity(merged, sequences).perplexity
    assert stage2["held_out"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert stage2["held_out"]["perplexity"] != pytest.approx(stage1["held_out"]["perplexity"], rel=1e-3)

    budget = next(c for c in results["gate"]["checks"] if c["check"].startswith("training tokens"))
    assert results["gate"]["model"] == "stage2"
    assert (budget["value"], budget["limit"], budget["passed"]) == (2012, 2000, False)


def test_strict_exit_status_and_the_pipeline_stage(tiny_run, tmp_path):
    """--strict exits 1 when the gate fails (the tiny stitched model is far from its teacher); the pipeline's
    eval stage measures with the run's own eval settings and writes RUN/eval/."""
    args = ["--seq-len", "80", "--sequences", "2", "--tasks", "none", "--passkey-lengths", "none", "--device", "cpu"]
    assert eval_main(eval_args(tiny_run.url, "--out", str(tmp_path / "strict"), "--strict", *args)) == 1
    results = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert results["gate"]["passed"] is False
    only_stage1 = evaluate(tiny_run.url, EvalConfig(tasks=[], passkey_lengths=[], baselines=False), seq_len=24,
                           num_sequences=2, device="cpu")
    assert list(only_stage1["models"]) == ["stage1"] and only_stage1["gate"]["passed"] is None
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        evaluate(tiny_run.url, EvalConfig(tasks=[], passkey_lengths=[], baselines=False, stages=["stage2"]),
                 seq_len=24, num_sequences=2, device="cpu")

    from pipeline.config import run_config_to_yaml
    from pipeline.stages import read_run_config

    run = RunDir(tiny_run.url)
    config = read_run_config(run)
    config.eval = EvalConfig(tasks=[], passkey_lengths=[])
    config.data.eval_seq_len, config.data.eval_sequences = 40, 2
    run.write_text(RunDir.run_yaml, run_config_to_yaml(config))
    out = evaluate_run(tiny_run.url, device="cpu")
    assert list(out["models"]) == ["teacher", "swa64+4sinks", "stage1"]
    assert out["models"]["teacher"]["held_out"]["tokens"] == 2 * 39
    assert json.loads(run.read_text("eval/results.json"))["models"].keys() == out["models"].keys()
    assert run.read_bytes("eval/eval.png")[:4] == b"\x89PNG"


def test_combine_puts_runs_beside_one_set_of_baselines(tmp_path, capsys):
    teacher = model_result(10.0, {"0-64": 20.0}, acc=0.70)
    swa = model_result(12.0, {"0-64": 20.0}, acc=0.66)
    common = {"device": "gpu", "dtype": "bfloat16", "held_out": {"seq_len": 64}, "settings": {
        **{k: v for k, v in EvalConfig().__dict__.items()}}}
    baselines = {**common, "models": {"teacher": teacher, "swa64+4sinks": swa,
                                      "stage1": model_result(15.0, {"0-64": 20.0}, acc=0.6, hybrid=True)}}
    other = {**common, "models": {"stage1": model_result(11.0, {"0-64": 20.0}, acc=0.69, hybrid=True),
                                  "stage2": model_result(10.2, {"0-64": 20.0}, acc=0.699, hybrid=True)}}
    combined = combine(baselines, [("long", other)])
    assert list(combined["models"]) == ["teacher", "swa64+4sinks", "long stage1", "long stage2"]
    assert combined["gate"]["model"] == "long stage2" and combined["gate"]["passed"]
    chosen = combine(baselines, [("long", other)], gate_model="long stage1")["gate"]
    assert chosen["model"] == "long stage1" and not chosen["passed"]  # 11.0 is 1.1x the teacher's 10.0
    with pytest.raises(ValueError, match="'stage9' is not a converted model"):
        combine(baselines, [("long", other)], gate_model="stage9")
    with pytest.raises(ValueError, match="other data, settings or device"):
        combine(baselines, [("x", {**other, "held_out": {"seq_len": 128}})])
    with pytest.raises(ValueError, match="other data, settings or device"):  # passkey prompts of sessions 2-9
        combine(baselines, [("x", {**other, "settings": {**other["settings"], "passkey_aligned": False}})])
    # Without passkey lengths on both sides, the passkey trials and prompt were never used: no conflict.
    no_passkey = {**common["settings"], "passkey_lengths": []}
    combine({**baselines, "settings": no_passkey},
            [("x", {**other, "settings": {**no_passkey, "passkey_trials": 3, "passkey_aligned": False}})])
    with pytest.raises(ValueError, match="no teacher"):
        combine(other, [("x", other)])
    (tmp_path / "a.json").write_text(json.dumps(baselines))
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert combine_main(["--baselines", str(tmp_path / "a.json"), "--out", str(tmp_path / "out"),
                         f"{tmp_path / 'b.json'}:long"]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["gate"] == combined["gate"]
    assert "gate for long stage2: PASSED" in capsys.readouterr().out


def test_evaluate_an_exported_directory_and_a_preset(tiny_run, tmp_path, capsys):
    """An exported directory is measured as `converted` (its base model 'tiny' is no preset here, so no
    baselines, said on stderr); a model preset gives the baselines alone."""
    from pipeline.export import export_run

    export = export_run(tiny_run.url, str(tmp_path / "export"))
    settings = EvalConfig(tasks=[], passkey_lengths=[])
    results = evaluate(export, settings, seq_len=40, num_sequences=2, device="cpu")
    assert results["kind"] == "export" and list(results["models"]) == ["converted"]
    assert results["models"]["converted"]["linear_mass"] is None  # remote code: no hooks for the diagnostic
    assert "no baselines" in capsys.readouterr().err
    preset = evaluate("smollm2-135m", settings, seq_len=80, num_sequences=1, device="cpu")
    assert preset["kind"] == "preset" and list(preset["models"]) == ["teacher", "swa64+4sinks"]
    assert preset["gate"]["passed"] is None
    with pytest.raises(ValueError, match="baselines"):
        evaluate("smollm2-135m", EvalConfig(tasks=[], passkey_lengths=[], baselines=False), seq_len=8,
                 num_sequences=1, device="cpu")


def test_the_eval_stage_skips_random_weight_models(tmp_path):
    from pipeline.config import run_config_to_yaml

    run = RunDir(str(tmp_path / "run"))
    run.write_text(RunDir.run_yaml, run_config_to_yaml(resolve_run_config({"model": "llama3.1-70b"})))
    out = evaluate_run(run.url, device="cpu")
    assert "random weights" in out["skipped"]
    assert json.loads(run.read_text("eval/results.json")) == out


def test_perplexity_warm_up_is_untimed_and_changes_nothing():
    """On a GPU the first and last batch shapes run once before the timed pass (their first calls compile the
    Triton kernels); the NLL is the same, and the timed pass still sees each batch exactly once."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    sequences = torch.randint(0, model.config.vocab_size, (5, 24))
    calls = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    cold = perplexity(model, sequences, batch_size=2, device="cpu")  # default off the GPU: no warm-up
    assert calls == [2, 2, 1]
    calls.clear()
    warm = perplexity(model, sequences, batch_size=2, warm_up=True)
    assert calls == [2, 1, 2, 2, 1]  # the first (2 rows) and last (1 row) shapes, then the timed pass
    hook.remove()
    assert warm.nll_sum == pytest.approx(cold.nll_sum, rel=1e-6) and warm.num_tokens == cold.num_tokens == 5 * 23
