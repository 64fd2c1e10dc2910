"""Boundary cache: bitwise round trip, integrity (corrupt, truncated, partial writes), streaming, resume."""

import hashlib
import json
import uuid

import pytest
import torch
from safetensors.torch import load as safetensors_load

from pipeline.cache import (BoundaryCache, CacheCorruptError, CacheError, CachePosition, cache_throughput,
                            disk_throughput, shard_checksum, shard_name)
from pipeline.rundir import TEMP_MARKER, RunDir

SEQ, D = 8, 16
ROWS = [5, 5, 3]  # three shards; the last one short


@pytest.fixture(params=["local", "memory"])
def run_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"memory://cache-{uuid.uuid4().hex}/run"


def make_shards(seed=0):
    g = torch.Generator().manual_seed(seed)
    shards = []
    offset = 0
    for rows in ROWS:
        hidden = torch.randn(rows, SEQ, D, generator=g).to(torch.bfloat16)
        hidden[0, 0, :3] = torch.tensor([float("inf"), -0.0, 1e-40])  # odd bf16 values survive bitwise
        positions = torch.arange(SEQ).expand(rows, SEQ) + offset  # distinct per shard, to check order
        offset += 100
        shards.append((hidden, positions))
    return shards


def write_all(cache, layer=3, shards=None, complete=True):
    shards = shards or make_shards()
    writer = cache.writer(layer, SEQ, D)
    for i, (h, p) in enumerate(shards):
        writer.write_shard(i, h, p)
    if complete:
        writer.mark_complete(len(shards))
    return shards


def tree_sha256(data, chunk=16 * 2**20):
    """The documented checksum, computed independently: sha256 over the sha256 digests of 16 MiB chunks."""
    return hashlib.sha256(b"".join(hashlib.sha256(data[i:i + chunk]).digest()
                                   for i in range(0, len(data), chunk))).hexdigest()


def test_checksum_covers_every_chunk():
    data = bytearray(torch.randint(0, 256, (40 * 2**20 + 5,), dtype=torch.uint8).numpy().tobytes())
    before = shard_checksum(data)
    assert before == tree_sha256(bytes(data))
    data[-1] ^= 1  # one bit in the short last chunk
    assert shard_checksum(data) != before and shard_checksum(data) == tree_sha256(bytes(data))
    # The writer hashes the file as pieces (header + positions, then hidden): same checksum as one buffer.
    pieces = [bytes(data[:1000]), memoryview(data)[1000:16 * 2**20 + 7], memoryview(data)[16 * 2**20 + 7:]]
    assert shard_checksum(pieces) == shard_checksum(data)


def bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def test_round_trip_bitwise_and_index(run_url):
    cache = BoundaryCache(run_url)
    shards = write_all(cache)
    index = cache.index(3)
    assert index["complete"] and index["num_shards"] == 3
    assert (index["layer"], index["seq_len"], index["hidden_size"], index["dtype"]) == (3, SEQ, D, "bfloat16")
    fs = cache.run.fs
    for i, rows in enumerate(ROWS):
        entry = index["shards"][str(i)]
        data = fs.cat_file(cache.shard_path(3, i))
        assert entry == {"rows": rows, "bytes": len(data), "sha256": tree_sha256(data)}
        standard = safetensors_load(data)  # the hand-written encoding is a valid safetensors file
        assert torch.equal(bits(standard["hidden"]), bits(shards[i][0]))
        assert torch.equal(standard["position_ids"], shards[i][1])
    assert cache.run.listdir("cache/L003") == sorted(["index.json"] + [shard_name(i) for i in range(3)])
    reader = cache.reader(3)
    assert (reader.num_shards, reader.num_rows) == (3, sum(ROWS))
    for i, (h, p) in enumerate(shards):
        got_h, got_p = reader.read_shard(i)
        assert got_h.dtype == torch.bfloat16 and got_p.dtype == torch.int64
        assert torch.equal(bits(got_h), bits(h)) and torch.equal(got_p, p)
    assert cache.verify(3) == [] and cache.is_complete(3) and cache.layers() == [3]


def test_corrupt_byte_is_named_reported_and_regenerated(run_url):
    cache = BoundaryCache(run_url)
    shards = write_all(cache)
    path = cache.shard_path(3, 1)
    data = bytearray(cache.run.fs.cat_file(path))
    data[-7] ^= 0x01  # one bit of one hidden value
    cache.run.fs.pipe_file(path, bytes(data))
    with pytest.raises(CacheCorruptError, match=r"shard 1 of layer 3.*sha256") as err:
        cache.reader(3).read_shard(1)
    assert err.value.shard == 1 and err.value.path == path
    with pytest.raises(CacheCorruptError):  # the streaming reader never yields the bad rows either
        list(cache.reader(3).iter_rows(batch_size=4))
    assert cache.verify(3) == [1]
    cache.invalidate(3, [1])
    assert not cache.is_complete(3) and cache.missing_shards(3, 3) == [1]
    writer = cache.writer(3, SEQ, D)
    writer.write_shard(1, *shards[1])
    writer.mark_complete(3)
    assert cache.verify(3) == []
    assert torch.equal(bits(cache.reader(3).read_shard(1)[0]), bits(shards[1][0]))


def test_truncated_and_missing_shards(run_url):
    cache = BoundaryCache(run_url)
    write_all(cache)
    fs = cache.run.fs
    fs.pipe_file(cache.shard_path(3, 0), fs.cat_file(cache.shard_path(3, 0))[:100])
    fs.rm(cache.shard_path(3, 2))
    reader = cache.reader(3)
    with pytest.raises(CacheCorruptError, match=r"shard 0 .*truncated: 100 bytes"):
        reader.read_shard(0)
    with pytest.raises(CacheCorruptError, match=r"shard 2 .*missing"):
        reader.read_shard(2)
    assert cache.verify(3) == [0, 2]


def test_partial_write_is_invisible_and_redone(run_url):
    cache = BoundaryCache(run_url)
    shards = make_shards()
    write_all(cache, shards=shards[:2], complete=False)
    # A crash while writing shard 2: its temporary file holds half the bytes, there is no index entry.
    fs = cache.run.fs
    tmp = cache.shard_path(3, 2) + f"{TEMP_MARKER}dead"
    fs.pipe_file(tmp, b"\x00" * 50)
    assert cache.missing_shards(3, 3) == [2]
    with pytest.raises(CacheError, match="incomplete"):
        cache.reader(3)
    partial = cache.reader(3, allow_incomplete=True)
    assert (partial.num_shards, partial.num_rows) == (2, 10)
    # A crash after the rename but before the index entry: the file exists, the index does not know it.
    fs.pipe_file(cache.shard_path(3, 2), b"garbage")
    assert cache.missing_shards(3, 3) == [2]
    writer = cache.writer(3, SEQ, D)  # reopening removes the leftover temp file and keeps shards 0, 1
    assert not fs.exists(tmp)
    with pytest.raises(CacheError, match="not written"):
        writer.mark_complete(3)
    writer.write_shard(2, *shards[2])
    writer.mark_complete(3)
    rows = torch.cat([h for h, _, _ in cache.reader(3).iter_rows(batch_size=4)])
    assert torch.equal(bits(rows), bits(torch.cat([h for h, _ in shards])))


def test_streaming_holds_one_shard_and_resume_matches(run_url):
    cache = BoundaryCache(run_url)
    shards = write_all(cache)
    all_h = torch.cat([h for h, _ in shards])
    all_p = torch.cat([p for _, p in shards])

    reader = cache.reader(3)
    batches = []
    for h, p, pos in reader.iter_rows(batch_size=3):  # batches of 3 cross the 5-row shard boundaries
        batches.append((h.clone(), p.clone(), pos))  # h, p stay referenced while the next batch is made
    assert reader.peak_live_shards == 1
    assert [len(b[0]) for b in batches] == [3, 3, 3, 3, 1]
    prefetching = cache.reader(3)
    prefetched = [(h.clone(), pos) for h, _, pos in prefetching.iter_rows(batch_size=3, prefetch=True)]
    assert prefetching.peak_live_shards <= 2  # at most the current shard and the next one
    assert torch.equal(bits(torch.cat([h for h, _ in prefetched])), bits(all_h))
    assert [pos for _, pos in prefetched] == [b[2] for b in batches]
    assert torch.equal(bits(torch.cat([b[0] for b in batches])), bits(all_h))
    assert torch.equal(torch.cat([b[1] for b in batches]), all_p)
    assert batches[-1][2] == CachePosition(3, 0)

    # Interrupt after two batches, save the position as a checkpoint would (JSON), resume in a new reader.
    saved = json.loads(json.dumps(batches[1][2].to_dict()))
    assert CachePosition.from_dict(saved) == CachePosition(1, 1)
    resumed = list(cache.reader(3).iter_rows(start=CachePosition.from_dict(saved), batch_size=3))
    assert [len(h) for h, _, _ in resumed] == [3, 3, 1]
    assert torch.equal(bits(torch.cat([h for h, _, _ in resumed])), bits(all_h[6:]))
    assert [pos for _, _, pos in resumed] == [b[2] for b in batches[2:]]
    assert list(cache.reader(3).iter_rows(start=CachePosition(3, 0))) == []
    with pytest.raises(ValueError, match="start"):
        list(cache.reader(3).iter_rows(start=CachePosition(2, 3)))  # shard 2 has rows 0..2


def test_bad_inputs_name_the_argument(run_url):
    cache = BoundaryCache(run_url)
    writer = cache.writer(0, SEQ, D)
    with pytest.raises(ValueError, match="hidden"):
        writer.write_shard(0, torch.zeros(2, SEQ, D), torch.zeros(2, SEQ, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden"):
        writer.write_shard(0, torch.zeros(2, SEQ + 1, D, dtype=torch.bfloat16), torch.zeros(2, SEQ + 1))
    with pytest.raises(ValueError, match="position_ids"):
        writer.write_shard(0, torch.zeros(2, SEQ, D, dtype=torch.bfloat16), torch.zeros(2, SEQ))
    writer.write_shard(0, torch.zeros(2, SEQ, D, dtype=torch.bfloat16), torch.zeros(2, SEQ, dtype=torch.int32))
    with pytest.raises(CacheError, match="already holds seq_len 8"):
        cache.writer(0, SEQ * 2, D)
    with pytest.raises(CacheError, match="collect"):
        cache.reader(7)
    with pytest.raises(ValueError, match="layer"):
        cache.layer_dir(-1)


def test_validation_split_has_its_own_folder(run_url):
    train, val = BoundaryCache(run_url), BoundaryCache(RunDir(run_url), split="validation")
    write_all(val, layer=0)
    assert val.layer_dir(0) == "cache/validation/L000"
    assert val.is_complete(0) and not train.is_complete(0) and train.layers() == []


def test_throughput_helpers(tmp_path, run_url):
    result = cache_throughput(run_url, total_bytes=2 * 2**20, shard_bytes=2**19, seq_len=64, hidden_size=256)
    assert result["shards"] == 4 and result["bytes"] == 2 * 2**20
    assert result["write_Bps"] > 0 and result["read_Bps"] > 0
    assert BoundaryCache(run_url).index(0) is None  # cleaned up
    disk = disk_throughput(str(tmp_path), total_bytes=4 * 2**20, block_bytes=2**20)
    assert disk["bytes"] == 4 * 2**20 and disk["write_Bps"] > 0 and disk["read_Bps"] > 0
    assert not [p for p in tmp_path.iterdir() if TEMP_MARKER in p.name]  # the probe file is removed
