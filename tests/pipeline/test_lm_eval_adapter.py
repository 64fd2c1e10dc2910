"""The lm-evaluation-harness model "linearize" (pipeline/lm_eval_adapter.py) on a tiny converted model.

For both kinds of source (an exported directory, and a run directory built in process) and batches whose
sequences have different lengths (so HFLM pads them):
* loglikelihood equals the sum of log-softmax of the continuation tokens from one unpadded forward, and
  is_greedy equals the direct argmax check;
* loglikelihood_rolling equals the full-sequence log-likelihood after the prefix token;
* generate_until equals greedy generate() with the hybrid cache on each prompt alone, token for token on a
  left-padded batch and as text after the stop sequence;
* simple_evaluate runs tasks defined from a local jsonl file (multiple choice, generation, rolling
  perplexity) and its accuracy equals the one computed directly; `python -m pipeline.lm_eval_adapter` (the
  lm_eval CLI with the model registered) gives the same accuracy.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from pipeline.export import export_run
from pipeline.generate import load_generator
from pipeline.lm_eval_adapter import LinearizeLM
from tests.pipeline.tiny_run import make_model_dir, make_tiny_run

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 10
# Texts of the tiny character-level tokenizer (letters, digits, " .,!?'\n:-"); lengths differ, and the long
# ones reach past the 8-token window into the linear part of the hybrid attention.
CONTEXTS = ["Hello there", "A much longer context, far past the window", "x"]
CONTINUATIONS = [" friend", " and it goes on!", "yz"]
DOCS = [{"question": "Is ab then cd?", "choices": ["yes", "no", "maybe so"], "answer": 0,
         "text": "ab and cd go on."},
        {"question": "Which comes first, ef or gh?", "choices": ["ef", "gh", "neither"], "answer": 2,
         "text": "First ef, then gh, then more words."},
        {"question": "Q: 12 or 21", "choices": ["12", "21", "both"], "answer": 1, "text": "1 2 3"}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{"run": a run directory with stitched/ (no export/), "export": its exported directory}."""
    base = tmp_path_factory.mktemp("lm_eval")
    run = make_tiny_run(str(base / "run"), make_model_dir(base / "model"))
    return {"run": run.url, "export": export_run(run.url, str(base / "export"))}


@pytest.fixture(scope="module", params=["export", "run"])
def source(request, sources):
    return sources[request.param]


@pytest.fixture(scope="module")
def adapter(source):
    lm = LinearizeLM(source=source, device="cpu", dtype="float32", batch_size=3)
    assert (lm.new_cache is None) == source.endswith("export")  # the in-process model needs its cache passed
    return lm


@pytest.fixture(scope="module")
def reference(source):
    """The same model, loaded separately, for the direct computations."""
    return load_generator(source, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def choice_accuracy(sources):
    """Multiple-choice accuracy on DOCS computed directly with the exported model."""
    return direct_choice_accuracy(load_generator(sources["export"], device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three harness tasks over one local jsonl file (no dataset hub needed)."""
    directory = tmp_path_factory.mktemp("tasks")
    (directory / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    dataset = {"dataset_path": "json", "test_split": "test",
               "dataset_kwargs": {"data_files": {"test": str(directory / "docs.jsonl")},
                                  "cache_dir": str(directory / "cache")}}
    tasks = {
        "tiny_choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                        "metric_list": [{"metric": "acc"}]},
        "tiny_generate": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                          "doc_to_target": "{{choices[answer]}}", "metric_list": [{"metric": "exact_match"}],
                          "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}},
        "tiny_perplexity": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                            "metric_list": [{"metric": "word_perplexity"}]},
    }
    for name, config in tasks.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **dataset, **config}))
    return directory


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def continuation_logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """Sum of log p(ids[t] | ids[:t]) over t >= start from one unpadded forward, and whether all are argmax."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(dim=-1)
    targets = torch.tensor(ids[start:])
    predicting = logprobs[start - 1:-1]  # row t - 1 predicts token t
    total = predicting.gather(-1, targets[:, None]).sum()
    return float(total), bool((predicting.argmax(dim=-1) == targets).all())


def direct_choice_accuracy(generator) -> float:
    """Multiple-choice accuracy on DOCS: the choice whose " choice" continuation is most likely."""
    correct = 0
    for doc in DOCS:
        context = encode(generator.tokenizer, doc["question"])
        scores = [continuation_logprob(generator.model, context + encode(generator.tokenizer, " " + choice),
                                       len(context))[0] for choice in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(DOCS)


def test_a_source_that_is_no_model_is_refused_naming_the_argument(tmp_path):
    for source in ("", str(tmp_path)):
        with pytest.raises(ValueError, match="source"):
            LinearizeLM(source=source, device="cpu")


def test_loglikelihood_equals_the_direct_sum_of_continuation_logprobs(adapter, reference):
    requests = [Instance("loglikelihood", {}, (context, continuation), i)
                for i, (context, continuation) in enumerate(zip(CONTEXTS, CONTINUATIONS))]
    results = adapter.loglikelihood(requests)
    tokenizer = reference.tokenizer
    for (logprob, greedy), context, continuation in zip(results, CONTEXTS, CONTINUATIONS):
        expected, expected_greedy = continuation_logprob(reference.model, encode(tokenizer, context + continuation),
                                                         len(encode(tokenizer, context)))
        assert logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert greedy == expected_greedy
    assert len({round(value, 3) for value, _ in results}) == len(results)  # not all the same number


def test_loglikelihood_rolling_equals_the_full_sequence_loglikelihood(adapter, reference):
    texts = [CONTEXTS[1] + CONTINUATIONS[1], "Short one."]
    results = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i)
                                             for i, text in enumerate(texts)])
    for result, text in zip(results, texts):
        # One window: the prefix token (BOS), then every token of the text is scored.
        expected, _ = continuation_logprob(reference.model, [adapter.prefix_token_id] + encode(reference.tokenizer,
                                                                                                text), 1)
        assert result == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_left_padded_batch_generation_equals_greedy_generate_per_prompt(adapter, reference):
    prompts = [encode(reference.tokenizer, text) for text in CONTEXTS]
    width = max(len(p) for p in prompts)
    pad = reference.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = adapter._model_generate(ids, width + NEW_TOKENS, [], attention_mask=mask, do_sample=False,
                                  min_new_tokens=NEW_TOKENS)
    for row, prompt in zip(out, prompts):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        assert row[width:].tolist() == expected[0, len(prompt):].tolist()


def test_generate_until_equals_greedy_generate_cut_at_the_stop_sequence(adapter, reference):
    settings = {"until": ["e"], "max_gen_toks": NEW_TOKENS, "do_sample": False}
    results = adapter.generate_until([Instance("generate_until", {}, (context, dict(settings)), i)
                                      for i, context in enumerate(CONTEXTS)])
    expected = []
    for context in CONTEXTS:
        prompt = torch.tensor([encode(reference.tokenizer, context)])
        tokens = reference.generate(prompt, max_new_tokens=NEW_TOKENS)[0, prompt.shape[1]:]
        expected.append(reference.tokenizer.decode(tokens, skip_special_tokens=True).split("e")[0])
    assert results == expected
    assert any(expected)  # some text to compare (random weights also pick ids outside the tokenizer)


def test_simple_evaluate_runs_local_tasks_with_the_directly_computed_accuracy(sources, task_dir, choice_accuracy):
    adapter = LinearizeLM(source=sources["export"], device="cpu", batch_size=2)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = lm_eval.simple_evaluate(model=adapter, tasks=["tiny_choice", "tiny_generate", "tiny_perplexity"],
                                      task_manager=manager, limit=len(DOCS), bootstrap_iters=0,
                                      log_samples=False)["results"]
    assert results["tiny_choice"]["acc,none"] == pytest.approx(choice_accuracy)
    assert 0.0 <= results["tiny_generate"]["exact_match,none"] <= 1.0
    perplexity = results["tiny_perplexity"]["word_perplexity,none"]
    assert math.isfinite(perplexity) and perplexity > 1.0


def test_module_cli_runs_the_harness_with_the_registered_model(sources, task_dir, choice_accuracy, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline.lm_eval_adapter", "--model_args", f"source={sources['export']}",
         "--tasks", "tiny_choice", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    [path] = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    written = json.loads(Path(path).read_text())
    assert written["config"]["model"] == "linearize"
    assert written["results"]["tiny_choice"]["acc,none"] == pytest.approx(choice_accuracy)
