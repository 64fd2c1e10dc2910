"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; the long-context test of LongLoRA and
LoLCATs): a random 5-digit key hidden at a chosen depth in repeated filler text, then asked for.

A prompt is, in tokens:

    task description | filler[:b] | needle | filler[b:] | question
    "There is an important info hidden ..." " The grass is green. The sky is blue. ..."
    " The pass key is 71432. Remember it. 71432 is the pass key."  "\\nWhat is the pass key? The pass key is"

Every prompt at one target length has *exactly* that many tokens: the parts are tokenized separately and the
filler is cut to the token budget left over (it ends on a whole sentence; only its first sentence may be a
fragment). Prompts therefore batch without padding, which matters because the in-process hybrid forward
ignores attention_mask. The needle goes in at the sentence boundary nearest the requested depth, where depth
is the fraction of the filler placed before it (0: right after the task description, 1: right before the
question). Trial i of `num_trials` uses depth `depths[i % len(depths)]` and a seeded random key.

Where the tokenizer gives the space before a number its own token (SmolLM2 and Llama 2 split digits, so
" 60494" is " ", "6", "0", ...), the question ends with that space token too (`aligned=True`, the default since
session 10): the prompt then stops exactly where the needle's key digits start. Without it the first answer token
must be a lone " ": the SmolLM2 teacher gives it p = 0.42 (its first choice, by a little), SWA 64 + 4 sinks 0.25,
below " a" ("The pass key is a special type of key ..."). A trial turned on that coin, not on reading the key;
once the space is there, the key's digits follow with p >= 0.9 for both when the needle is in view
(`python -m pipeline.passkey probe`).

Scoring: greedy decoding of a few tokens; a trial passes when the first run of digits in the decoded
continuation equals the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back and again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LENGTHS = (512, 1024, 2048)

# (B, T) prompt ids, (B, T) attention mask, max_new_tokens -> (B, T + new) ids as HF generate returns them,
# or (B, new) ids of the continuation only.
GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class PasskeyPrompt:
    input_ids: list[int]  # exactly the target length
    key: str  # 5 digits
    depth: float  # requested depth (the grouping key of by_depth); the needle sits at the nearest sentence boundary


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def key_lead(tokenizer) -> list[int]:
    """The whitespace-only tokens the needle puts between "The pass key is" and the key's first digit: [" "] for
    tokenizers that split the space off numbers (SmolLM2, Llama 2), [] where it merges into the first digits."""
    prefix = _encode(tokenizer, " " + ANSWER_PREFIX)
    lead: list[int] = []
    for key in ("12345", "98765"):  # two keys, so that a lead is never a digit token by accident
        ids = _encode(tokenizer, f" {ANSWER_PREFIX} {key}")
        if ids[:len(prefix)] != prefix:
            return []
        rest = ids[len(prefix):]
        this = []
        for token in rest:
            if tokenizer.decode([token]).strip():
                break
            this.append(token)
        if lead and this != lead:
            return []
        lead = this
    return lead


def _head_and_tail(tokenizer, chat: bool, aligned: bool = True) -> tuple[list[int], list[int]]:
    """Token ids before the filler (task description) and after it (question, answer prefix and, if `aligned`,
    the key's lead token)."""
    lead = key_lead(tokenizer) if aligned else []
    if not chat:
        # The tokenizer's own special tokens (e.g. Llama 3's BOS) go at the very start, as in any plain prompt.
        return (_encode(tokenizer, TASK + "\n", special=True),
                _encode(tokenizer, f"\n{QUESTION} {ANSWER_PREFIX}") + lead)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat: the tokenizer has no chat template; use chat=False (plain text)")
    sentinel = "\x00PASSKEY\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], add_generation_prompt=True,
                                             tokenize=False)
    before, after = rendered.split(sentinel)
    # The rendered template already holds its special tokens (BOS included), so nothing is added here.
    return (_encode(tokenizer, before + TASK + "\n"),
            _encode(tokenizer, f"\n{QUESTION}{after}{ANSWER_PREFIX}") + lead)


def _filler(tokenizer) -> tuple[list[int], list[int]]:
    """One cycle of filler token ids and the offsets in it where each sentence ends."""
    ids: list[int] = []
    ends: list[int] = []
    for sentence in FILLER_SENTENCES:
        ids += _encode(tokenizer, " " + sentence)
        ends.append(len(ids))
    return ids, ends


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: {value!r} must be an integer >= 1")


def passkey_prompts(tokenizer, length: int, num_trials: int, seed: int = 0, depths: Sequence[float] = DEPTHS,
                    chat: bool = False, aligned: bool = True) -> list[PasskeyPrompt]:
    """`num_trials` prompts of exactly `length` tokens; trial i hides a random key at depths[i % len(depths)].

    chat=True wraps the task in the tokenizer's chat template (user turn, then the assistant's turn starting
    with "The pass key is"); the default plain text is what we report, for base and instruct models alike.
    aligned=False leaves out the key's lead token (the prompt of sessions 2-9; see the module docstring).
    """
    _check_positive("num_trials", num_trials)
    _check_positive("length", length)
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths: {depths!r} must be a non-empty sequence of fractions in [0, 1]")
    head, tail = _head_and_tail(tokenizer, chat, aligned)
    cycle, sentence_ends = _filler(tokenizer)
    rng = random.Random(seed)
    prompts = []
    for trial in range(num_trials):
        key = str(rng.randint(10000, 99999))
        depth = float(depths[trial % len(depths)])
        needle = _encode(tokenizer, " " + NEEDLE.format(key=key))
        budget = length - len(head) - len(needle) - len(tail)
        if budget < 0:
            need = length - budget
            raise ValueError(f"length: {length} tokens cannot hold the task description, needle and question "
                             f"({need} tokens with this tokenizer); use a length >= {need}")
        # Whole cycles end the filler on a complete sentence; the cut falls at the start (a leading fragment).
        cycles = -(-budget // len(cycle))  # ceil
        skip = cycles * len(cycle) - budget  # tokens dropped from the front of the repeated cycles
        filler = (cycle * cycles)[skip:]
        # Sentence starts inside the kept filler (0 and budget included): the needle's candidate positions.
        boundaries = {0, budget}
        for c in range(cycles):
            boundaries.update(c * len(cycle) + end - skip for end in sentence_ends)
        boundaries = sorted(b for b in boundaries if 0 <= b <= budget)
        at = min(boundaries, key=lambda b: abs(b - depth * budget))
        ids = head + filler[:at] + needle + filler[at:] + tail
        assert len(ids) == length, (len(ids), length)
        prompts.append(PasskeyPrompt(input_ids=ids, key=key, depth=depth))
    return prompts


def first_number(text: str) -> str | None:
    """The first run of digits in `text` (None if there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def hf_generate_fn(model, pad_token_id: int | None = None) -> GenerateFn:
    """Greedy decoding with a plain Hugging Face model's generate()."""

    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=pad_token_id)

    return generate


def _continuation(output: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The new tokens of a generate_fn's output, whether or not it repeats the prompt."""
    width = input_ids.shape[1]
    if output.shape[1] >= width and torch.equal(output[:, :width].cpu(), input_ids.cpu()):
        return output[:, width:]
    return output


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths: Sequence[int] = DEFAULT_LENGTHS, num_trials: int = 20,
                     batch_size: int = 8, device: str | torch.device = "cpu", generate_fn: GenerateFn | None = None,
                     seed: int = 0, max_new_tokens: int = 8, depths: Sequence[float] = DEPTHS,
                     chat: bool = False, aligned: bool = True) -> dict[str, dict]:
    """Passkey accuracy at each length: {"512": {"accuracy", "n", "by_depth": {"0.00": acc, ...}}, ...}.

    generate_fn(input_ids (B, T), attention_mask (B, T), max_new_tokens) returns greedy token ids (prompt +
    continuation, or the continuation alone); by default `model.generate(..., do_sample=False)`, so `model`
    is only used when generate_fn is None. Inputs are moved to `device`; every batch is unpadded.
    """
    if not lengths:
        raise ValueError(f"lengths: {lengths!r} is empty; give at least one prompt length, e.g. (512, 1024, 2048)")
    _check_positive("batch_size", batch_size)
    _check_positive("max_new_tokens", max_new_tokens)
    if generate_fn is None:
        if model is None or not hasattr(model, "generate"):
            raise ValueError(f"model: {type(model).__name__} has no generate(); pass generate_fn")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generate_fn = hf_generate_fn(model, pad_id)
    # Build every prompt first, so bad arguments fail before any generation.
    by_length = {length: passkey_prompts(tokenizer, length, num_trials, seed=seed, depths=depths, chat=chat,
                                         aligned=aligned)
                 for length in lengths}
    results: dict[str, dict] = {}
    with tqdm(total=num_trials * len(lengths), desc="passkey", unit="prompt") as progress:
        for length, prompts in by_length.items():
            progress.set_postfix(length=length)
            correct: list[bool] = []
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                input_ids = torch.tensor([p.input_ids for p in batch], dtype=torch.long, device=device)
                attention_mask = torch.ones_like(input_ids)
                new_tokens = _continuation(generate_fn(input_ids, attention_mask, max_new_tokens), input_ids)
                for prompt, tokens in zip(batch, new_tokens.tolist()):
                    answer = first_number(tokenizer.decode(tokens, skip_special_tokens=True))
                    correct.append(answer == prompt.key)
                progress.update(len(batch))
            groups: dict[str, list[bool]] = {}
            for prompt, ok in zip(prompts, correct):
                groups.setdefault(f"{prompt.depth:.2f}", []).append(ok)
            results[str(length)] = {"accuracy": sum(correct) / len(correct), "n": len(correct),
                                    "by_depth": {d: sum(v) / len(v) for d, v in sorted(groups.items())}}
    return results


@torch.no_grad()
def answer_token_probabilities(model, tokenizer, prompt: PasskeyPrompt, aligned: bool) -> list[dict]:
    """Teacher-forced: each answer token's probability after the prompt, and what the model ranks first there.
    `aligned` says how `prompt` was made: for a plain prompt the answer starts with the key's lead token (" " for
    SmolLM2), the token that decided the trials of that prompt."""
    lead = [] if aligned else key_lead(tokenizer)
    answer = lead + _encode(tokenizer, prompt.key)
    ids = torch.tensor([prompt.input_ids + answer])
    logprobs = model(ids).logits[0, -len(answer) - 1:-1].float().log_softmax(-1)
    return [{"token": tokenizer.decode([t]), "p": round(logprobs[i, t].exp().item(), 4),
             "top": tokenizer.decode([int(logprobs[i].argmax())])} for i, t in enumerate(answer)]


def probe_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.passkey probe`: why the earlier prompt failed in-window needles. For the SmolLM2
    teacher and SWA+sinks (CPU, fp32): each answer token's probability under both prompts, and the accuracy of
    both prompts at the given lengths. Prints a table; writes JSON with --out."""
    import argparse
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blocks.window_attention import restore_attention, swap_to_sliding_window

    from .assets import ensure_smollm2
    from .evaluate import greedy_without_cache

    parser = argparse.ArgumentParser(prog="python -m pipeline.passkey probe", description=probe_main.__doc__)
    parser.add_argument("--lengths", default="512,1024", help="prompt lengths for the accuracy (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=10, help="trials per length (default: %(default)s)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    lengths = tuple(int(n) for n in args.lengths.split(","))
    model_dir = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    (needle_last,) = passkey_prompts(tokenizer, lengths[0], num_trials=1, depths=(1.0,), aligned=False)
    no_cache = greedy_without_cache(model, tokenizer.eos_token_id)  # as `linearize eval` decodes SWA+sinks

    results = {"lengths": list(lengths), "trials": args.trials, "models": {}}
    for name in ("teacher", f"swa{args.window}+{args.sinks}sinks"):
        if name != "teacher":
            swap_to_sliding_window(model, args.window, args.sinks)
        generate = no_cache if name != "teacher" else None
        results["models"][name] = {
            "answer_tokens_plain_prompt": answer_token_probabilities(model, tokenizer, needle_last, aligned=False),
            "accuracy": {form: passkey_accuracy(model, tokenizer, lengths=lengths, num_trials=args.trials,
                                                batch_size=5, generate_fn=generate, aligned=form == "aligned")
                         for form in ("aligned", "plain")}}
        restore_attention(model)
    print(f"\nneedle at depth 1.0, {lengths[0]} tokens, plain prompt: p(answer token) [the model's first choice]")
    for name, r in results["models"].items():
        print(f"  {name:16s} " + "  ".join(f"{t['token']!r}:{t['p']:.2f}[{t['top']!r}]"
                                          for t in r["answer_tokens_plain_prompt"]))
    print("\naccuracy        " + "  ".join(f"{form} {n:>5}" for form in ("aligned", "plain") for n in lengths))
    for name, r in results["models"].items():
        print(f"  {name:16s}" + "  ".join(f"{r['accuracy'][form][str(n)]['accuracy']:>13.2f}"
                                          for form in ("aligned", "plain") for n in lengths))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["probe"]:
        sys.exit("usage: python -m pipeline.passkey probe [--lengths 512,1024] [--trials 10] [--out FILE]")
    sys.exit(probe_main(sys.argv[2:]))
