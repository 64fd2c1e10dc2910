"""The run directory: the only state of a run, on any fsspec URL (local path, memory://, s3://, ...).

Owns the layout of RUN/ (DESIGN.md, "run directory"), atomic writes, and state.json:

    RUN/
      run.yaml            resolved config          plan.json   planner output
      state.json          stage -> pending|running|done (written by the driver only)
      cache/              boundary hidden states (pipeline/cache.py owns what is inside)
      blocks/B{b:03d}/    per-block checkpoints and metrics
      stitched/  finetune/  export/  eval/

Atomicity: a reader must never see half a file. On a local disk and on filesystems with a cheap rename we
write to a temporary name in the same folder and rename it over the target (after fsync on a local disk).
Object stores (s3, gcs, azure) have no rename (fsspec's mv is copy + delete) but a PUT is already
all-or-nothing, so there we write the target directly.

Paths handed to callers are relative to the run directory ("cache/L000/index.json"); RunDir.path()
turns them into paths of its filesystem.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec

STAGES = ("plan", "collect", "transfer", "stitch", "finetune", "export", "eval")
STATUSES = ("pending", "running", "done")
TEMP_MARKER = ".tmp-"
"""Temporary files are named <target>.tmp-<random>; anything with this marker is an unfinished write."""

# Protocols whose writes are all-or-nothing and whose rename is a full copy: write the target directly.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & {"file", "local"})


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data, sync_dir: bool = True) -> None:
    """Write `data` (a bytes-like object, or a list of them written one after the other) to `path` so that a
    reader sees either the old file, no file, or the whole new file. On a local disk the data is fsynced
    before the rename, and the folder after it unless sync_dir=False (when a later write to the same folder
    syncs it)."""
    pieces = data if isinstance(data, list) else [data]
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _protocols(fs) & _OBJECT_STORES:
        fs.pipe_file(path, b"".join(pieces))
        return
    tmp = f"{path}{TEMP_MARKER}{uuid.uuid4().hex[:12]}"
    if is_local(fs):
        # Plain os calls so we can fsync: the rename must not land before the data does.
        with open(tmp, "wb", buffering=0) as f:
            for piece in pieces:
                view = memoryview(piece).cast("B")
                while view:  # a raw write may be partial
                    view = view[f.write(view):]
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if parent and sync_dir:
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return
    fs.pipe_file(tmp, b"".join(pieces))
    fs.mv(tmp, path)


class RunDir:
    """One run directory. `RunDir("runs/x")`, `RunDir("memory://t/run")`, `RunDir("s3://bucket/run")`."""

    def __init__(self, url: str, storage_options: dict | None = None):
        if not isinstance(url, str) or not url:
            raise ValueError(f"run directory: expected a path or fsspec URL, got {url!r}")
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    # ---- layout (relative paths) ----------------------------------------------------------------
    run_yaml = "run.yaml"
    plan_json = "plan.json"
    state_json = "state.json"
    cache_dir = "cache"
    stitched_dir = "stitched"
    finetune_dir = "finetune"
    export_dir = "export"
    eval_dir = "eval"

    @staticmethod
    def block_dir(block: int) -> str:
        if not isinstance(block, int) or block < 0:
            raise ValueError(f"block: expected a block index >= 0, got {block!r}")
        return f"blocks/B{block:03d}"

    def path(self, *parts: str) -> str:
        """Filesystem path of a relative path inside the run directory."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, *parts: str) -> str:
        """fsspec URL of a relative path (to hand to another process)."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.url}/{rel}" if rel else self.url

    # ---- generic I/O ------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes(self, rel: str, data) -> None:
        """Atomic write of bytes (or a list of byte pieces, concatenated)."""
        atomic_write_bytes(self.fs, self.path(rel), data)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_json(self, rel: str, default: Any = ...) -> Any:
        """Parsed JSON at rel; `default` if given and the file does not exist."""
        if default is not ... and not self.exists(rel):
            return default
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly inside a folder; [] if it does not exist."""
        full = self.path(rel)
        if not self.fs.exists(full):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(full, detail=False))

    def remove(self, rel: str, recursive: bool = False) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=recursive)

    # ---- stage state --------------------------------------------------------------------------------
    def state(self) -> dict[str, str]:
        """stage -> status for every known stage (pending when never marked) plus any other marked stage."""
        stored = self.read_json(self.state_json, default={})
        merged = {stage: "pending" for stage in STAGES}
        merged.update(stored.get("stages", {}))
        return merged

    def status(self, stage: str) -> str:
        return self.state().get(stage, "pending")

    def mark(self, stage: str, status: str) -> None:
        """Set one stage's status and rewrite state.json atomically. Only the driver calls this."""
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"stage: expected a stage name such as {STAGES[1]!r}, got {stage!r}")
        if status not in STATUSES:
            raise ValueError(f"status: {status!r} for stage {stage!r} is not one of {list(STATUSES)}")
        stored = self.read_json(self.state_json, default={})
        stages = dict(stored.get("stages", {}))
        stages[stage] = status
        self.write_json(self.state_json, {"stages": stages})

    def is_done(self, stage: str) -> bool:
        return self.status(stage) == "done"
