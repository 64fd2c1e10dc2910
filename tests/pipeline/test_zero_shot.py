"""Zero-shot tasks: harness formats on known items, the harness's token split, batched scoring against a
one-by-one computation, the items file, argument errors, and SmolLM2 above chance on PIQA."""

import json
import math

import pytest
import torch
from torch import nn

from pipeline import zero_shot
from pipeline.zero_shot import (TASKS, encode_pair, evaluate_zero_shot, export_items, load_items,
                                request_loglikelihoods, score_items)
from tests.conftest import tiny_llama_config

# ----------------------------------------------------------------------------------- formats


def test_piqa_first_item_is_formatted_like_the_harness():
    item = load_items("piqa")[0]
    assert item.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert item.choices == [
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will "
        "also need to supply it with a water bottle and a food dish.",
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will "
        "also need to supply it with a water bottle and a food dish."]
    assert item.gold == 0 and item.subject == ""


def test_arc_items_come_from_the_test_split():
    easy, challenge = load_items("arc_easy"), load_items("arc_challenge")
    assert (len(easy), len(challenge)) == (2376, 1172)
    assert easy[0].context == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                               "food webs?\nAnswer:")
    assert easy[0].choices == [" Sunlight is the source of energy for nearly all ecosystems.",
                               " Most ecosystems are found on land instead of in water.",
                               " Carbon dioxide is more available than other gases.",
                               " The producers in all ecosystems are plants."]
    assert easy[0].gold == 0
    assert challenge[0].context == ("Question: An astronomer observes that a planet rotates faster after a meteorite "
                                    "impact. Which is the most likely effect of this increase in rotation?\nAnswer:")
    assert challenge[0].choices[2] == " Planetary days will become shorter." and challenge[0].gold == 2


def test_hellaswag_preprocessing():
    item = load_items("hellaswag")[0]
    assert item.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b "he" capitalized
    assert item.choices == [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                            " is holding a rubik's cube.", " starts pulling up roofing on a roof."]
    assert item.gold == 3
    row = {"activity_label": "Baking", "ctx_a": "A woman pours flour. [step] She", "ctx_b": "then, The woman",
           "endings": ["Stirs it [title] Done.", "[substeps] waits."], "label": "1"}
    synthetic = zero_shot.hellaswag_item(row)
    # str.capitalize lower-cases the rest ("The" -> "the"), as the harness does; [step] and the doubled space go.
    assert synthetic.context == "Baking: A woman pours flour. She Then, the woman"
    # " [title]" becomes ". "; a leading bracket leaves its space (stripped before the brackets are removed).
    assert synthetic.choices == [" Stirs it. Done.", "  waits."]
    assert synthetic.gold == 1


def test_winogrande_partial_contexts():
    item = load_items("winogrande")[0]
    assert item.context == ["Sarah was a much better surgeon than Maria so Sarah",
                            "Sarah was a much better surgeon than Maria so Maria"]
    assert item.choices == [" always got the easier cases."] * 2
    assert item.gold == 1
    assert item.requests() == [(item.context[0], item.choices[0]), (item.context[1], item.choices[1])]
    assert item.norm_lengths() == [len(item.context[0]), len(item.context[1])]  # harness: len(doc_to_choice)


def test_mmlu_five_shot_prompt():
    shots = [{"question": " What is 1+1? ", "choices": ["1", "2", "3", "4"], "answer": 1},
             {"question": "Pick C.", "choices": ["w", "x", "y", "z"], "answer": 2}]
    prefix = zero_shot.mmlu_prefix("high_school_us_history", shots)
    item = zero_shot.mmlu_item("high_school_us_history", prefix,
                               {"question": "Last?\n", "choices": ["a", "b", "c", "d"], "answer": 3})
    assert item.context == (
        "The following are multiple choice questions (with answers) about high school us history.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Pick C.\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\n"
        "Last?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert item.choices == [" A", " B", " C", " D"] and item.gold == 3
    assert item.norm_lengths() == [1, 1, 1, 1]

    real = load_items("mmlu", limit=1)
    assert len(real) == 57 and len({i.subject for i in real}) == 57
    algebra = next(i for i in real if i.subject == "abstract_algebra")
    assert algebra.context.startswith("The following are multiple choice questions (with answers) about abstract "
                                      "algebra.\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
                                      "A. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n")
    assert algebra.context.count("\nAnswer:") == 6 and algebra.context.endswith("\nAnswer:")


def test_subsample_is_seeded_and_per_subject_for_mmlu():
    full = load_items("piqa")
    first, again, other = load_items("piqa", limit=7), load_items("piqa", limit=7), load_items("piqa", limit=7, seed=1)
    assert first == again and first != other and len(first) == 7
    positions = [full.index(item) for item in first]
    assert positions == sorted(positions)  # dataset order kept
    assert len(load_items("mmlu", limit=3)) == 57 * 3


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="task='piqaa'"):
        load_items("piqaa")
    for limit in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"limit={limit!r}"):
            load_items("piqa", limit=limit)
    with pytest.raises(ValueError, match="tasks='boolq'"):
        evaluate_zero_shot(None, None, tasks=("piqa", "boolq"))
    with pytest.raises(ValueError, match="tasks='mnli'"):
        export_items(tmp_path / "x.json.gz", tasks=("mnli",))
    with pytest.raises(ValueError, match="items_file="):
        load_items("piqa", items_file=tmp_path / "missing.json.gz")
    with pytest.raises(ValueError, match="items is empty"):
        score_items(None, None, [])


# ------------------------------------------------------------------------------------ items file


def test_export_and_load_round_trip(tmp_path):
    path = tmp_path / "items.json.gz"
    counts = export_items(path, tasks=("piqa", "winogrande", "mmlu", "hellaswag"), limit=4, seed=3)
    assert counts == {"piqa": 4, "winogrande": 4, "mmlu": 57 * 4, "hellaswag": 4}
    for task in counts:
        assert load_items(task, items_file=path) == load_items(task, limit=4, seed=3)
        assert load_items(task, limit=4, seed=3, items_file=path) == load_items(task, limit=4, seed=3)
    assert path.stat().st_size < 200_000  # MMLU's shots are stored once per subject
    with pytest.raises(ValueError, match="limit=5"):
        load_items("piqa", limit=5, items_file=path)
    with pytest.raises(ValueError, match="holds no 'arc_easy' items"):
        load_items("arc_easy", items_file=path)


# ---------------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


def harness_split(tokenizer, context, continuation):
    """lm-evaluation-harness's HFLM._encode_pair, one request at a time."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


def test_trailing_space_moves_to_the_continuation(smollm2_tokenizer):
    tok = smollm2_tokenizer
    context_ids, continuation_ids = encode_pair(tok, "Answer: ", "Paris")
    assert context_ids == tok.encode("Answer:", add_special_tokens=False)
    assert continuation_ids == tok.encode(" Paris", add_special_tokens=False)  # one " Paris" token, not " " + "Paris"
    assert (context_ids, continuation_ids) == harness_split(tok, "Answer: ", "Paris")
    assert encode_pair(tok, "Answer:", " Paris") == (context_ids, continuation_ids)


def test_scored_lengths_count_the_rows_the_model_reads(smollm2_tokenizer):
    tok = smollm2_tokenizer
    short = zero_shot.MultipleChoiceItem("piqa", "", "Question: a?\nAnswer:", [" yes", " no way at all"], 0)
    long = zero_shot.MultipleChoiceItem("piqa", "", "word " * 100 + "\nAnswer:", [" yes", " no"], 0)
    table = zero_shot.scored_lengths({"piqa": [short, long]}, tok, within=(68,))
    expected = sorted(len(c) + len(x) - 1 for item in (short, long) for c, x in
                      (encode_pair(tok, context, choice) for context, choice in item.requests()))
    assert table["piqa"] == {"rows": 4, "median": expected[2], "max": expected[-1], "share_le_68": 0.5}


def test_line_by_line_encoding_equals_whole_string_encoding(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert zero_shot._line_segments("a\n\nB\nC?\n D\nE") == ["a\n\nB\n", "C?\n D\n", "E"]
    pairs = [p for task in TASKS for item in load_items(task, limit=2, seed=5) for p in item.requests()]
    pairs += [("x\n\nAnswer:\n", "Y\nZ"), ("Line one.\nTwo \n", " three"), ("", "empty context")]
    fast = zero_shot._encode_pairs(tok, pairs)
    assert fast == [harness_split(tok, c, k) if c else ([tok.eos_token_id], tok.encode(k, add_special_tokens=False))
                    for c, k in pairs]
    assert zero_shot._encode_pairs_by_line(tok, [(c.rstrip(), k) for c, k in pairs]) is not None  # the fast path ran


# ---------------------------------------------------------------------------------------- scoring


class NoLogitsToKeep(nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (full logits come back)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, use_cache=False):
        return self.model(input_ids=input_ids, use_cache=use_cache)


@pytest.fixture(scope="module")
def random_lm():
    """A tiny random Llama over SmolLM2's vocabulary (so the real tokenizer's ids are valid)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(vocab=49152)).eval()


def one_by_one(model, tokenizer, context, continuation):
    context_ids, continuation_ids = harness_split(tokenizer, context, continuation)
    ids = torch.tensor([(context_ids + continuation_ids)[:-1]])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, -len(continuation_ids):].float().log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()


def test_batched_scores_equal_one_by_one(random_lm, smollm2_tokenizer):
    tok = smollm2_tokenizer
    items = (load_items("piqa", limit=3) + load_items("winogrande", limit=2) + load_items("hellaswag", limit=2)
             + load_items("mmlu", limit=1)[:2])
    pairs = [p for item in items for p in item.requests()]  # MMLU's four answers share one forward row
    expected = [one_by_one(random_lm, tok, c, k) for c, k in pairs]
    for model in (random_lm, NoLogitsToKeep(random_lm)):
        got = request_loglikelihoods(model, tok, pairs, batch_size=3)  # mixed lengths: right padding in every batch
        assert got == pytest.approx(expected, abs=2e-4, rel=1e-5)
    assert len(set(round(x, 3) for x in expected)) > len(expected) // 2  # the comparison is not between constants


def test_truncation_keeps_the_last_tokens(random_lm, smollm2_tokenizer):
    context, continuation = "One two three four five six seven eight nine ten.", " Eleven twelve."
    context_ids, continuation_ids = harness_split(smollm2_tokenizer, context, continuation)
    whole = context_ids + continuation_ids
    ids = torch.tensor([whole[-9:-1]])  # the harness keeps the last max_length + 1 tokens, input drops the last
    with torch.no_grad():
        logprobs = random_lm(input_ids=ids).logits[0, -len(continuation_ids):].float().log_softmax(-1)
    expected = logprobs.gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()
    got = request_loglikelihoods(random_lm, smollm2_tokenizer, [(context, continuation)], max_length=8)
    assert got == pytest.approx([expected], abs=1e-4)


def test_accuracy_and_length_normalization(random_lm, smollm2_tokenizer):
    items = load_items("arc_challenge", limit=12)
    result = score_items(random_lm, smollm2_tokenizer, items, batch_size=8)
    scores = request_loglikelihoods(random_lm, smollm2_tokenizer, [p for i in items for p in i.requests()])
    correct, correct_norm, start = [], [], 0
    for item in items:
        s = scores[start:start + len(item.choices)]
        start += len(item.choices)
        normed = [x / (len(c) - 1) for x, c in zip(s, item.choices)]  # characters of the choice, without " "
        correct.append(s.index(max(s)) == item.gold)
        correct_norm.append(normed.index(max(normed)) == item.gold)
    assert result["acc"] == pytest.approx(sum(correct) / 12)
    assert result["acc_norm"] == pytest.approx(sum(correct_norm) / 12)
    p = result["acc_norm"]
    assert result["acc_norm_stderr"] == pytest.approx(math.sqrt(p * (1 - p) * 12 / 11 / 12))  # ddof 1
    assert (result["metric"], result["value"], result["n"]) == ("acc_norm", result["acc_norm"], 12)
    assert result["correct"] == "".join("1" if c else "0" for c in correct_norm)  # the primary metric, item order


def test_mmlu_macro_mean_and_items_file_evaluation(random_lm, smollm2_tokenizer, tmp_path):
    items = [i for i in load_items("mmlu", limit=2) if i.subject in ("anatomy", "virology", "world_religions")]
    result = score_items(random_lm, smollm2_tokenizer, items)
    subjects = result["subjects"]
    assert sorted(subjects) == ["anatomy", "virology", "world_religions"]
    assert result["acc"] == pytest.approx(sum(s["acc"] for s in subjects.values()) / 3)
    assert result["value"] == result["acc"] and result["n"] == 6 and result["num_fewshot"] == 5
    assert all(s["correct"].count("1") / s["n"] == pytest.approx(s["acc"]) for s in subjects.values())

    path = tmp_path / "items.json.gz"
    export_items(path, tasks=("piqa", "winogrande"), limit=3)
    results = evaluate_zero_shot(random_lm, smollm2_tokenizer, tasks=("piqa", "winogrande"), items_file=path)
    assert results["piqa"]["n"] == results["winogrande"]["n"] == 3
    assert results["average"]["avg5"] == pytest.approx((results["piqa"]["value"] + results["winogrande"]["value"]) / 2)
    assert results["average"]["tasks"] == ["piqa", "winogrande"] and results["average"]["mmlu"] is None


def test_smollm2_is_above_chance_on_piqa(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    result = score_items(model, tokenizer, load_items("piqa", limit=40), batch_size=16)
    # The full 1,838 items score about 0.65-0.70; these 40 fixed items are deterministic.
    assert result["acc"] >= 0.6, result


def test_items_file_with_a_limit_per_task(tmp_path):
    """`linearize eval` exports 0-shot tasks and MMLU with different limits (MMLU's counts per subject); loading
    checks each task against the limit it was exported with."""
    path = tmp_path / "items.json.gz"
    counts = export_items(path, tasks=("piqa", "mmlu"), limit={"piqa": 5, "mmlu": 1}, seed=2)
    assert counts["piqa"] == 5 and counts["mmlu"] == 57
    assert load_items("piqa", limit=5, seed=2, items_file=path) == load_items("piqa", limit=5, seed=2)
    assert load_items("mmlu", limit=1, seed=2, items_file=path) == load_items("mmlu", limit=1, seed=2)
    with pytest.raises(ValueError, match="exported with limit=5"):
        load_items("piqa", limit=6, seed=2, items_file=path)


def test_paired_difference_counts_the_items_only_one_model_gets_right():
    # Items 2 and 3 split the two models; items 1 and 4 agree and cancel.
    paired = zero_shot.paired_difference({"correct": "1100"}, {"correct": "1010"})
    assert (paired["difference"], paired["only_result"], paired["only_base"]) == (0.0, 1, 1)
    assert paired["stderr"] == pytest.approx(math.sqrt(2 / 3) / 2)  # deltas 0, 1, -1, 0: ddof 1, n 4
    # Agreeing on every item: no difference and no spread, however low the accuracy.
    assert zero_shot.paired_difference({"correct": "0101"}, {"correct": "0101"})["stderr"] == 0.0
    # Not the same items, or no per-item record (results written before it existed): nothing to pair.
    assert zero_shot.paired_difference({"correct": "110"}, {"correct": "1010"}) is None
    assert zero_shot.paired_difference({"correct": "1100"}, {"value": 0.5}) is None


def test_paired_difference_for_mmlu_is_the_macro_mean_over_subjects():
    ours = {"subjects": {"anatomy": {"correct": "11"}, "virology": {"correct": "1000"}}}
    theirs = {"subjects": {"anatomy": {"correct": "01"}, "virology": {"correct": "1000"}}}
    paired = zero_shot.paired_difference(ours, theirs)
    assert paired["difference"] == pytest.approx((0.5 + 0.0) / 2)
    assert paired["stderr"] == pytest.approx(math.sqrt(0.5 / 2 + 0.0) / 2)  # anatomy deltas 1, 0: variance 0.5
    assert (paired["only_result"], paired["only_base"]) == (1, 0)
    assert zero_shot.paired_difference(ours, {"subjects": {"anatomy": {"correct": "01"}}}) is None


def test_paired_command_compares_two_models_of_one_results_file(tmp_path, capsys):
    results = {"models": {
        "teacher": {"zero_shot": {"arc_challenge": {"value": 0.5, "correct": "1010"}, "average": {"avg5": 0.5}}},
        "stage2": {"zero_shot": {"arc_challenge": {"value": 0.75, "correct": "1110"}, "piqa": {"value": 0.5}}}}}
    path, out = tmp_path / "results.json", tmp_path / "paired.json"
    path.write_text(json.dumps(results))
    assert zero_shot.main(["paired", str(path), "stage2", "teacher", "--out", str(out)]) == 0
    assert "arc_challenge   75.0 vs  50.0: +25.0 points" in capsys.readouterr().out
    row = json.loads(out.read_text())["tasks"]["arc_challenge"]
    assert (row["only_result"], row["only_base"], row["difference"]) == (1, 0, 0.25)
    with pytest.raises(ValueError, match="'swa' is not in these results"):
        zero_shot.paired_table(results, "stage2", "swa")
    del results["models"]["teacher"]["zero_shot"]["arc_challenge"]["correct"]
    with pytest.raises(ValueError, match="share no task with per-item outcomes"):
        zero_shot.paired_table(results, "stage2", "teacher")
