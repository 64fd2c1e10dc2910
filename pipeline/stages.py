"""The block-wise stages of attention transfer as plain functions over a run directory: collect, transfer, stitch.

Each function reads everything it needs from the run directory (run.yaml, plan.json, the cache), writes its
results there, and can be killed at any moment and called again: it continues from what the directory holds
and ends with the same bytes as an undisturbed call (bitwise on CPU at a fixed thread count). They never
import Ray: cluster/blocks.py runs collect_boundary and transfer_block as Ray tasks, the driver
(pipeline/run.py) calls stitch itself, and a test may call any of them directly.

Blocks and boundaries (plan.json "blocks": [[start, end), ...], k layers each, the last may be shorter):

    boundary b = the raw residual stream entering layer start_b (before its input_layernorm), bf16, with
    position ids, for every training row (cache split "train") and every validation row ("validation").
    boundary 0 = the token embeddings: collect_boundary(0) embeds the token rows (cache/tokens/).
    boundary b > 0: collect_boundary(b) reads boundary b-1, runs the teacher's layers of block b-1 (only those
    layers are loaded) and writes boundary b, shard by shard (shard i of every boundary holds the same rows).

Token rows (cache/tokens/{split}.safetensors, int32, written once by the driver with write_tokens):
real weights: ShareGPT packed with the model's tokenizer (pipeline/data.py), validation = its held-out split.
Random weights (`model.weights: random`, used by the tests) have no tokenizer: rows of uniform random token
ids drawn from a generator seeded by (seed, split), so runs stay deterministic and need no download.

Per block (RUN/blocks/B{b:03d}/): checkpoint.pt (BlockTrainer state incl. optimizer and RNG, the data
position and counters; every transfer.checkpoint_every optimizer steps, atomic), metrics.jsonl (one line per
optimizer step and per evaluation; lines past the checkpoint are dropped on resume, so a resumed block's file
equals an undisturbed one's except for timings), final.safetensors (the best φq, φk, γ by validation loss,
global layer keys) and result.json (written last: the block is done).

Fault injection for tests (never set in production): the environment variable LINEARIZE_FAULT, read by the
driver and handed to the tasks, holds `;`-separated specs `STAGE[:block=B][:exit_after=N][:delay=S]`:
exit_after makes the worker os._exit(1) once (a marker in RUN/faults/ stops it from firing again) right
after its N-th micro-step (transfer) or N-th written shard (collect); delay sleeps S seconds after each.
`finetune:exit_after=N[:rank=R]` (parsed here too) is stage 2's: pipeline/finetune.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from blocks.convert import AttentionSettings, convert_layers
from blocks.transfer import BlockTrainer, TransferSettings

from .cache import BoundaryCache, CacheCorruptError, CachePosition
from .config import ModelConfig, RunConfig, resolve_run_config
from .rundir import TEMP_MARKER, RunDir, is_local

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
TOKENS_KEY = "input_ids"
CHECKPOINT = "checkpoint.pt"
FINAL = "final.safetensors"
RESULT = "result.json"
METRICS = "metrics.jsonl"
# The stitch stage's contract with stage 2 (pipeline/finetune.py reads the same two paths).
STITCHED_WEIGHTS = "stitched/hybrid.safetensors"
STITCHED_META = "stitched/stitched.json"
TRANSFER_MSE_JSON = "eval/transfer_mse.json"
TRANSFER_MSE_PNG = "eval/transfer_mse.png"
FAULT_ENV = "LINEARIZE_FAULT"
COLLECT_TOKENS_PER_FORWARD = 16384
"""Rows per teacher forward in collect: about this many tokens (no gradients, so larger than a micro-batch)."""


def tokens_path(split: str) -> str:
    return f"{RunDir.cache_dir}/tokens/{split}.safetensors"


# --------------------------------------------------------------------------------------------------
# The run as the stages see it


@dataclass
class RunContext:
    run: RunDir
    config: RunConfig
    plan: dict

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self.plan["blocks"]]

    @property
    def shard_rows(self) -> int:
        return int(self.plan["shard_rows"])

    def rows(self, split: str) -> int:
        return int(self.plan["splits"][split]["rows"])

    def num_shards(self, split: str) -> int:
        return int(self.plan["splits"][split]["shards"])

    def shard_range(self, split: str, shard: int) -> tuple[int, int]:
        first = shard * self.shard_rows
        return first, min(first + self.shard_rows, self.rows(split))

    def boundary_layer(self, boundary: int) -> int:
        """The layer whose input boundary `boundary` is (the first layer of block `boundary`)."""
        return self.blocks[boundary][0]

    @property
    def converted_layers(self) -> list[int]:
        return self.config.converted_layers


def read_run_config(run: RunDir) -> RunConfig:
    """RUN/run.yaml as a RunConfig."""
    if not run.exists(RunDir.run_yaml):
        raise FileNotFoundError(f"{run.url_of(RunDir.run_yaml)} does not exist; start the run with "
                                "`linearize run CONFIG --run-dir RUN`")
    return resolve_run_config(yaml.safe_load(run.read_text(RunDir.run_yaml)))


def load_context(run_url: str | RunDir) -> RunContext:
    run = run_url if isinstance(run_url, RunDir) else RunDir(run_url)
    config = read_run_config(run)
    if not run.exists(RunDir.plan_json):
        raise FileNotFoundError(f"{run.url_of(RunDir.plan_json)} does not exist; the plan stage must run first "
                                f"(`linearize resume {run.url}`)")
    return RunContext(run, config, run.read_json(RunDir.plan_json))


def split_rows(config: RunConfig) -> dict[str, int]:
    """Rows per split: one epoch of transfer.train_tokens in sequences of data.seq_len (rounded up, as the
    planner counts them), and data.validation_sequences."""
    return {"train": math.ceil(config.transfer.train_tokens / config.data.seq_len),
            "validation": config.data.validation_sequences}


def attention_settings(config: RunConfig) -> AttentionSettings:
    a = config.attention
    return AttentionSettings(window_size=a.window_size, window_kind=a.window_kind, feature_dim=a.feature_dim,
                             gamma_init=a.gamma_init, feature_dtype=a.feature_dtype)


def _setup_worker(device: str, threads: int | None) -> torch.dtype:
    """Threads and compute dtype of a worker: bf16 on a GPU, fp32 on a CPU (bf16 matmuls are emulated there)."""
    if threads:
        torch.set_num_threads(threads)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device: {device!r}; use 'cpu' or 'cuda'")
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()  # a Ray worker process runs many tasks: count this one's peak only
    return torch.float32 if device == "cpu" else torch.bfloat16


def peak_gpu_bytes(device: str) -> int | None:
    """The task's peak of allocated GPU memory (torch's allocator, not the CUDA context), None on CPU."""
    return None if device == "cpu" else int(torch.cuda.max_memory_allocated())


def _no_progress(**_: Any):
    return _NullBar()


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: Callable | None, total: int, desc: str, position: int, done: int):
    """A progress bar from `progress` (tqdm or Ray's tqdm, which has no `initial`) started at `done`."""
    if progress is None:
        from tqdm.auto import tqdm as progress
    bar = progress(total=total, desc=desc, position=position)
    if done:
        bar.update(done)
    return bar


# --------------------------------------------------------------------------------------------------
# Fault injection (tests only)


@dataclass(frozen=True)
class Fault:
    stage: str
    block: int | None = None
    exit_after: int | None = None
    delay: float = 0.0
    rank: int = 0
    """finetune only: the DeepSpeed rank that kills itself (pipeline/finetune.py)."""

    def applies(self, stage: str, block: int) -> bool:
        return self.stage == stage and (self.block is None or self.block == block)


FAULT_FIELDS = {"collect": ("block", "exit_after", "delay"), "transfer": ("block", "exit_after", "delay"),
                "finetune": ("exit_after", "rank")}
"""The fields each stage's faults accept (finetune: exit_after = the optimizer step after which rank `rank` dies)."""


def parse_faults(spec: str | None) -> tuple[Fault, ...]:
    """'transfer:block=1:exit_after=5;collect:delay=0.1;finetune:exit_after=10:rank=1' -> Faults (see the module
    docstring; the finetune items are pipeline/finetune.py's)."""
    faults = []
    for item in filter(None, (part.strip() for part in (spec or "").split(";"))):
        stage, *fields = item.split(":")
        if stage not in FAULT_FIELDS:
            raise ValueError(f"{FAULT_ENV}: stage {stage!r} in {item!r} is not one of {sorted(FAULT_FIELDS)}")
        values: dict[str, Any] = {}
        for field in fields:
            key, _, value = field.partition("=")
            if key not in FAULT_FIELDS[stage]:
                raise ValueError(f"{FAULT_ENV}: unknown field {key!r} in {item!r}; {stage} takes "
                                 f"{', '.join(f + '=' for f in FAULT_FIELDS[stage])}")
            try:
                values[key] = float(value) if key == "delay" else int(value)
            except ValueError:
                raise ValueError(f"{FAULT_ENV}: {field!r} in {item!r} needs a number") from None
        if stage == "finetune" and "exit_after" not in values:
            raise ValueError(f"{FAULT_ENV}: {item!r} has no exit_after=N; e.g. finetune:exit_after=10:rank=1")
        faults.append(Fault(stage, **values))
    return tuple(faults)


def _fault_point(run: RunDir, faults: tuple[Fault, ...], stage: str, block: int, count: int) -> None:
    for fault in faults:
        if not fault.applies(stage, block):
            continue
        if fault.delay:
            time.sleep(fault.delay)
        if fault.exit_after == count:
            marker = f"faults/{stage}-B{block:03d}-{count}.fired"
            if not run.exists(marker):
                run.write_text(marker, f"pid {os.getpid()}\n")
                logger.warning("fault injection: %s block %d exits after %d", stage, block, count)
                os._exit(1)


# --------------------------------------------------------------------------------------------------
# Token rows (driver side)


def _split_seed(seed: int, split: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"tokens/{split}".encode())) % (2**63 - 1)


def token_rows(config: RunConfig, split: str) -> torch.Tensor:
    """(rows, seq_len) int64 token ids of a split (see the module docstring for random-weight models)."""
    from .models import load_tokenizer, model_directory

    rows, seq_len = split_rows(config)[split], config.data.seq_len
    if model_directory(config.model) is None:
        generator = torch.Generator().manual_seed(_split_seed(config.seed, split))
        return torch.randint(0, config.model.vocab_size, (rows, seq_len), generator=generator)
    from .data import packed_training_sequences

    return packed_training_sequences(load_tokenizer(config.model), seq_len, rows, split=split, seed=config.seed)


def _tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


def read_tokens(run: RunDir, split: str, rows: int | None = None, seq_len: int | None = None) -> torch.Tensor:
    """The stored token rows (int64), checked against their sha256 and, if given, their shape."""
    rel = tokens_path(split)
    if not run.exists(rel):
        raise FileNotFoundError(f"{run.url_of(rel)} does not exist; the driver writes it before collecting")
    data = run.read_bytes(rel)
    try:
        tokens = load_safetensors_bytes(data)[TOKENS_KEY]
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    except Exception as error:  # truncated or garbage bytes: safetensors raises several types
        raise CacheCorruptError(run.path(rel), -1, 0, f"unreadable token file ({error})") from None
    if metadata.get("sha256") != _tokens_digest(tokens):
        raise CacheCorruptError(run.path(rel), -1, 0, "token rows fail their sha256")
    if (rows, seq_len) != (None, None) and tuple(tokens.shape) != (rows, seq_len):
        raise CacheCorruptError(run.path(rel), -1, 0, f"token rows have shape {tuple(tokens.shape)}, the plan "
                                                      f"expects ({rows}, {seq_len})")
    return tokens.to(torch.int64)


def write_tokens(run: RunDir, config: RunConfig, tokens: dict[str, torch.Tensor] | None = None) -> None:
    """Write cache/tokens/{split}.safetensors for every split unless a valid file of the right shape is there.
    `tokens` (split -> rows) overrides token_rows (the GPU benchmark brings rows tokenized elsewhere)."""
    expected = split_rows(config)
    for split in SPLITS:
        try:
            read_tokens(run, split, expected[split], config.data.seq_len)
            continue
        except (FileNotFoundError, CacheCorruptError):
            pass
        rows = tokens[split] if tokens else token_rows(config, split)
        if tuple(rows.shape) != (expected[split], config.data.seq_len):
            raise ValueError(f"tokens[{split!r}]: shape {tuple(rows.shape)}, expected "
                             f"({expected[split]}, {config.data.seq_len}) for this config")
        stored = rows.to(torch.int32).contiguous()  # every vocabulary here is far below 2**31
        metadata = {"split": split, "sha256": _tokens_digest(stored), "seed": str(config.seed)}
        run.write_bytes(tokens_path(split), save_safetensors_bytes({TOKENS_KEY: stored}, metadata=metadata))


# --------------------------------------------------------------------------------------------------
# collect


def _corrupt(split: str, error: CacheCorruptError, **extra) -> dict:
    logger.warning("%s", error)
    return {"status": "corrupt", "split": split, "layer": error.layer, "shard": error.shard, "reason": str(error),
            **extra}


@torch.no_grad()
def _teacher_forward(stack, hidden: torch.Tensor, positions: torch.Tensor, device: str, dtype: torch.dtype,
                     rows_per_forward: int) -> torch.Tensor:
    """The teacher's layers of one block over a shard's rows (bf16 in, bf16 out), a few rows at a time."""
    outs = []
    for first in range(0, hidden.shape[0], rows_per_forward):
        h = hidden[first:first + rows_per_forward].to(device=device, dtype=dtype)
        p = positions[first:first + rows_per_forward].to(device)
        outs.append(stack(h, p).to(torch.bfloat16).cpu())
    return torch.cat(outs)


def collect_boundary(run_url: str, boundary: int, *, device: str = "cpu", threads: int | None = None,
                     faults: str | None = None, progress: Callable | None = None) -> dict:
    """Write boundary `boundary` (train and validation) into the cache; skip shards already written.

    Boundary 0 embeds the token rows; boundary b > 0 runs block b-1's teacher layers over boundary b-1, which
    must be complete. Shards of an unfinished boundary are verified first and corrupt ones rewritten.
    Returns {"status": "ok", shards written/skipped, bytes and seconds of reading, computing, writing}, or
    {"status": "corrupt", "split", "layer", "shard"} if an input shard failed verification (the driver
    regenerates it and calls again)."""
    from .models import load_embeddings, load_layer_stack

    started = time.perf_counter()
    dtype = _setup_worker(device, threads)
    ctx = load_context(run_url)
    run, config = ctx.run, ctx.config
    fault_list = parse_faults(faults)
    if not 0 <= boundary < len(ctx.blocks):
        raise ValueError(f"boundary: {boundary} is outside 0..{len(ctx.blocks) - 1} of plan.json")
    layer, seq_len, hidden_size = ctx.boundary_layer(boundary), config.data.seq_len, config.model.hidden_size
    rows_per_forward = max(1, COLLECT_TOKENS_PER_FORWARD // seq_len)
    stats = {"status": "ok", "boundary": boundary, "layer": layer, "shards_written": 0, "shards_skipped": 0,
             "bytes_written": 0, "write_s": 0.0, "bytes_read": 0, "read_s": 0.0, "compute_s": 0.0, "tokens": 0,
             "regenerated": []}
    model = None  # the embedding table or the previous block's layers, loaded only if a shard is missing
    total = sum(ctx.num_shards(split) for split in SPLITS)
    bar = None
    for split in SPLITS:
        cache = BoundaryCache(run, split)
        expected = ctx.num_shards(split)
        if cache.is_complete(layer):
            stats["shards_skipped"] += expected
            continue
        bad = cache.verify(layer)
        if bad:
            logger.warning("boundary %d (%s, layer %d): shards %s are corrupt; regenerating them",
                           boundary, split, layer, bad)
            cache.invalidate(layer, bad)
            stats["regenerated"] += [[split, i] for i in bad]
        writer = cache.writer(layer, seq_len, hidden_size)
        todo = cache.missing_shards(layer, expected)
        stats["shards_skipped"] += expected - len(todo)
        if bar is None:
            bar = _bar(progress, total, f"collect L{layer:03d}", boundary, stats["shards_skipped"])
        if todo and model is None:
            if boundary == 0:
                model = load_embeddings(config.model, dtype=dtype, device=device)
            else:
                start, end = ctx.blocks[boundary - 1]
                model = load_layer_stack(config.model, start, end, dtype=dtype, device=device)
        if boundary == 0:
            try:
                tokens = read_tokens(run, split, ctx.rows(split), seq_len) if todo else None
            except CacheCorruptError as error:
                return _corrupt(split, error, boundary=boundary)
        elif todo:
            reader = BoundaryCache(run, split).reader(ctx.boundary_layer(boundary - 1))
        for shard in todo:
            t0 = time.perf_counter()
            if boundary == 0:
                first, last = ctx.shard_range(split, shard)
                ids = tokens[first:last]
                positions = torch.arange(seq_len, dtype=torch.int64).expand(last - first, seq_len).contiguous()
                t1 = time.perf_counter()
                with torch.no_grad():
                    hidden = model(ids.to(device)).to(torch.bfloat16).cpu()
            else:
                try:
                    inputs, positions = reader.read_shard(shard)
                except CacheCorruptError as error:
                    return _corrupt(split, error, boundary=boundary)
                stats["bytes_read"] += reader.index["shards"][str(shard)]["bytes"]
                t1 = time.perf_counter()
                hidden = _teacher_forward(model, inputs, positions, device, dtype, rows_per_forward)
            t2 = time.perf_counter()
            entry = writer.write_shard(shard, hidden, positions)
            t3 = time.perf_counter()
            stats["read_s"] += t1 - t0
            stats["compute_s"] += t2 - t1
            stats["write_s"] += t3 - t2
            stats["bytes_written"] += entry["bytes"]
            stats["tokens"] += hidden.shape[0] * seq_len
            stats["shards_written"] += 1
            bar.update(1)
            _fault_point(run, fault_list, "collect", boundary, stats["shards_written"])
        writer.mark_complete(expected)
    if bar is not None:
        bar.close()
    stats["seconds"] = time.perf_counter() - started
    stats["peak_gpu_bytes"] = peak_gpu_bytes(device)
    stats["ended_at"] = time.time()
    stats["started_at"] = stats["ended_at"] - stats["seconds"]
    return stats


# --------------------------------------------------------------------------------------------------
# transfer


def _append_lines(run: RunDir, rel: str, records: list[dict]) -> None:
    """Append JSON lines: a real append on a local disk, a whole atomic rewrite elsewhere (object stores
    cannot append)."""
    if not records:
        return
    text = "".join(json.dumps(r) + "\n" for r in records)
    if is_local(run.fs):
        run.makedirs(rel.rsplit("/", 1)[0])
        with open(run.path(rel), "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return
    old = run.read_text(rel) if run.exists(rel) else ""
    run.write_text(rel, old + text)


def _trim_metrics(run: RunDir, rel: str, micro_steps: int) -> None:
    """Keep the metric lines up to `micro_steps` (the checkpoint being resumed); later ones are redone.
    A line cut short by a crash is dropped too."""
    if not run.exists(rel):
        return
    kept = []
    for line in run.read_text(rel).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("micro_step", 0) <= micro_steps:
            kept.append(line + "\n")
    run.write_text(rel, "".join(kept))


def _save_checkpoint(run: RunDir, rel: str, trainer: BlockTrainer, position: CachePosition, tokens: int) -> None:
    buffer = io.BytesIO()
    torch.save({"format": 1, "trainer": trainer.state_dict(), "position": position.to_dict(), "tokens": tokens},
               buffer)
    run.write_bytes(rel, buffer.getvalue())


def _load_checkpoint(run: RunDir, rel: str) -> dict:
    return torch.load(io.BytesIO(run.read_bytes(rel)), map_location="cpu", weights_only=True)


def _best_eval(history: list[dict]) -> dict:
    """The first evaluation with the lowest validation loss (the one BlockTrainer kept as best_state)."""
    best = history[0]
    for entry in history[1:]:
        if entry["val_loss"] < best["val_loss"]:
            best = entry
    return best


def _eval_record(block: int, trainer: BlockTrainer, result: dict) -> dict:
    return {"event": "eval", "block": block, "optimizer_step": trainer.optimizer_steps,
            "micro_step": trainer.micro_steps, "val_loss": result["val_loss"],
            "val_per_layer_mse": result["val_per_layer_mse"], "best_val_loss": result["best_val_loss"],
            "lr": trainer.optimizer.param_groups[0]["lr"]}


def _block_trainer(config: RunConfig, start: int, end: int, converted: list[int], dtype: torch.dtype,
                   device: str) -> BlockTrainer:
    """Layers [start, end) with `converted` turned hybrid, and the trainer of their feature maps."""
    from .models import load_layer_stack

    settings = config.transfer
    stack = load_layer_stack(config.model, start, end, dtype=dtype, device=device)
    convert_layers(stack.layers, stack.config, attention_settings(config), [i - start for i in converted])
    return BlockTrainer(stack, TransferSettings(lr=settings.lr, grad_accum=settings.grad_accum,
                                                grad_clip=settings.grad_clip, mse_scale=settings.mse_scale,
                                                patience=settings.patience))


def transfer_block(run_url: str, block: int, *, device: str = "cpu", threads: int | None = None,
                   faults: str | None = None, progress: Callable | None = None) -> dict:
    """Stage 1 for block `block`: train its layers' φ and γ on boundary `block` (one epoch of the train split),
    evaluating on the validation split every transfer.eval_every optimizer steps (and at step 0 and at the end),
    with early stopping and a checkpoint every transfer.checkpoint_every optimizer steps; resumes from the
    checkpoint. Writes final.safetensors (best φ, γ) and result.json. Returns result.json's contents, or
    {"status": "corrupt", ...} if a boundary shard failed verification."""
    started, started_at = time.perf_counter(), time.time()
    dtype = _setup_worker(device, threads)
    ctx = load_context(run_url)
    run, config, settings = ctx.run, ctx.config, ctx.config.transfer
    fault_list = parse_faults(faults)
    if not 0 <= block < len(ctx.blocks):
        raise ValueError(f"block: {block} is outside 0..{len(ctx.blocks) - 1} of plan.json")
    folder = run.block_dir(block)
    if run.exists(f"{folder}/{RESULT}"):
        return {**run.read_json(f"{folder}/{RESULT}"), "skipped": True}
    start, end = ctx.blocks[block]
    converted = [i for i in ctx.converted_layers if start <= i < end]
    result: dict[str, Any] = {"status": "ok", "block": block, "layers": [start, end], "converted_layers": converted,
                              "device": device}
    if not converted:  # attention.layers leaves this block alone: nothing to train
        run.write_json(f"{folder}/{RESULT}", result)
        return result
    run.makedirs(folder)
    for name in run.listdir(folder):
        if TEMP_MARKER in name:  # an unfinished atomic write of a killed attempt
            run.remove(f"{folder}/{name}")

    seq_len, batch = config.data.seq_len, settings.micro_batch_size
    t0 = time.perf_counter()
    trainer = _block_trainer(config, start, end, converted, dtype, device)
    build_s = time.perf_counter() - t0
    try:
        validation = [(h.clone(), p.clone()) for h, p, _ in
                      BoundaryCache(run, "validation").reader(start).iter_rows(batch_size=batch)]
    except CacheCorruptError as error:
        return _corrupt("validation", error, block=block)
    validation_read_s = time.perf_counter() - t0 - build_s

    def evaluate() -> dict:
        t0 = time.perf_counter()
        out = trainer.evaluate((h.to(device=device, dtype=dtype), p.to(device)) for h, p in validation)
        seconds = time.perf_counter() - t0
        timing["eval_s"] += seconds
        if timing["first_eval_s"] is None:
            timing["first_eval_s"] = seconds
        return out

    # The first evaluation and the first micro-step are timed apart: in a fresh process they include the
    # kernels' JIT compilation, which the planner's per-step rate does not model.
    timing = {"eval_s": 0.0, "train_s": 0.0, "first_eval_s": None, "first_micro_step_s": None}
    metrics_rel, checkpoint_rel = f"{folder}/{METRICS}", f"{folder}/{CHECKPOINT}"
    pending: list[dict] = []
    position, tokens = CachePosition(), 0
    if run.exists(checkpoint_rel):
        state = _load_checkpoint(run, checkpoint_rel)
        trainer.load_state_dict(state["trainer"])
        position, tokens = CachePosition.from_dict(state["position"]), state["tokens"]
        _trim_metrics(run, metrics_rel, trainer.micro_steps)
    else:
        run.remove(metrics_rel)  # lines of an attempt that died before its first checkpoint
        pending.append(_eval_record(block, trainer, evaluate()))
    resumed_from, tokens_at_start = trainer.micro_steps, tokens
    load_s = time.perf_counter() - started
    # Said as it happens (Ray forwards a task's stdout to the driver's log): a run killed mid-block still shows
    # where the block's time before training went (a cold start measured minutes on a GPU, docs/results.md 8).
    first_eval = "" if timing["first_eval_s"] is None else f", first evaluation {timing['first_eval_s']:.1f} s"
    print(f"transfer block {block}: layers built in {build_s:.1f} s, validation rows read in {validation_read_s:.1f} s"
          f"{first_eval}; training starts {load_s:.1f} s after the task did", flush=True)

    reader = BoundaryCache(run, "train").reader(start)
    bar = _bar(progress, math.ceil(reader.num_rows / batch), f"transfer B{block:03d} L{start}-{end - 1}", block,
               trainer.micro_steps)
    window: list[dict] = []
    stopped_early = False
    try:
        with contextlib.closing(reader.iter_rows(start=position, batch_size=batch, prefetch=True)) as rows:
            t0 = time.perf_counter()
            for hidden, positions, after in rows:
                metrics = trainer.train_micro_batch(hidden.to(device=device, dtype=dtype), positions.to(device))
                if timing["first_micro_step_s"] is None:
                    timing["first_micro_step_s"] = time.perf_counter() - t0
                    print(f"transfer block {block}: first micro-step {timing['first_micro_step_s']:.1f} s", flush=True)
                position, tokens = after, tokens + hidden.shape[0] * seq_len
                window.append(metrics)
                bar.update(1)
                _fault_point(run, fault_list, "transfer", block, trainer.micro_steps)
                if "grad_norm" not in metrics:
                    continue
                timing["train_s"] += time.perf_counter() - t0
                step = trainer.optimizer_steps
                pending.append({"event": "train", "block": block, "optimizer_step": step,
                                "micro_step": trainer.micro_steps, "tokens": tokens,
                                "loss": sum(m["loss"] for m in window) / len(window),
                                "per_layer_mse": [sum(v) / len(window) for v in
                                                  zip(*(m["per_layer_mse"] for m in window))],
                                "grad_norm": metrics["grad_norm"], "lr": metrics["lr"]})
                window = []
                if step % settings.eval_every == 0:
                    pending.append(_eval_record(block, trainer, evaluate()))
                if trainer.should_stop:
                    stopped_early = True
                    break
                if step % settings.checkpoint_every == 0:
                    _append_lines(run, metrics_rel, pending)
                    pending = []
                    _save_checkpoint(run, checkpoint_rel, trainer, position, tokens)
                t0 = time.perf_counter()
    except CacheCorruptError as error:
        bar.close()
        return _corrupt("train", error, block=block)
    bar.close()
    if not stopped_early and trainer.history[-1]["optimizer_step"] != trainer.optimizer_steps:
        pending.append(_eval_record(block, trainer, evaluate()))
    _append_lines(run, metrics_rel, pending)

    before, best = trainer.history[0], _best_eval(trainer.history)
    final = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in trainer.best_state.items()}
    run.write_bytes(f"{folder}/{FINAL}", save_safetensors_bytes(final, metadata={"block": str(block)}))
    trained = tokens - tokens_at_start
    result.update({
        "mse_before": before["val_per_layer_mse"], "mse_after": best["val_per_layer_mse"],
        "val_loss_before": before["val_loss"], "best_val_loss": best["val_loss"],
        "best_optimizer_step": best["optimizer_step"], "optimizer_steps": trainer.optimizer_steps,
        "micro_steps": trainer.micro_steps, "tokens": tokens, "stopped_early": stopped_early,
        "evaluations": len(trainer.history),
        "attempt": {"resumed_from_micro_step": resumed_from, "tokens": trained, "load_s": load_s, "build_s": build_s,
                    "validation_read_s": validation_read_s,
                    "train_s": timing["train_s"], "eval_s": timing["eval_s"],
                    "first_micro_step_s": timing["first_micro_step_s"], "first_eval_s": timing["first_eval_s"],
                    "tokens_per_s": trained / timing["train_s"] if timing["train_s"] else None,
                    "wall_s": time.perf_counter() - started, "peak_gpu_bytes": peak_gpu_bytes(device),
                    "started_at": started_at, "ended_at": time.time()},
    })
    run.write_json(f"{folder}/{RESULT}", result)  # last: the block is done
    return result


def warm_up_kernels(run_url: str, *, device: str = "cpu", threads: int | None = None, faults: str | None = None,
                    progress: Callable | None = None) -> dict:
    """One converted layer's evaluation pass and training micro-step at the run's shapes, on random hidden states:
    the first calls compile the Triton kernels for those shapes into the node's on-disk cache. Blocks that start
    after it load the compiled kernels instead of each compiling them (session 6, 4 x H200, cold machine: blocks'
    first micro-steps took 39-123 s, the first evaluations up to 71 s; the steady micro-step was 0.48 s).
    `faults` and `progress` are accepted for the task interface and unused."""
    started, started_at = time.perf_counter(), time.time()
    dtype = _setup_worker(device, threads)
    ctx = load_context(run_url)
    config, batch = ctx.config, ctx.config.transfer.micro_batch_size
    if not ctx.converted_layers:
        return {"status": "ok", "layer": None, "batch_shapes": [], "build_s": 0.0, "seconds": 0.0,
                "started_at": started_at, "ended_at": time.time()}
    layer = ctx.converted_layers[0]
    trainer = _block_trainer(config, layer, layer + 1, [layer], dtype, device)
    built_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    # Both splits come in batches of the micro-batch; only a short last batch of either has another shape (and
    # the kernels specialise on it).
    evaluated = {batch, ctx.rows("validation") % batch or batch}
    trained = {batch, ctx.rows("train") % batch or batch}
    shapes = sorted(evaluated | trained)
    for rows in shapes:
        hidden = torch.randn(rows, config.data.seq_len, trainer.stack.config.hidden_size, generator=generator)
        positions = torch.arange(config.data.seq_len).repeat(rows, 1)
        hidden, positions = hidden.to(device=device, dtype=dtype), positions.to(device)
        if rows in evaluated:
            trainer.evaluate([(hidden, positions)])
        if rows in trained:
            trainer.train_micro_batch(hidden, positions)
    return {"status": "ok", "layer": layer, "batch_shapes": shapes, "build_s": built_s,
            "seconds": time.perf_counter() - started, "started_at": started_at, "ended_at": time.time()}


# --------------------------------------------------------------------------------------------------
# stitch


def base_model_sha256(model: ModelConfig) -> str:
    """Identity of the teacher: sha256 over the checkpoint's safetensors files (name and content hash of each),
    or over (name, seed, shapes) for deterministic random weights."""
    from .assets import sha256_file
    from .models import model_directory

    directory = model_directory(model)
    digest = hashlib.sha256()
    if directory is None:
        digest.update(json.dumps({"weights": "random", "name": model.name, "seed": model.seed,
                                  "hf_config": model.hf_config}, sort_keys=True).encode())
        return digest.hexdigest()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _plot_transfer_mse(layers: list[int], before: list[float], after: list[float], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 0.25 * len(layers) + 2), 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(layers, before, "o-", label="before transfer (step 0)")
    axes.plot(layers, after, "s-", label="after transfer (best validation)")
    axes.set_yscale("log")
    axes.set_xlabel("layer")
    axes.set_ylabel("attention-output MSE (validation)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def stitch(run_url: str | RunDir) -> dict:
    """All blocks' best φ, γ into RUN/stitched/hybrid.safetensors (global layer keys) + stitched.json, and the
    per-layer MSE before/after transfer into RUN/eval/transfer_mse.{json,png}. Returns stitched.json."""
    ctx = load_context(run_url)
    run, config = ctx.run, ctx.config
    state: dict[str, torch.Tensor] = {}
    per_layer: dict[int, tuple[float, float]] = {}
    blocks = []
    for block, (start, end) in enumerate(ctx.blocks):
        rel = f"{run.block_dir(block)}/{RESULT}"
        if not run.exists(rel):
            raise FileNotFoundError(f"{run.url_of(rel)} does not exist: block {block} has not finished transfer; "
                                    f"run `linearize resume {run.url}`")
        result = run.read_json(rel)
        if not result["converted_layers"]:
            continue
        state.update(load_safetensors_bytes(run.read_bytes(f"{run.block_dir(block)}/{FINAL}")))
        for layer, before, after in zip(result["converted_layers"], result["mse_before"], result["mse_after"]):
            per_layer[layer] = (before, after)
        blocks.append({key: result[key] for key in ("block", "layers", "converted_layers", "best_val_loss",
                                                    "val_loss_before", "best_optimizer_step", "optimizer_steps",
                                                    "stopped_early", "tokens")})
    expected = {f"layers.{i}.{name}" for i in ctx.converted_layers
                for name in ("feature_map_q.weight", "feature_map_k.weight", "window_logit")}
    if set(state) != expected:
        raise ValueError(f"stitch: the blocks' final.safetensors hold {len(state)} tensors, expected "
                         f"{len(expected)} (missing {sorted(expected - set(state))[:3]}, unexpected "
                         f"{sorted(set(state) - expected)[:3]}); delete the blocks' folders and resume")
    ordered = {key: state[key] for key in sorted(state, key=lambda k: (int(k.split(".")[1]), k))}
    run.write_bytes(STITCHED_WEIGHTS, save_safetensors_bytes(ordered, metadata={"format": "linearize-hybrid"}))
    a = config.attention
    meta = {"model": _model_dict(config.model),
            "attention": {"window_size": a.window_size, "window_kind": a.window_kind, "feature_dim": a.feature_dim,
                          "gamma_init": a.gamma_init, "feature_dtype": a.feature_dtype},
            "base_model_sha256": base_model_sha256(config.model),
            "layers": config.model.num_layers,
            "converted_layers": ctx.converted_layers,
            "layers_per_block": int(ctx.plan["k"]), "blocks": [list(b) for b in ctx.blocks]}
    run.write_json(STITCHED_META, meta)
    layers = sorted(per_layer)
    before, after = [per_layer[i][0] for i in layers], [per_layer[i][1] for i in layers]
    run.write_json(TRANSFER_MSE_JSON, {"layers": layers, "mse_before": before, "mse_after": after,
                                       "blocks": blocks})
    title = f"{config.model.name}: attention transfer, {len(ctx.blocks)} block(s) of k={ctx.plan['k']}"
    run.write_bytes(TRANSFER_MSE_PNG, _plot_transfer_mse(layers, before, after, title))
    return meta


def _model_dict(model: ModelConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(model)
