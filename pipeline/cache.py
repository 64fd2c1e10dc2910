"""The boundary hidden-state cache: sharded, verified, streamed, on any fsspec URL.

A boundary state is the raw residual stream entering decoder layer ℓ (before its input_layernorm; the
reference code stores the normalized input instead, which corrupts layers 2..k of every block: not here),
one row per training sequence, in bf16, with the position ids of each token.

Layout inside a run directory (DESIGN.md):

    RUN/cache/L{layer:03d}/shard-{i:05d}.safetensors     hidden (rows, seq_len, d) bf16, position_ids (rows, seq_len) int64
    RUN/cache/L{layer:03d}/index.json                    per shard: rows, bytes, sha256; layer, seq_len, hidden_size,
                                                         dtype, num_shards, complete
    RUN/cache/{split}/L{layer:03d}/...                   the same for another split (e.g. "validation")

Guarantees:
* Atomic: a shard is written under a temporary name and renamed (rundir.atomic_write_bytes); its index entry
  is written after it. A crash leaves at worst an unindexed file or a temp file, which readers never look
  at; `missing_shards` lists it and the writer redoes it.
* Verified: every read checks size and checksum against the index. A corrupt, truncated or missing shard
  raises CacheCorruptError naming the shard; `verify` lists such shards so the caller regenerates them.
  The checksum (index field `sha256`) is SHA-256 over the SHA-256 digests of the shard's 16 MiB chunks
  (`shard_checksum`): one SHA-256 stream runs at ~0.6-2 GB/s on one core, slower than a disk, while chunks
  hash on several cores at once and overlap with the file I/O.
* Streamed: readers hold one shard at a time (plus at most one batch copied across a shard boundary) and
  yield batches with a resumable CachePosition(shard, row).

Concurrency contract: one writer per (split, layer) at a time (the collect worker of that boundary); any
number of readers.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.rundir import TEMP_MARKER, RunDir, atomic_write_bytes, is_local

INDEX_NAME = "index.json"
HIDDEN_KEY = "hidden"
POSITIONS_KEY = "position_ids"
FORMAT_VERSION = 1
CHECKSUM_CHUNK = 16 * 2**20
CHECKSUM_SCHEME = "sha256 of the concatenated sha256 digests of 16 MiB chunks"
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "I64": torch.int64}
_hash_pool: ThreadPoolExecutor | None = None


class CacheError(RuntimeError):
    """The cache cannot serve a request (incomplete boundary, mismatched shapes)."""


class CacheCorruptError(CacheError):
    """A shard is missing, truncated or fails its checksum. Regenerate it (BoundaryCache.invalidate + rewrite)."""

    def __init__(self, path: str, layer: int, shard: int, reason: str):
        self.path, self.layer, self.shard, self.reason = path, layer, shard, reason
        super().__init__(f"corrupt cache shard {shard} of layer {layer} ({path}): {reason}; "
                         "regenerate it (BoundaryCache.verify lists every bad shard)")


@dataclass(frozen=True, order=True)
class CachePosition:
    """A place in a boundary's row stream: row `row` of shard `shard`. (num_shards, 0) is the end."""

    shard: int = 0
    row: int = 0

    def to_dict(self) -> dict:
        return {"shard": self.shard, "row": self.row}

    @classmethod
    def from_dict(cls, data: dict) -> "CachePosition":
        return cls(shard=int(data["shard"]), row=int(data["row"]))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def encode_shard(hidden: torch.Tensor, position_ids: torch.Tensor, metadata: dict[str, str]) -> list:
    """A safetensors file as two pieces to write one after the other, without copying `hidden`:
    [8-byte header length + JSON header padded to 8 bytes + position_ids (int64, first, so 8-byte aligned),
     the bytes of hidden (bf16)]. safetensors.torch.save would copy through slow per-tensor conversions
    (~70 MB/s on the CI machine); any safetensors reader loads this layout."""
    hidden = hidden.contiguous()
    positions = position_ids.contiguous()
    pos_bytes = positions.numel() * 8
    header = {"__metadata__": metadata,
              POSITIONS_KEY: {"dtype": "I64", "shape": list(positions.shape), "data_offsets": [0, pos_bytes]},
              HIDDEN_KEY: {"dtype": "BF16", "shape": list(hidden.shape),
                           "data_offsets": [pos_bytes, pos_bytes + hidden.numel() * 2]}}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    prefix = struct.pack("<Q", len(header_bytes)) + header_bytes + positions.numpy().tobytes()
    return [prefix, memoryview(hidden.reshape(-1).view(torch.int16).numpy()).cast("B")]


class _ShardBuffer(bytearray):
    """A bytearray that can be weak-referenced, so a reader can count the shards still alive."""


def _new_buffer(size: int):
    """Memory for one shard. On Linux an anonymous mapping with transparent huge pages: reading into fresh
    4 KiB pages costs one page fault each, which halved the read throughput of the GPU machine's disk
    (0.75 vs 1.3 GB/s measured); 2 MiB pages fault 512 times less often. Elsewhere a plain bytearray."""
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
        return buf
    return _ShardBuffer(size)


def _pool() -> ThreadPoolExecutor:
    # hashlib releases the GIL on large buffers, so threads hash chunks on several cores.
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="cache-hash")
    return _hash_pool


def _chunk_digest(chunk) -> bytes:
    return hashlib.sha256(chunk).digest()


def _combine(digests: list[Future]) -> str:
    top = hashlib.sha256()
    for future in digests:
        top.update(future.result())
    return top.hexdigest()


def _parts_digest(parts) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


def _submit_chunks(pieces) -> list[Future]:
    """Hash the byte stream formed by `pieces` (one buffer or a list) in CHECKSUM_CHUNK chunks on the pool;
    a chunk may span two pieces, hashed by successive updates, so no piece is copied."""
    views = [memoryview(p).cast("B") for p in (pieces if isinstance(pieces, list) else [pieces])]
    futures, parts, room = [], [], CHECKSUM_CHUNK
    for view in views:
        pos = 0
        while pos < len(view):
            take = min(room, len(view) - pos)
            parts.append(view[pos:pos + take])
            pos += take
            room -= take
            if room == 0:
                futures.append(_pool().submit(_parts_digest, parts))
                parts, room = [], CHECKSUM_CHUNK
    if parts:
        futures.append(_pool().submit(_parts_digest, parts))
    return futures


def shard_checksum(data) -> str:
    """The index's `sha256` of a shard's bytes (one buffer, or a list of pieces written one after the
    other): SHA-256 of the SHA-256 digests of its 16 MiB chunks (CHECKSUM_SCHEME)."""
    return _combine(_submit_chunks(data))


def _checksum_of_file(fs, path: str) -> tuple[str, int]:
    """Checksum and size of a file, read chunk by chunk (at most a few chunks in memory)."""
    digests: list[Future] = []
    size = 0
    limit = 2 * (os.cpu_count() or 1)
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            digests.append(_pool().submit(_chunk_digest, chunk))
            size += len(chunk)
            if len(digests) > limit:
                digests[-limit].result()  # bound the chunks waiting in memory
    return _combine(digests), size


def _read_and_hash(fs, path: str, size: int):
    """Read a file into one buffer, hashing each chunk on the pool while the next one is read.
    Returns (buffer, checksum, bytes read)."""
    buf = _new_buffer(size)
    view = memoryview(buf)
    digests: list[Future] = []
    filled = 0
    # A local file is read unbuffered (straight into buf); other filesystems through fsspec.
    with (open(path, "rb", buffering=0) if is_local(fs) else fs.open(path, "rb")) as f:
        while filled < size:
            start, end = filled, min(filled + CHECKSUM_CHUNK, size)
            while filled < end:
                n = f.readinto(view[filled:end])
                if not n:
                    break
                filled += n
            if filled < end:
                break
            digests.append(_pool().submit(_chunk_digest, view[start:end]))
    digest = _combine(digests)
    del view
    return buf, digest, filled


def _drop_page_cache(path: str) -> None:
    """Ask the kernel to forget a local file's cached pages, so the next read measures the disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class BoundaryCache:
    """Boundary states of one run directory. `BoundaryCache("runs/x")`, `BoundaryCache(RunDir("memory://t"))`."""

    def __init__(self, run_dir: str | RunDir, split: str = "train"):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        if not split or "/" in split:
            raise ValueError(f"split: expected a name such as 'train' or 'validation', got {split!r}")
        self.split = split

    def layer_dir(self, layer: int) -> str:
        """Relative path of a layer's folder: cache/L007 (train) or cache/validation/L007."""
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer: expected a layer index >= 0, got {layer!r}")
        base = RunDir.cache_dir if self.split == "train" else f"{RunDir.cache_dir}/{self.split}"
        return f"{base}/L{layer:03d}"

    def shard_path(self, layer: int, index: int) -> str:
        return self.run.path(self.layer_dir(layer), shard_name(index))

    def index(self, layer: int) -> dict | None:
        """The layer's index.json, or None if nothing was written yet."""
        return self.run.read_json(f"{self.layer_dir(layer)}/{INDEX_NAME}", default=None)

    def layers(self) -> list[int]:
        """Layers of this split that have an index."""
        base = RunDir.cache_dir if self.split == "train" else f"{RunDir.cache_dir}/{self.split}"
        found = []
        for name in self.run.listdir(base):
            if name.startswith("L") and name[1:].isdigit() and self.index(int(name[1:])) is not None:
                found.append(int(name[1:]))
        return found

    def is_complete(self, layer: int) -> bool:
        index = self.index(layer)
        return bool(index and index.get("complete"))

    def missing_shards(self, layer: int, expected: int) -> list[int]:
        """Shard indices in 0..expected-1 that have no index entry (never written, or lost in a crash)."""
        if expected < 0:
            raise ValueError(f"expected: number of shards must be >= 0, got {expected}")
        entries = (self.index(layer) or {}).get("shards", {})
        return [i for i in range(expected) if str(i) not in entries]

    def verify(self, layer: int) -> list[int]:
        """Indices of indexed shards that are missing, truncated or fail sha256 (reads every byte once)."""
        index = self.index(layer)
        if index is None:
            return []
        bad = []
        for key, entry in sorted(index["shards"].items(), key=lambda kv: int(kv[0])):
            path = self.shard_path(layer, int(key))
            if not self.run.fs.exists(path):
                bad.append(int(key))
                continue
            digest, size = _checksum_of_file(self.run.fs, path)
            if size != entry["bytes"] or digest != entry["sha256"]:
                bad.append(int(key))
        return bad

    def invalidate(self, layer: int, shards: list[int]) -> None:
        """Drop index entries (e.g. the result of verify) so missing_shards reports them and the boundary is
        no longer complete; the caller then rewrites them with a writer."""
        index = self.index(layer)
        if index is None:
            return
        for i in shards:
            index["shards"].pop(str(i), None)
        index["complete"] = False
        self.run.write_json(f"{self.layer_dir(layer)}/{INDEX_NAME}", index)

    def writer(self, layer: int, seq_len: int, hidden_size: int) -> "ShardWriter":
        return ShardWriter(self, layer, seq_len, hidden_size)

    def reader(self, layer: int, allow_incomplete: bool = False) -> "BoundaryReader":
        return BoundaryReader(self, layer, allow_incomplete=allow_incomplete)


class ShardWriter:
    """Writes one boundary's shards. Reopening a layer keeps the shards already written (resume)."""

    def __init__(self, cache: BoundaryCache, layer: int, seq_len: int, hidden_size: int):
        for name, value in (("seq_len", seq_len), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        self.cache, self.layer, self.seq_len, self.hidden_size = cache, layer, seq_len, hidden_size
        self.run = cache.run
        self.dir = cache.layer_dir(layer)
        self.run.makedirs(self.dir)
        index = cache.index(layer)
        if index is None:
            index = {"format": FORMAT_VERSION, "layer": layer, "split": cache.split, "seq_len": seq_len,
                     "hidden_size": hidden_size, "dtype": "bfloat16", "position_dtype": "int64",
                     "checksum": CHECKSUM_SCHEME,
                     "num_shards": None, "complete": False, "shards": {}}
        elif index.get("checksum") != CHECKSUM_SCHEME:
            raise CacheError(f"{self.run.url_of(self.dir)} uses checksum {index.get('checksum')!r}, not "
                             f"{CHECKSUM_SCHEME!r}; delete that folder and collect again")
        elif (index["seq_len"], index["hidden_size"]) != (seq_len, hidden_size):
            raise CacheError(
                f"{self.run.url_of(self.dir)} already holds seq_len {index['seq_len']}, hidden_size "
                f"{index['hidden_size']}; cannot add shards with seq_len {seq_len}, hidden_size {hidden_size}: "
                "use a new run directory or delete that folder")
        self._index = index
        self._remove_temp_files()

    def _remove_temp_files(self) -> None:
        # Leftovers of a crashed write. Safe because a layer has one writer at a time.
        for name in self.run.listdir(self.dir):
            if TEMP_MARKER in name:
                self.run.remove(f"{self.dir}/{name}")

    def write_shard(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Write shard `index`: hidden (rows, seq_len, hidden_size) bf16, position_ids (rows, seq_len) integer.
        Overwrites an existing shard of that index (regeneration). Returns its index entry."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index: expected a shard index >= 0, got {index!r}")
        if not isinstance(hidden, torch.Tensor) or hidden.dtype != torch.bfloat16 or hidden.dim() != 3:
            got = f"{tuple(hidden.shape)} {hidden.dtype}" if isinstance(hidden, torch.Tensor) else type(hidden)
            raise ValueError(f"hidden: expected a bf16 tensor (rows, seq_len, hidden_size), got {got}; "
                             "cast with .to(torch.bfloat16)")
        rows = hidden.shape[0]
        if rows < 1 or tuple(hidden.shape[1:]) != (self.seq_len, self.hidden_size):
            raise ValueError(f"hidden: shape {tuple(hidden.shape)} does not match (rows>=1, seq_len={self.seq_len}, "
                             f"hidden_size={self.hidden_size}) of layer {self.layer}")
        if (not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point
                or position_ids.dtype == torch.bool or tuple(position_ids.shape) != (rows, self.seq_len)):
            got = (f"{tuple(position_ids.shape)} {position_ids.dtype}" if isinstance(position_ids, torch.Tensor)
                   else type(position_ids))
            raise ValueError(f"position_ids: expected an integer tensor of shape ({rows}, {self.seq_len}), got {got}")
        tensors = {HIDDEN_KEY: hidden.detach().to("cpu").contiguous(),
                   POSITIONS_KEY: position_ids.detach().to("cpu", torch.int64).contiguous()}
        pieces = encode_shard(tensors[HIDDEN_KEY], tensors[POSITIONS_KEY],
                              {"layer": str(self.layer), "shard": str(index)})
        digests = _submit_chunks(pieces)  # hashed on other cores while this thread writes the file
        # No directory fsync here: the index write below syncs the same folder, covering both renames.
        atomic_write_bytes(self.run.fs, self.cache.shard_path(self.layer, index), pieces, sync_dir=False)
        entry = {"rows": rows, "bytes": sum(len(p) for p in pieces), "sha256": _combine(digests)}
        # The index entry goes in after the shard is durable: an entry always points at a whole file.
        self._index["shards"][str(index)] = entry
        self._write_index()
        return entry

    def mark_complete(self, num_shards: int) -> None:
        """Declare the boundary finished with shards 0..num_shards-1; refuses if any is missing."""
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards: expected a positive integer, got {num_shards!r}")
        missing = [i for i in range(num_shards) if str(i) not in self._index["shards"]]
        if missing:
            raise CacheError(f"layer {self.layer}: cannot mark complete, shards {missing[:10]}"
                             f"{'...' if len(missing) > 10 else ''} of {num_shards} are not written")
        extra = [int(k) for k in self._index["shards"] if int(k) >= num_shards]
        if extra:
            raise CacheError(f"layer {self.layer}: shards {sorted(extra)[:10]} exist beyond num_shards={num_shards}")
        self._index["num_shards"] = num_shards
        self._index["complete"] = True
        self._write_index()

    def _write_index(self) -> None:
        self.run.write_json(f"{self.dir}/{INDEX_NAME}", self._index)


class BoundaryReader:
    """Streams one boundary shard by shard, verifying each shard before its rows are used."""

    def __init__(self, cache: BoundaryCache, layer: int, allow_incomplete: bool = False):
        self.cache, self.layer = cache, layer
        index = cache.index(layer)
        where = cache.run.url_of(cache.layer_dir(layer))
        if index is None:
            raise CacheError(f"layer {layer}: no cache at {where}; run the collect stage first")
        if index.get("checksum") != CHECKSUM_SCHEME:
            raise CacheError(f"layer {layer}: {where} uses checksum {index.get('checksum')!r}, not "
                             f"{CHECKSUM_SCHEME!r}; delete it and collect again")
        if not index.get("complete") and not allow_incomplete:
            raise CacheError(f"layer {layer}: the cache at {where} is incomplete ({len(index['shards'])} shards "
                             "written); finish collection or pass allow_incomplete=True")
        self.index = index
        self.seq_len, self.hidden_size = index["seq_len"], index["hidden_size"]
        # An incomplete boundary is read up to its first gap: rows must stay in order for resume positions.
        count = index["num_shards"] if index.get("complete") else 0
        while not index.get("complete") and str(count) in index["shards"]:
            count += 1
        self.num_shards = count
        self.shard_rows = [index["shards"][str(i)]["rows"] for i in range(count)]
        self.num_rows = sum(self.shard_rows)
        self._live_lock = threading.Lock()
        self.live_shards = 0
        self.peak_live_shards = 0
        """Shard buffers alive at once (instrumentation for the streaming guarantee)."""

    def _on_free(self) -> None:
        with self._live_lock:
            self.live_shards -= 1

    def read_shard(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, position_ids) of one shard after checking size and sha256; views on one buffer."""
        if not 0 <= index < self.num_shards:
            raise ValueError(f"index: shard {index} is outside 0..{self.num_shards - 1} of layer {self.layer}")
        entry = self.index["shards"][str(index)]
        fs, path = self.cache.run.fs, self.cache.shard_path(self.layer, index)
        if not fs.exists(path):
            raise CacheCorruptError(path, self.layer, index, "file is missing")
        size = fs.size(path)
        if size != entry["bytes"]:
            raise CacheCorruptError(path, self.layer, index,
                                    f"{'truncated' if size < entry['bytes'] else 'wrong size'}: {size} bytes, "
                                    f"index says {entry['bytes']}")
        buf, digest, filled = _read_and_hash(fs, path, size)
        if filled != entry["bytes"]:
            raise CacheCorruptError(path, self.layer, index, f"truncated while reading: {filled} bytes")
        if digest != entry["sha256"]:
            raise CacheCorruptError(path, self.layer, index, "sha256 mismatch (contents changed since written)")
        with self._live_lock:
            self.live_shards += 1
            self.peak_live_shards = max(self.peak_live_shards, self.live_shards)
        weakref.finalize(buf, self._on_free)
        tensors = self._decode(buf, path, index, entry["rows"])
        return tensors[HIDDEN_KEY], tensors[POSITIONS_KEY]

    def _decode(self, buf, path: str, index: int, rows: int) -> dict[str, torch.Tensor]:
        """Zero-copy safetensors decode (the tensors are views on buf, so one shard costs one shard of RAM)."""
        (header_len,) = struct.unpack("<Q", bytes(buf[:8]))
        header = json.loads(bytes(buf[8:8 + header_len]))
        expected = {HIDDEN_KEY: ("BF16", [rows, self.seq_len, self.hidden_size]),
                    POSITIONS_KEY: ("I64", [rows, self.seq_len])}
        out = {}
        for name, (dtype, shape) in expected.items():
            info = header.get(name)
            if info is None or info["dtype"] != dtype or info["shape"] != shape:
                raise CacheCorruptError(path, self.layer, index, f"tensor {name!r} is {info}, expected {dtype} {shape}")
            begin, end = info["data_offsets"]
            count = math.prod(shape)
            torch_dtype = _SAFETENSORS_DTYPES[dtype]
            if end - begin != count * torch.empty((), dtype=torch_dtype).element_size():
                raise CacheCorruptError(path, self.layer, index, f"tensor {name!r} has inconsistent offsets")
            out[name] = torch.frombuffer(buf, dtype=torch_dtype, count=count, offset=8 + header_len + begin).view(shape)
        return out

    def _shards(self, first: int, prefetch: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Verified shards first..num_shards-1; with prefetch, shard i+1 is read (and hashed) by a background
        thread while shard i is consumed, so at most two shards are alive."""
        if not prefetch:
            for index in range(first, self.num_shards):
                yield self.read_shard(index)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-prefetch")
        try:
            upcoming = pool.submit(self.read_shard, first) if first < self.num_shards else None
            for index in range(first, self.num_shards):
                current = upcoming.result()
                upcoming = pool.submit(self.read_shard, index + 1) if index + 1 < self.num_shards else None
                yield current
                current = None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def iter_rows(self, start: CachePosition | None = None, batch_size: int = 1, prefetch: bool = False
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, CachePosition]]:
        """Yield (hidden (b, seq_len, d) bf16, position_ids (b, seq_len) int64, position) in stored order.

        `position` is where the stream continues after this batch: save it with a checkpoint and pass it
        back as `start` to resume. A batch may span two shards (its rows are copied); only the last batch
        may be short. The batches yielded just before the next shard loads are copies; others are views, so
        copy them (e.g. .to(device)) if you keep them beyond the next iteration. One shard is held at a time;
        with prefetch=True the next one is read meanwhile (two shards held, reads overlap compute).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
        pos = start or CachePosition()
        at_end = pos == CachePosition(self.num_shards, 0)
        if not at_end and not (0 <= pos.shard < self.num_shards and 0 <= pos.row < self.shard_rows[pos.shard]):
            raise ValueError(f"start: {pos} is not a row of layer {self.layer} "
                             f"({self.num_shards} shards, rows per shard {self.shard_rows[:4]}...)")
        pending_h: list[torch.Tensor] = []
        pending_p: list[torch.Tensor] = []
        pending = 0
        shard, row = pos.shard, pos.row
        for hidden, positions in self._shards(shard, prefetch):
            rows = hidden.shape[0]
            while row < rows:
                take = min(batch_size - pending, rows - row)
                h, p = hidden[row:row + take], positions[row:row + take]
                row += take
                ends_shard = row == rows
                nxt = CachePosition(shard + 1, 0) if ends_shard else CachePosition(shard, row)
                if rows - row < batch_size:
                    # The next shard is loaded before the next yield: copy this batch (the shard's last whole
                    # batch, or its tail) so that a caller holding it does not keep this shard alive.
                    h, p = h.clone(), p.clone()
                if pending == 0 and take == batch_size:
                    yield h, p, nxt
                    continue
                pending_h.append(h)
                pending_p.append(p)
                pending += take
                if pending == batch_size:
                    yield torch.cat(pending_h), torch.cat(pending_p), nxt
                    pending_h, pending_p, pending = [], [], 0
            hidden = positions = h = p = None  # release the shard before reading the next one
            shard, row = shard + 1, 0
        if pending:
            yield torch.cat(pending_h), torch.cat(pending_p), CachePosition(self.num_shards, 0)


# --------------------------------------------------------------------------------------------------
# Throughput: the cache against the disk's own sequential speed (called by GPU benchmark scripts).


def disk_throughput(directory: str, total_bytes: int = 512 * 2**20, block_bytes: int = 16 * 2**20) -> dict:
    """Sequential write (with fsync) and read (page cache dropped) of one temp file in a local directory.
    Returns {'write_Bps', 'read_Bps', 'bytes'}."""
    if total_bytes < block_bytes:
        raise ValueError(f"total_bytes: {total_bytes} is smaller than block_bytes {block_bytes}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"linearize-disk-probe{TEMP_MARKER}{uuid.uuid4().hex[:8]}")
    block = os.urandom(block_bytes)  # incompressible, so a compressing filesystem cannot flatter the number
    blocks = total_bytes // block_bytes
    try:
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            for _ in range(blocks):
                f.write(block)
            os.fsync(f.fileno())
        write_s = time.perf_counter() - t0
        _drop_page_cache(path)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(block_bytes):
                pass
        read_s = time.perf_counter() - t0
    finally:
        if os.path.exists(path):
            os.remove(path)
    written = blocks * block_bytes
    return {"write_Bps": written / write_s, "read_Bps": written / read_s, "bytes": written}


def cache_throughput(run_dir_url: str, total_bytes: int = 512 * 2**20, shard_bytes: int = 128 * 2**20,
                     seq_len: int = 1024, hidden_size: int = 4096, layer: int = 0, batch_size: int = 8,
                     prefetch: bool = True) -> dict:
    """Write then stream-read (in batches of `batch_size` rows, as training does) a synthetic boundary through
    BoundaryCache, checksums, atomic renames and index updates included. Returns {'write_Bps', 'read_Bps',
    'bytes', 'shards'}; the boundary is deleted afterwards."""
    row_bytes = seq_len * hidden_size * 2
    rows_per_shard = max(1, shard_bytes // row_bytes)
    num_shards = max(1, total_bytes // (rows_per_shard * row_bytes))
    generator = torch.Generator().manual_seed(0)
    # Random bits (not zeros): bf16 values drawn as int16 so generation does not dominate on a CPU.
    hidden = torch.randint(-2**15, 2**15, (rows_per_shard, seq_len, hidden_size), dtype=torch.int16,
                           generator=generator).view(torch.bfloat16)
    positions = torch.arange(seq_len, dtype=torch.int64).expand(rows_per_shard, seq_len)
    cache = BoundaryCache(run_dir_url)
    writer = cache.writer(layer, seq_len, hidden_size)
    t0 = time.perf_counter()
    for i in range(num_shards):
        hidden.view(torch.int16)[0, 0, 0] = i  # every shard differs
        writer.write_shard(i, hidden, positions)
    writer.mark_complete(num_shards)
    write_s = time.perf_counter() - t0
    if is_local(cache.run.fs):
        for i in range(num_shards):
            _drop_page_cache(cache.shard_path(layer, i))
    reader = cache.reader(layer)
    t0 = time.perf_counter()
    for _ in reader.iter_rows(batch_size=batch_size, prefetch=prefetch):
        pass
    read_s = time.perf_counter() - t0
    cache.run.remove(cache.layer_dir(layer), recursive=True)
    total = reader.num_rows * row_bytes
    return {"write_Bps": total / write_s, "read_Bps": total / read_s, "bytes": total, "shards": num_shards}
