"""Passkey retrieval: exact prompt lengths with the real SmolLM2 tokenizer, needle placement and depth, seeding,
scoring with generate functions that answer from the prompt (right or wrong key), bad inputs, and the real
SmolLM2-135M-Instruct teacher at 512 tokens."""

import re

import pytest
import torch

from pipeline.passkey import (ANSWER_PREFIX, DEPTHS, FILLER_SENTENCES, NEEDLE, QUESTION, TASK, answer_token_probabilities,
                              first_number, key_lead, passkey_accuracy, passkey_prompts)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


def key_in_prompt(tokenizer, input_ids) -> str:
    """What a perfect reader of the prompt would answer."""
    return re.search(r"The pass key is (\d+)\. Remember it\.", tokenizer.decode(input_ids)).group(1)


def answering_generate_fn(tokenizer, answer_for, prompt_in_output=True):
    """A generate_fn that reads the key from each prompt and answers `answer_for(key)`, checking that it is
    called the way the contract says (unpadded, all-ones mask, max_new_tokens passed)."""

    def generate(input_ids, attention_mask, max_new_tokens):
        assert input_ids.dtype == torch.long and attention_mask.shape == input_ids.shape
        assert bool(attention_mask.all()) and max_new_tokens == 8
        answers = [tokenizer(f" {answer_for(key_in_prompt(tokenizer, row))}. It", add_special_tokens=False)[
            "input_ids"][:max_new_tokens] for row in input_ids.tolist()]
        width = max(len(a) for a in answers)
        new = torch.tensor([a + [tokenizer.eos_token_id] * (width - len(a)) for a in answers])
        return torch.cat([input_ids, new], dim=1) if prompt_in_output else new

    return generate


@pytest.mark.parametrize("length", [512, 1024, 2048])
def test_prompts_have_exactly_the_target_length(tokenizer, length):
    prompts = passkey_prompts(tokenizer, length, num_trials=7, seed=1)
    assert len(prompts) == 7
    assert [len(p.input_ids) for p in prompts] == [length] * 7
    assert [p.depth for p in prompts] == [DEPTHS[i % len(DEPTHS)] for i in range(7)]
    for p in prompts:
        assert re.fullmatch(r"[1-9]\d{4}", p.key)
        assert all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in p.input_ids)


@pytest.mark.parametrize("depth", DEPTHS)
def test_needle_appears_once_at_the_requested_depth(tokenizer, depth):
    (prompt,) = passkey_prompts(tokenizer, 1024, num_trials=1, seed=3, depths=(depth,))
    text = tokenizer.decode(prompt.input_ids)
    needle = NEEDLE.format(key=prompt.key)
    assert text.startswith(TASK + "\n")
    assert text.endswith(f"\n{QUESTION} The pass key is ")  # SmolLM2 gives the space before digits its own token
    assert text.count(needle) == 1 and text.count(prompt.key) == 2
    # Depth as the fraction of the filler's characters that come before the needle.
    filler_start, filler_end = len(TASK) + 1, text.rindex(f"\n{QUESTION}")
    before = text.index(needle) - filler_start
    filler = text[filler_start:filler_end].replace(" " + needle, "")
    assert abs(before / len(filler) - depth) < 0.02
    # The filler is whole filler sentences, but for a leading fragment of one.
    sentences = [s.strip() + "." for s in filler.split(".")[1:] if s.strip()]
    assert len(sentences) > 100 and set(sentences) == set(FILLER_SENTENCES)


def test_chat_template_form_has_exact_length_and_ends_in_the_assistant_turn(tokenizer):
    prompts = passkey_prompts(tokenizer, 512, num_trials=3, chat=True)
    assert [len(p.input_ids) for p in prompts] == [512] * 3
    text = tokenizer.decode(prompts[0].input_ids)
    assert text.startswith("<|im_start|>system") and NEEDLE.format(key=prompts[0].key) in text
    assert text.endswith("<|im_start|>assistant\nThe pass key is ")


def test_aligned_question_stops_where_the_needles_key_digits_start(tokenizer):
    lead = key_lead(tokenizer)
    assert [tokenizer.decode([t]) for t in lead] == [" "]  # SmolLM2: " 60494" is " ", "6", "0", "4", "9", "4"
    aligned = passkey_prompts(tokenizer, 512, num_trials=5, seed=4)
    plain = passkey_prompts(tokenizer, 512, num_trials=5, seed=4, aligned=False)
    answer = tokenizer(" " + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    for a, p in zip(aligned, plain):
        assert len(a.input_ids) == len(p.input_ids) == 512 and a.key == p.key and a.depth == p.depth
        assert a.input_ids[-len(lead):] == lead and p.input_ids[-len(answer):] == answer
        # The last tokens of the aligned prompt are the needle's tokens right before the key's first digit.
        digits = tokenizer(a.key, add_special_tokens=False)["input_ids"]
        tail = answer + lead
        hits = [i for i in range(len(a.input_ids) - len(tail) - len(digits))
                if a.input_ids[i:i + len(tail) + len(digits)] == tail + digits]
        assert len(hits) == 1, hits


def test_same_seed_same_prompts_other_seed_other_keys(tokenizer):
    first = passkey_prompts(tokenizer, 512, num_trials=10, seed=5)
    assert first == passkey_prompts(tokenizer, 512, num_trials=10, seed=5)
    other = passkey_prompts(tokenizer, 512, num_trials=10, seed=6)
    assert [p.key for p in first] != [p.key for p in other]
    assert len({p.key for p in first}) > 1


@pytest.mark.parametrize("prompt_in_output", [True, False])
def test_reading_the_key_scores_one_and_a_wrong_key_scores_zero(tokenizer, prompt_in_output):
    right = answering_generate_fn(tokenizer, lambda key: key, prompt_in_output)
    wrong = answering_generate_fn(tokenizer, lambda key: str((int(key) - 10000 + 1) % 90000 + 10000),
                                  prompt_in_output)
    settings = dict(lengths=(512, 1024), num_trials=10, batch_size=4, seed=2)
    good = passkey_accuracy(None, tokenizer, generate_fn=right, **settings)
    bad = passkey_accuracy(None, tokenizer, generate_fn=wrong, **settings)
    assert set(good) == set(bad) == {"512", "1024"}
    for length in good:
        assert good[length]["accuracy"] == 1.0 and good[length]["n"] == 10
        assert good[length]["by_depth"] == {f"{d:.2f}": 1.0 for d in DEPTHS}
        assert bad[length]["accuracy"] == 0.0 and bad[length]["n"] == 10
        assert set(bad[length]["by_depth"].values()) == {0.0}


def test_first_number_is_the_first_run_of_digits():
    assert first_number(" 71432. Remember it. 12345") == "71432"
    assert first_number(" 714 32") == "714"
    assert first_number(" a unique code") is None


def test_bad_inputs_raise_naming_the_argument(tokenizer):
    with pytest.raises(ValueError, match=r"length: 40 .*use a length >= \d+"):
        passkey_prompts(tokenizer, 40, num_trials=2)
    with pytest.raises(ValueError, match="num_trials: 0"):
        passkey_prompts(tokenizer, 512, num_trials=0)
    with pytest.raises(ValueError, match="depths"):
        passkey_prompts(tokenizer, 512, num_trials=2, depths=(1.5,))

    def never_called(*args):
        raise AssertionError("prompts are checked before any generation")

    with pytest.raises(ValueError, match="length: 30"):
        passkey_accuracy(None, tokenizer, lengths=(512, 30), num_trials=2, generate_fn=never_called)
    with pytest.raises(ValueError, match="lengths"):
        passkey_accuracy(None, tokenizer, lengths=(), generate_fn=never_called)
    with pytest.raises(ValueError, match="batch_size: 0"):
        passkey_accuracy(None, tokenizer, batch_size=0, generate_fn=never_called)
    with pytest.raises(ValueError, match="model: NoneType has no generate"):
        passkey_accuracy(None, tokenizer)


def test_smollm2_teacher_retrieves_the_key_at_512_tokens(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa")
    result = passkey_accuracy(model.eval(), tokenizer, lengths=(512,), num_trials=4, batch_size=4)
    # Measured: 8/8 at 512 and 1024 tokens (plain text), so the teacher must pass nearly all of these.
    assert result["512"]["n"] == 4
    assert result["512"]["accuracy"] >= 0.75, result


def test_sliding_window_reads_a_needle_inside_its_window_and_not_one_outside(smollm2_dir, tokenizer):
    """What the aligned prompt measures: retrieval. SWA 64 + 4 sinks sees a needle right before the question and
    not one at the start. Measured with the plain prompt of sessions 2-9 (`python -m pipeline.passkey probe`): half
    the in-window needles were lost to the first answer token (" a" instead of " "); aligned, every one of them."""
    from transformers import AutoModelForCausalLM

    from blocks.window_attention import swap_to_sliding_window
    from pipeline.evaluate import greedy_without_cache

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    swap_to_sliding_window(model, 64, 4)
    generate = greedy_without_cache(model, tokenizer.eos_token_id)  # the SWA module keeps no cache

    inside = passkey_accuracy(None, tokenizer, lengths=(256,), num_trials=3, depths=(1.0,), generate_fn=generate)
    outside = passkey_accuracy(None, tokenizer, lengths=(256,), num_trials=3, depths=(0.0,), generate_fn=generate)
    assert inside["256"]["accuracy"] == 1.0, inside
    assert outside["256"]["accuracy"] == 0.0, outside


def test_teacher_forced_answer_tokens_of_both_prompts(smollm2_dir, tokenizer):
    """The plain prompt's answer starts with the lone " " the teacher is unsure of; the digits after it, and the
    aligned prompt's first token, are near certain (measured p(" ") = 0.42 with the teacher, 0.25 with SWA 64)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    (plain,) = passkey_prompts(tokenizer, 256, num_trials=1, depths=(1.0,), aligned=False)
    (aligned,) = passkey_prompts(tokenizer, 256, num_trials=1, depths=(1.0,))
    plain_tokens = answer_token_probabilities(model, tokenizer, plain, aligned=False)
    aligned_tokens = answer_token_probabilities(model, tokenizer, aligned, aligned=True)
    assert [t["token"] for t in plain_tokens] == [" "] + [t["token"] for t in aligned_tokens] == [" "] + list(plain.key)
    assert all(0.0 <= t["p"] <= 1.0 for t in plain_tokens + aligned_tokens)
    assert plain_tokens[0]["p"] < 0.9 and min(t["p"] for t in aligned_tokens) > 0.5, (plain_tokens, aligned_tokens)
