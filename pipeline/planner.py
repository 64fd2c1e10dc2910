"""`linearize plan`: the cost model that chooses k, the number of decoder layers per block.

Stage 1 (attention transfer) trains blocks of k layers, each on one GPU, from the teacher's boundary states
cached on disk (DESIGN.md "Block-wise training and the cost model"; reference/lolcats.md §5). k trades
parallelism and GPU memory (small k) against disk and I/O (large k). For every k in 1..L this module
derives, with every component printed:

* blocks: num_blocks = ceil(L/k) (the last block has L - (num_blocks-1)·k layers), waves = ceil(num_blocks/G).
* GPU memory of one block step, as the stage-1 code runs it: the k layers' losses are summed and ONE
  backward runs (like the paper), so each layer's tensors saved for backward stay alive until the end of
  the block's forward. Per block:
      frozen weights      k · P_layer · 2 B (bf16)
      saved activations   k · (per-layer saved tensors, see KernelProfile)
      working set         the transient tensors of the one layer being computed at the peak
      trainable state     k · (2·H·D·f + H) · 20 B (φq, φk, γ in fp32: param, grad, AdamW m, v, best copy)
      runtime reserve     CUDA context, workspaces, allocator slack (hardware preset)
* cache on disk: one boundary per block, num_blocks · T · d · 2 B (= 2·T·d·L/k when k divides L), plus
  position ids (int64) and the validation sequences.
* host RAM per node: each worker streams its boundary (a shard being used + one prefetched) and stages one
  weight tensor at a time from the checkpoint.
* time: collect (teacher forward of all L layers over all tokens, spread over G workers, plus writing and
  reading boundaries) + waves · (time of one k-layer block: teacher GEMMs, the hybrid in fp32, passes over
  the score maps, reading the boundary and the block's weights).

It keeps the k that fit GPU memory, disk and host RAM, and chooses the smallest wall time (ties: larger k,
which needs less disk). Time constants come from configs/hardware/<name>.yaml; `--calibrate` measures
this machine and writes one.

Derivation of the per-layer tensor counts (KernelProfile): the stage-1 step of blocks/ (blocks.transfer.
transfer_loss: HybridAttention in 'transfer' mode, teacher attention by SDPA under no_grad, student hybrid in
fp32, MSE on per-head outputs, k losses summed, one backward) was run under torch.autograd.graph.
saved_tensors_hooks and the profiler's memory events on CPU. With implementation='quadratic' each layer saves
exactly one fp32 H·n·n map (the window weights exp(s - c), kept for γ's gradient) plus per token and head
6·D + 6·2f + 1 fp32 values: q, k, v at query heads, weights·v, y and the teacher's y (D each); both feature
maps' softmax halves, concatenations and matmul layouts (2f each); the normalizer. Peak = k · saved + about
4 maps of the layer being computed. The chunked paths ('blocked' on CPU, 'triton' on GPU, 'chunked') keep
one window-sized map (H·n·2w) and two more per-token copies of keys and features gathered per window block,
plus per-chunk linear-attention states. tests/pipeline/test_planner.py measures the real step against this
model on CPU, and with `-m gpu` at Llama 3.1 405B layer shapes on the H100 (2 layers, bf16, quadratic):
saved 2.688 GB (modelled 2.685), peak 4.84 GB above the weights (modelled 5.29).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import CONFIGS_DIR, ConfigError, ModelConfig, load_cluster_config, load_model_config, load_yaml
from pipeline.config import parse_bytes, parse_count

HARDWARE_DIR = CONFIGS_DIR / "hardware"
KERNELS = ("quadratic", "chunked")
GB, TB, HOUR = 1e9, 1e12, 3600.0
FP32, BF16, INT64 = 4, 2, 8
TRAINABLE_BYTES_PER_PARAM = 20  # fp32 parameter, grad, AdamW m and v, and the best-checkpoint copy


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Hardware:
    """Time constants of one kind of worker (configs/hardware/<name>.yaml)."""

    name: str
    layer_tflops: float
    """Sustained TFLOP/s of a decoder layer's forward in bf16 (GEMMs + SDPA attention)."""
    fp32_tflops: float
    """Sustained TFLOP/s of fp32 matmuls (the hybrid attention is computed in fp32)."""
    memory_GBps: float
    """Device memory bandwidth, for the elementwise passes over the n×n score maps."""
    disk_write_GBps: float
    """Sequential write throughput of the cache storage, per worker (assumed to scale with workers)."""
    disk_read_GBps: float
    runtime_reserve_GB: float
    """Device memory the model cannot use: CUDA context, library workspaces, allocator fragmentation."""
    measured: bool = False
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "Hardware":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        required = [n for n in names if n not in ("measured",)]
        missing = [n for n in required if n not in data]
        if missing:
            raise ConfigError(f"--hardware: {source or 'preset'} lacks {missing}")
        values = {}
        for key in names:
            if key not in data:
                continue
            value = data[key]
            if key == "name":
                values[key] = str(value)
            elif key == "measured":
                values[key] = bool(value)
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                        value == 0 and key != "runtime_reserve_GB"):
                    raise ConfigError(f"--hardware: {source}: {key} must be a positive number, got {value!r}")
                values[key] = float(value)
        return cls(source=source, **values)


def hardware_names() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(value: str) -> Hardware:
    """A preset name from configs/hardware/ or a path to such a YAML file."""
    path = Path(value)
    if path.suffix not in (".yaml", ".yml") or not path.exists():
        path = HARDWARE_DIR / f"{value}.yaml"
    if not path.exists():
        raise ConfigError(f"--hardware: no preset named {value!r}; available: {hardware_names()} "
                          "(or a path to a .yaml file, or run `linearize plan --calibrate`)")
    return Hardware.from_dict(load_yaml(path), source=str(path))


@dataclass(frozen=True)
class Workload:
    """What stage 1 processes: T training tokens in sequences of n, plus validation sequences."""

    tokens: int
    seq_len: int
    val_sequences: int = 8
    epochs: float = 1.0
    micro_batch: int = 1
    kernel: str = "quadratic"
    """'quadratic' (masked n×n maps in fp32, the reference path; what the paper's k ≤ 9 reflects) or
    'chunked' (window-sized maps + linear states: blocks' 'blocked', 'chunked' and 'triton' paths)."""
    feature_dim: int = 64
    window_size: int = 64
    shard_bytes: int = 512 * 10**6
    """Target size of one cache shard (the reader holds one, plus one prefetched)."""

    @property
    def train_sequences(self) -> int:
        return math.ceil(self.tokens / self.seq_len)

    @property
    def train_tokens_stored(self) -> int:
        """Tokens as stored: whole sequences (20M tokens at n=1024 are 19,532 rows)."""
        return self.train_sequences * self.seq_len

    @property
    def val_tokens(self) -> int:
        return self.val_sequences * self.seq_len


@dataclass(frozen=True)
class Limits:
    """The cluster: G GPUs (0 = one CPU worker), memory per GPU, host RAM per node, disk for the cache.
    None means not limited."""

    gpus: int
    gpu_memory: int | None
    host_memory: int | None
    disk: int | None
    gpus_per_node: int = 8

    @property
    def workers(self) -> int:
        return max(self.gpus, 1)


@dataclass(frozen=True)
class KernelProfile:
    """Per-layer tensors of one stage-1 step of blocks/, measured (module docstring)."""

    implementations: tuple[str, ...]
    """blocks.hybrid_attention implementations this profile describes."""
    saved_maps: int
    """fp32 score maps (B·H·n·keys) kept for backward per layer."""
    working_maps: int
    """fp32 score maps alive at once while one layer is computed."""
    window_copies: int
    """Per-token copies of a key and its features (D + 2f) gathered per window block and kept for backward."""
    map_passes: int
    """Reads + writes of a score map per layer in forward + backward (scale, mask, max, exp, γ·, +, sum, and
    their gradients), counted from the op list of the quadratic path."""


KERNEL_PROFILES = {
    "quadratic": KernelProfile(("quadratic",), saved_maps=1, working_maps=4, window_copies=0, map_passes=40),
    "chunked": KernelProfile(("blocked", "chunked", "triton"), saved_maps=1, working_maps=4, window_copies=2,
                             map_passes=40),
}


# --------------------------------------------------------------------------------------------------
# The model of one candidate k


@dataclass
class Candidate:
    k: int
    num_blocks: int
    last_block_layers: int
    waves: int
    memory: dict[str, float]
    memory_total: float
    memory_limit: float | None
    cache: dict[str, float]
    cache_total: float
    host: dict[str, float]
    host_total: float
    times: dict[str, float]
    status: str = "kept"
    reasons: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return self.times["wall_s"]

    def to_dict(self) -> dict:
        return {
            "k": self.k, "num_blocks": self.num_blocks, "last_block_layers": self.last_block_layers,
            "waves": self.waves, "memory_bytes": round(self.memory_total), "memory_limit_bytes": self.memory_limit,
            "memory": {key: round(v) for key, v in self.memory.items()},
            "cache_bytes": round(self.cache_total), "cache": {key: round(v) for key, v in self.cache.items()},
            "host_bytes_per_node": round(self.host_total), "host": {key: round(v) for key, v in self.host.items()},
            "times_s": {key: round(v, 3) for key, v in self.times.items()},
            "status": self.status, "reasons": list(self.reasons),
        }


def _score_map_keys(workload: Workload) -> int:
    """Keys per query in the score maps the kernel materializes: all n (quadratic) or the terrace window
    (previous window-block + the current one: at most 2·window keys) for the chunked path."""
    if workload.kernel == "quadratic":
        return workload.seq_len
    return min(2 * workload.window_size, workload.seq_len)


def layer_terms(model: ModelConfig, workload: Workload) -> dict[str, float]:
    """Per-layer quantities of one stage-1 step (bytes, except trainable_params)."""
    B, n, H, D, f = workload.micro_batch, workload.seq_len, model.num_heads, model.head_dim, workload.feature_dim
    profile = KERNEL_PROFILES[workload.kernel]
    chunk_states = 0.0
    if workload.kernel == "chunked":
        # The chunked backward keeps the running (2f × D) linear-attention state of every chunk.
        chunk_states = B * H * math.ceil(n / workload.window_size) * 2 * f * D * FP32
    return {
        "score_map": B * H * n * _score_map_keys(workload) * FP32,
        # q, k, v, weights·v, y, y_teacher (D each); feature-map halves, concatenations, matmul layouts (2f each);
        # the normalizer; window-gathered copies of keys and features (chunked paths). fp32, per query head.
        "per_token_saved": B * n * H * (6 * D + 6 * 2 * f + 1 + profile.window_copies * (D + 2 * f)) * FP32,
        "chunk_states": chunk_states,
        # Teacher layer (no graph: its inputs need no grad): gate, up, act·up and residual/normed copies, bf16.
        "teacher_transient": B * n * (3 * model.intermediate_size + 4 * model.hidden_size) * BF16,
        "trainable_params": 2 * H * D * f + H,
    }


def block_memory(model: ModelConfig, k: int, workload: Workload, hardware: Hardware) -> dict[str, float]:
    """Bytes of one k-layer block step on its device, by component (see the module docstring)."""
    t = layer_terms(model, workload)
    profile = KERNEL_PROFILES[workload.kernel]
    saved_per_layer = profile.saved_maps * t["score_map"] + t["per_token_saved"] + t["chunk_states"]
    return {
        "weights": k * model.params_per_layer * BF16,
        "saved_activations": k * saved_per_layer,
        "working_set": profile.working_maps * t["score_map"] + t["chunk_states"] + t["teacher_transient"],
        "trainable_state": k * t["trainable_params"] * TRAINABLE_BYTES_PER_PARAM,
        "runtime_reserve": hardware.runtime_reserve_GB * GB,
    }


def cache_size(model: ModelConfig, num_blocks: int, workload: Workload) -> dict[str, float]:
    """Bytes of the boundary cache: one boundary (the input of each block) per block."""
    d = model.hidden_size
    return {
        "hidden": num_blocks * workload.train_tokens_stored * d * BF16,
        "position_ids": num_blocks * workload.train_tokens_stored * INT64,
        "validation": num_blocks * workload.val_tokens * (d * BF16 + INT64),
    }


def shard_rows(model: ModelConfig, workload: Workload) -> int:
    return max(1, workload.shard_bytes // (workload.seq_len * model.hidden_size * BF16))


def host_memory(model: ModelConfig, workload: Workload, limits: Limits) -> dict[str, float]:
    """Host RAM per node: for each worker on the node, two shards of its boundary and one weight tensor."""
    d, inter = model.hidden_size, model.intermediate_size
    shard = shard_rows(model, workload) * workload.seq_len * (d * BF16 + INT64)
    largest_tensor = max(d * inter, d * model.num_heads * model.head_dim) * BF16
    workers_per_node = min(limits.gpus_per_node, limits.workers)
    return {"streaming_shards": workers_per_node * 2 * shard, "weight_staging": workers_per_node * largest_tensor}


def flops_per_token_layer(model: ModelConfig, workload: Workload) -> dict[str, float]:
    """FLOPs per token per layer: the teacher's GEMMs, its attention, and the student hybrid (fwd + bwd)."""
    n, H, D, f = workload.seq_len, model.num_heads, model.head_dim, workload.feature_dim
    gemm = 2 * (model.params_per_layer - 2 * model.hidden_size)  # norms are not matmuls
    sdpa_causal = 2 * n * H * D  # QKᵀ and PV over n/2 keys on average, 2 FLOPs per MAC
    feature_maps = 8 * H * D * f  # x·W for q and k: forward, and the weight gradient
    if workload.kernel == "quadratic":
        # Forward over all n keys: scores qkᵀ (2nHD), φqφkᵀ (2·n·H·2f), weights·v (2nHD); backward:
        # ∂weights = g·vᵀ (2nHD), ∂φq and ∂φk (2 × 2·n·H·2f). q, k, v need no gradient.
        hybrid = 6 * n * H * D + 12 * n * H * f + feature_maps
    else:
        keys = _score_map_keys(workload)
        # Window part over ≤ 2w keys (scores, weights·v, ∂weights: 6·keys·H·D) and the linear state:
        # read + update (2 × 2·H·2f·D) forward, twice that backward.
        hybrid = 6 * keys * H * D + 3 * 2 * 2 * H * 2 * f * D + feature_maps
    # The teacher's attention is SDPA (flash / memory-efficient) in bf16 on both paths.
    return {"gemm": gemm, "sdpa_causal": sdpa_causal, "hybrid_fp32": hybrid, "teacher_attention_bf16": sdpa_causal}


def block_times(model: ModelConfig, k: int, num_blocks: int, workload: Workload, hardware: Hardware,
                limits: Limits) -> dict[str, float]:
    """Seconds: collection (all workers), one k-layer block's transfer, and the wall time."""
    L, d = model.num_layers, model.hidden_size
    G = limits.workers
    flops = flops_per_token_layer(model, workload)
    layer_rate, fp32_rate = hardware.layer_tflops * 1e12, hardware.fp32_tflops * 1e12
    write_bw, read_bw = hardware.disk_write_GBps * GB, hardware.disk_read_GBps * GB
    boundary = (workload.train_tokens_stored + workload.val_tokens) * (d * BF16 + INT64)
    layer_weights = model.params_per_layer * BF16

    # Collect: worker for block b reads boundary b, runs k teacher layers (SDPA), writes boundary b+1.
    # Pipelined over shards, so all G workers are busy; the fill of the pipeline is neglected.
    collect_tokens = workload.train_tokens_stored + workload.val_tokens
    collect_compute = collect_tokens * L * (flops["gemm"] + flops["sdpa_causal"]) / layer_rate / G
    collect_io = (num_blocks * boundary / write_bw + (num_blocks - 1) * boundary / read_bw
                  + L * layer_weights / read_bw) / G

    # Transfer of one full block (the last, partial block is no slower): teacher forward + student
    # hybrid forward/backward for every token of every epoch, the boundary read, the k layers' weights.
    tokens = workload.train_tokens_stored * workload.epochs
    keys = _score_map_keys(workload)
    block_gemm = tokens * k * (flops["gemm"] + flops["teacher_attention_bf16"]) / layer_rate
    block_hybrid = tokens * k * flops["hybrid_fp32"] / fp32_rate
    profile = KERNEL_PROFILES[workload.kernel]
    block_map_passes = tokens * k * profile.map_passes * model.num_heads * keys * FP32 / (hardware.memory_GBps * GB)
    block_io = (workload.epochs * boundary + k * layer_weights) / read_bw
    block = block_gemm + block_hybrid + block_map_passes + block_io
    waves = math.ceil(num_blocks / G)
    return {
        "collect_compute_s": collect_compute, "collect_io_s": collect_io, "collect_s": collect_compute + collect_io,
        "block_gemm_s": block_gemm, "block_hybrid_s": block_hybrid, "block_map_passes_s": block_map_passes,
        "block_io_s": block_io, "block_s": block, "transfer_s": waves * block,
        "wall_s": collect_compute + collect_io + waves * block,
    }


def evaluate(model: ModelConfig, k: int, workload: Workload, limits: Limits, hardware: Hardware) -> Candidate:
    """All derived numbers of one k, and the limits it breaks (status 'rejected' with reasons)."""
    L = model.num_layers
    num_blocks = math.ceil(L / k)
    waves = math.ceil(num_blocks / limits.workers)
    memory = block_memory(model, k, workload, hardware)
    cache = cache_size(model, num_blocks, workload)
    host = host_memory(model, workload, limits)
    cand = Candidate(
        k=k, num_blocks=num_blocks, last_block_layers=L - (num_blocks - 1) * k, waves=waves,
        memory=memory, memory_total=sum(memory.values()),
        memory_limit=limits.gpu_memory if limits.gpus > 0 else limits.host_memory,
        cache=cache, cache_total=sum(cache.values()), host=host, host_total=sum(host.values()),
        times=block_times(model, k, num_blocks, workload, hardware, limits),
    )
    if limits.gpus > 0:
        if limits.gpu_memory is not None and cand.memory_total > limits.gpu_memory:
            cand.reasons.append(f"does not fit GPU memory: {cand.memory_total / GB:.1f} GB > "
                                f"{limits.gpu_memory / GB:.1f} GB")
        if limits.host_memory is not None and cand.host_total > limits.host_memory:
            cand.reasons.append(f"host RAM per node {cand.host_total / GB:.1f} GB > {limits.host_memory / GB:.1f} GB")
    elif limits.host_memory is not None and cand.memory_total + cand.host_total > limits.host_memory:
        cand.reasons.append(f"does not fit host memory (CPU worker): "
                            f"{(cand.memory_total + cand.host_total) / GB:.1f} GB > {limits.host_memory / GB:.1f} GB")
    if limits.disk is not None and cand.cache_total > limits.disk:
        cand.reasons.append(f"cache {_tb(cand.cache_total)} > disk {_tb(limits.disk)}")
    if cand.reasons:
        cand.status = "rejected"
    return cand


@dataclass
class Plan:
    model: ModelConfig
    workload: Workload
    limits: Limits
    hardware: Hardware
    candidates: list[Candidate]
    chosen: Candidate | None


def plan(model: ModelConfig, workload: Workload, limits: Limits, hardware: Hardware) -> Plan:
    """Evaluate every k in 1..L and choose the feasible one with the smallest wall time (ties: larger k)."""
    candidates = [evaluate(model, k, workload, limits, hardware) for k in range(1, model.num_layers + 1)]
    feasible = [c for c in candidates if c.status != "rejected"]
    chosen = None
    if feasible:
        best_wall = min(c.wall_s for c in feasible)
        chosen = max((c for c in feasible if c.wall_s <= best_wall * (1 + 1e-9)), key=lambda c: c.k)
        chosen.status = "chosen"
        for c in feasible:
            if c is not chosen:
                c.reasons = _why_slower(c, chosen, limits)
    return Plan(model, workload, limits, hardware, candidates, chosen)


def _why_slower(c: Candidate, best: Candidate, limits: Limits) -> list[str]:
    G = limits.workers
    if c.wall_s <= best.wall_s * (1 + 1e-9):
        return [f"ties with k={best.k} on wall time ({c.wall_s / HOUR:.2f} h); the larger k needs less disk"]
    parts = [f"slower than k={best.k}: {c.wall_s / HOUR:.2f} h vs {best.wall_s / HOUR:.2f} h"]
    if c.waves > 1:
        parts.append(f"needs {c.waves} waves on {G} {'GPUs' if limits.gpus else 'worker'} "
                     f"({c.num_blocks} blocks; one wave would need {c.num_blocks} GPUs)")
    if c.waves * c.k > best.waves * best.k:
        parts.append(f"{c.waves}×{c.k} = {c.waves * c.k} layers in sequence per GPU vs {best.waves * best.k}")
    if c.cache_total > best.cache_total * (1 + 1e-9):
        parts.append(f"writes and reads a {_tb(c.cache_total)} cache vs {_tb(best.cache_total)}")
    return parts


# --------------------------------------------------------------------------------------------------
# Output


def _tb(nbytes: float) -> str:
    return f"{nbytes / TB:.2f} TB" if nbytes >= 0.1 * TB else f"{nbytes / GB:.1f} GB"


def _limit(value: int | None, unit: float, name: str) -> str:
    return "not limited" if value is None else f"{value / unit:.1f} {name}"


def plan_to_dict(p: Plan) -> dict:
    c = p.chosen
    chosen = {
        "k": c.k if c else None,
        "num_blocks": c.num_blocks if c else None,
        "waves": c.waves if c else None,
        "last_block_layers": c.last_block_layers if c else None,
        "blocks": [[b * c.k, min((b + 1) * c.k, p.model.num_layers)] for b in range(c.num_blocks)] if c else None,
        "per_block_memory_bytes": round(c.memory_total) if c else None,
        "memory": {key: round(v) for key, v in c.memory.items()} if c else None,
        "cache_bytes": round(c.cache_total) if c else None,
        "cache": {key: round(v) for key, v in c.cache.items()} if c else None,
        "host_bytes_per_node": round(c.host_total) if c else None,
        "shard_rows": shard_rows(p.model, p.workload),
        "predicted_times_s": {key: round(v, 3) for key, v in c.times.items()} if c else None,
        "cost": cost(p) if c else None,
    }
    return {
        **chosen,
        "feasible": c is not None,
        "model": {"name": p.model.name, "num_layers": p.model.num_layers, "hidden_size": p.model.hidden_size,
                  "num_heads": p.model.num_heads, "num_kv_heads": p.model.num_kv_heads, "head_dim": p.model.head_dim,
                  "params_per_layer": p.model.params_per_layer},
        "workload": dataclasses.asdict(p.workload) | {"train_tokens_stored": p.workload.train_tokens_stored},
        "limits": dataclasses.asdict(p.limits),
        "hardware": dataclasses.asdict(p.hardware),
        "candidates": [cand.to_dict() for cand in p.candidates],
    }


def _memory_lines(p: Plan, c: Candidate) -> list[str]:
    m, w = p.model, p.workload
    t = layer_terms(m, w)
    profile = KERNEL_PROFILES[w.kernel]
    keys = "n" if w.kernel == "quadratic" else "2w"
    limit = ""
    if c.memory_limit is not None:
        limit = f" {'<=' if c.memory_total <= c.memory_limit else '>'} {c.memory_limit / GB:.1f} GB"
    states = f" + {t['chunk_states'] / GB:.3f} GB chunk states" if t["chunk_states"] else ""
    rows = [
        ("frozen weights", f"{c.k} × {m.params_per_layer / 1e9:.3f}B params × 2 B (bf16)", c.memory["weights"]),
        ("saved activations", f"{c.k} × ({profile.saved_maps} × {t['score_map'] / GB:.3f} GB fp32 H·n·{keys} map + "
                              f"{t['per_token_saved'] / GB:.3f} GB O(n) tensors{states})", c.memory["saved_activations"]),
        ("working set", f"{profile.working_maps} × {t['score_map'] / GB:.3f} GB maps of one layer + "
                        f"{t['teacher_transient'] / GB:.3f} GB teacher MLP/residual{states}", c.memory["working_set"]),
        ("trainable φq,φk,γ", f"{c.k} × {t['trainable_params'] / 1e6:.2f}M params × 20 B (fp32: param, grad, m, v, "
                              "best)",
         c.memory["trainable_state"]),
        ("runtime reserve", f"hardware preset {p.hardware.name}", c.memory["runtime_reserve"]),
    ]
    out = [f"  k={c.k}: {'GPU' if p.limits.gpus else 'worker'} memory of one block step ({w.kernel} kernel, "
           f"micro-batch {w.micro_batch}, n={w.seq_len}, one backward over the {c.k} layers' losses) = "
           f"{c.memory_total / GB:.2f} GB{limit}"]
    width = max(len(formula) for _, formula, _ in rows)
    out += [f"    {label:<18} {formula:<{width}} = {value / GB:7.2f} GB" for label, formula, value in rows]
    return out


def _row(c: Candidate) -> str:
    verdict = c.status + (": " + "; ".join(c.reasons) if c.reasons else "")
    return (f"{c.k:>4} {c.num_blocks:>6} {c.last_block_layers:>4} {c.waves:>5} {c.memory_total / GB:>8.1f} "
            f"{_tb(c.cache_total):>9} {c.host_total / GB:>8.1f} {c.times['collect_s'] / HOUR:>9.2f} "
            f"{c.times['block_s'] / HOUR:>8.2f} {c.wall_s / HOUR:>8.2f}  {verdict}")


def _rows(candidates: list[Candidate], all_rows: bool) -> list[str]:
    """Table rows; a run of more than 3 candidates rejected for the same limits shows its first and last."""
    def kinds(c: Candidate) -> tuple:
        return tuple(r.split(":")[0].split(" ")[0] for r in c.reasons) if c.status == "rejected" else (c.k,)

    lines, i = [], 0
    while i < len(candidates):
        j = i
        while j + 1 < len(candidates) and kinds(candidates[j + 1]) == kinds(candidates[i]):
            j += 1
        if all_rows or j - i < 3:
            lines += [_row(c) for c in candidates[i:j + 1]]
        else:
            lines.append(_row(candidates[i]))
            lines.append(f"{'...':>4}  k={candidates[i + 1].k}..{candidates[j - 1].k}: rejected for the same "
                         f"reason, with larger numbers (--all prints every row)")
            lines.append(_row(candidates[j]))
        i = j + 1
    return lines


def _infeasible_summary(p: Plan) -> str:
    """Why no k works: which k fit the memory limit and which fit the disk."""
    fit_memory = [c.k for c in p.candidates if not any(r.startswith(("does not fit", "host RAM")) for r in c.reasons)]
    fit_disk = [c.k for c in p.candidates if not any(r.startswith("cache") for r in c.reasons)]
    parts = ["No k satisfies the limits."]
    if fit_memory and fit_disk:
        parts.append(f"k <= {max(fit_memory)} fit in memory but need more disk; k >= {min(fit_disk)} fit the disk "
                     "but not the memory.")
    elif not fit_memory:
        parts.append("Even k=1 does not fit in memory.")
    else:
        parts.append(f"Even k={p.model.num_layers} needs more disk than given.")
    parts.append("Give more GPU memory (--gpu-memory), disk (--disk) or host RAM, a shorter --seq-len, "
                 "or --kernel chunked.")
    return " ".join(parts)


# Published wall times of the LoLCATs paper (Llama 3.1 405B, 20M + 20M tokens), shown beside our predictions.
PAPER_COSTS = {"llama3.1-405b": {"stage 1": (5.0, 14), "stage 2 (LoRA)": (16.0, 24)}}


def lora_stage_s(model: ModelConfig, workload: Workload, hardware: Hardware, gpus: int) -> float:
    """FLOP-bound lower bound of stage 2 over the same tokens: the forward (2N FLOPs per token) and the backward's
    activation gradients (2N; the frozen base needs no weight gradients and LoRA's are negligible), spread over
    all GPUs at the measured decoder-layer rate. ZeRO-3 communication and recomputation come on top."""
    params = model.num_layers * model.params_per_layer
    return 4 * params * workload.tokens * workload.epochs / (max(gpus, 1) * hardware.layer_tflops * 1e12)


def cost(p: Plan) -> dict:
    """GPU-hours of the chosen plan's stage 1 and of stage 2's lower bound, with the paper's where published."""
    c, gpus = p.chosen, max(p.limits.gpus, 1)
    stage2_s = lora_stage_s(p.model, p.workload, p.hardware, p.limits.gpus)
    out = {"stage 1": {"wall_h": c.wall_s / HOUR, "gpus": gpus, "gpu_hours": c.wall_s / HOUR * gpus},
           "stage 2 (LoRA)": {"wall_h": stage2_s / HOUR, "gpus": gpus, "gpu_hours": stage2_s / HOUR * gpus,
                              "lower_bound": True}}
    for stage, (hours, paper_gpus) in PAPER_COSTS.get(p.model.name, {}).items():
        out[stage]["paper"] = {"wall_h": hours, "gpus": paper_gpus, "gpu_hours": hours * paper_gpus}
    return out


def _cost_lines(p: Plan) -> list[str]:
    lines = []
    for stage, value in cost(p).items():
        kind = "FLOP-bound lower bound: " if value.get("lower_bound") else ""
        line = (f"  cost, {stage}: {kind}{value['wall_h']:.2f} h × {value['gpus']} GPUs = "
                f"{value['gpu_hours']:.1f} GPU-hours")
        if "paper" in value:
            paper = value["paper"]
            line += (f" (LoLCATs paper: {paper['wall_h']:g} h on {paper['gpus']} H100s = "
                     f"{paper['gpu_hours']:g} GPU-hours)")
        lines.append(line)
    lines.append("  (the time constants came out 6-16x optimistic against a measured SmolLM2 run, docs/results.md "
                 "section 5; recalibrate from a measured run before trusting hours)")
    return lines


def format_plan(p: Plan, all_rows: bool = False) -> str:
    m, w, lim, hw = p.model, p.workload, p.limits, p.hardware
    workers = f"{lim.gpus} GPUs" if lim.gpus else "1 CPU worker"
    out = [
        f"linearize plan: {m.name} ({m.num_layers} layers, d={m.hidden_size}, {m.num_heads} heads × {m.head_dim}, "
        f"{m.params_per_layer / 1e9:.3f}B params per layer)",
        f"  {w.tokens:,} training tokens ({w.train_sequences:,} sequences of {w.seq_len}) × {w.epochs:g} epoch(s) "
        f"+ {w.val_sequences} validation sequences; kernel {w.kernel}; micro-batch {w.micro_batch}",
        f"  cluster: {workers}, GPU memory {_limit(lim.gpu_memory if lim.gpus else None, GB, 'GB')}, "
        f"host RAM per node {_limit(lim.host_memory, GB, 'GB')}, disk {_limit(lim.disk, TB, 'TB')}",
        f"  time constants: {hw.name} ({hw.source}; measured: {str(hw.measured).lower()}): layer "
        f"{hw.layer_tflops:g} TFLOP/s bf16, fp32 {hw.fp32_tflops:g} TFLOP/s, memory {hw.memory_GBps:g} GB/s, "
        f"disk write {hw.disk_write_GBps:g} / read {hw.disk_read_GBps:g} GB/s per worker",
        "",
        f"{'k':>4} {'blocks':>6} {'last':>4} {'waves':>5} {'mem GB':>8} {'cache':>9} {'host GB':>8} "
        f"{'collect h':>9} {'block h':>8} {'wall h':>8}  verdict",
    ]
    out += _rows(p.candidates, all_rows)
    out.append("")
    c = p.chosen
    if c is None:
        out.append(_infeasible_summary(p))
        return "\n".join(out)
    if c.num_blocks == 1:
        shape = f"1 block of {c.k} layers"
    elif c.last_block_layers == c.k:
        shape = f"{c.num_blocks} blocks of {c.k} layers"
    else:
        shape = f"{c.num_blocks} blocks ({c.num_blocks - 1} of {c.k} layers + a last block of {c.last_block_layers})"
    out.append(f"Chosen: k={c.k}: {shape}, {c.waves} wave{'s' if c.waves > 1 else ''} on {workers}, "
               f"predicted wall time {c.wall_s / HOUR:.2f} h.")
    out += _memory_lines(p, c)
    bigger = next((x for x in p.candidates if x.k > c.k and x.status == "rejected"), None)
    if bigger is not None:
        out += _memory_lines(p, bigger)
    d = m.hidden_size
    out.append(f"  cache: {c.num_blocks} boundaries × {w.train_tokens_stored:,} tokens × {d} × 2 B = "
               f"{_tb(c.cache['hidden'])} + position ids {_tb(c.cache['position_ids'])} + validation "
               f"{_tb(c.cache['validation'])} = {_tb(c.cache_total)}; shards of {shard_rows(m, w)} sequences")
    t = c.times
    out.append(f"  collect: teacher forward of {m.num_layers} layers over all tokens on {lim.workers} worker(s) "
               f"{t['collect_compute_s'] / HOUR:.2f} h + cache I/O {t['collect_io_s'] / HOUR:.2f} h")
    out.append(f"  one block: teacher GEMMs {t['block_gemm_s'] / HOUR:.2f} h + hybrid fp32 "
               f"{t['block_hybrid_s'] / HOUR:.2f} h"
               f" + score-map passes {t['block_map_passes_s'] / HOUR:.2f} h + reads {t['block_io_s'] / HOUR:.2f} h"
               f" = {t['block_s'] / HOUR:.2f} h; × {c.waves} wave(s) = {t['transfer_s'] / HOUR:.2f} h")
    out += _cost_lines(p)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model preset name (configs/models) or a path to a config.json")
    parser.add_argument("--tokens", help="stage-1 training tokens, e.g. 20M")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length (default 1024)")
    parser.add_argument("--cluster", help="cluster preset (configs/clusters) for the limits; flags override it")
    parser.add_argument("--gpus", type=int, help="number of GPUs (0 = one CPU worker; default 1 or the cluster's)")
    parser.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB (default 80GB or the cluster's)")
    parser.add_argument("--host-memory", help="host RAM per node, e.g. 2TB (default: not limited)")
    parser.add_argument("--disk", help="disk for the boundary cache, e.g. 20TB (default: not limited)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, for host RAM (default 8)")
    parser.add_argument("--val-sequences", type=int, default=8, help="validation sequences cached (default 8)")
    parser.add_argument("--epochs", type=float, default=1.0, help="stage-1 epochs (default 1)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per step (default 1, the paper's)")
    parser.add_argument("--kernel", choices=KERNELS, default="quadratic",
                        help="stage-1 attention path: quadratic (n×n maps, reference) or chunked (O(n))")
    parser.add_argument("--feature-dim", type=int, default=64, help="Hedgehog feature dim f (default 64)")
    parser.add_argument("--window", type=int, default=64, help="softmax window (default 64)")
    parser.add_argument("--shard-size", default="512MB", help="target cache shard size (default 512MB)")
    parser.add_argument("--hardware", default="h100", help="time-constant preset (configs/hardware) or a YAML path")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--all", action="store_true", help="print every row of the table")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this machine and write configs/hardware/<--name or hostname>.yaml")
    parser.add_argument("--name", help="with --calibrate: preset name (default: the host name)")
    parser.add_argument("--out", help="with --calibrate: where to write the YAML")
    parser.add_argument("--disk-dir", help="with --calibrate: folder whose disk is measured (default: temp dir)")
    parser.add_argument("--disk-bytes", help="with --calibrate: size of the disk probe file (default 1GB on a GPU "
                                             "machine, 256MB otherwise)")


def _positive(value, flag: str, allow_zero: bool = False):
    if value is None or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag}: must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")
    return value


def _bytes_flag(value, flag: str) -> int | None:
    if value is None:
        return None
    nbytes = parse_bytes(value, flag)
    if nbytes <= 0:
        raise ConfigError(f"{flag}: must be a positive size like '80GB', got {value!r}")
    return nbytes


def load_model_arg(value: str) -> ModelConfig:
    """--model: a preset name, or a Hugging Face config.json (a file or a directory holding one)."""
    if not value:
        raise ConfigError("--model: required; name a preset (configs/models) or a config.json path")
    path = Path(value)
    if path.is_dir():
        path = path / "config.json"
    try:
        if path.suffix == ".json":
            if not path.exists():
                raise ConfigError(f"{value!r} does not exist")
            hf = json.loads(path.read_text())
            architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
            return load_model_config({"name": path.parent.name or path.stem, "architecture": architecture,
                                      "weights": str(path.parent), "hf_config": hf})
        return load_model_config(value)
    except (ConfigError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--model: {exc}") from None


def inputs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, Workload, Limits, Hardware]:
    """Validate the flags (errors name the flag) and build the planner's inputs."""
    model = load_model_arg(args.model)
    if args.tokens is None:
        raise ConfigError("--tokens: required, e.g. --tokens 20M")
    tokens = parse_count(args.tokens, "--tokens")
    _positive(tokens, "--tokens")
    cluster = None
    if args.cluster:
        try:
            cluster = load_cluster_config(args.cluster)
        except ConfigError as exc:
            raise ConfigError(f"--cluster: {exc}") from None
    gpus = args.gpus if args.gpus is not None else (cluster.num_gpus if cluster else 1)
    _positive(gpus, "--gpus", allow_zero=True)
    gpu_memory = _bytes_flag(args.gpu_memory, "--gpu-memory")
    if gpu_memory is None:
        gpu_memory = cluster.gpu_memory if cluster and cluster.gpu_memory > 0 else 80 * 10**9
    host = _bytes_flag(args.host_memory, "--host-memory")
    if host is None and cluster:
        host = cluster.host_memory
    disk = _bytes_flag(args.disk, "--disk")
    if disk is None and cluster:
        disk = cluster.disk
    workload = Workload(
        tokens=tokens,
        seq_len=_positive(args.seq_len, "--seq-len"),
        val_sequences=_positive(args.val_sequences, "--val-sequences", allow_zero=True),
        epochs=_positive(args.epochs, "--epochs"),
        micro_batch=_positive(args.micro_batch, "--micro-batch"),
        kernel=args.kernel,
        feature_dim=_positive(args.feature_dim, "--feature-dim"),
        window_size=_positive(args.window, "--window"),
        shard_bytes=_bytes_flag(args.shard_size, "--shard-size"),
    )
    if args.kernel not in KERNELS:
        raise ConfigError(f"--kernel: {args.kernel!r} is not one of {list(KERNELS)}")
    limits = Limits(gpus=gpus, gpu_memory=gpu_memory, host_memory=host, disk=disk,
                    gpus_per_node=_positive(args.gpus_per_node, "--gpus-per-node"))
    return model, workload, limits, load_hardware(args.hardware)


def main(args: argparse.Namespace) -> int:
    """Run `linearize plan`. Bad flags raise ConfigError naming the flag; returns 1 if no k is feasible."""
    if args.calibrate:
        path, values = calibrate(name=args.name, out=args.out, disk_dir=args.disk_dir,
                                 disk_bytes=_bytes_flag(args.disk_bytes, "--disk-bytes"))
        if args.json:
            print(json.dumps({"path": str(path), **values}, indent=2))
        else:
            print(f"wrote {path}")
            for key, value in values.items():
                print(f"  {key}: {value}")
        return 0
    result = plan(*inputs_from_args(args))
    if args.json:
        print(json.dumps(plan_to_dict(result), indent=2))
    else:
        print(format_plan(result, all_rows=getattr(args, "all", False)))
    return 0 if result.chosen else 1


# --------------------------------------------------------------------------------------------------
# Calibration: measure this machine's time constants.


def _timeit(fn, device, repeats: int) -> float:
    """Median seconds of fn() after a warm-up, with CUDA events on a GPU."""
    import torch

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _decoder_layer_rates(device, dtype) -> dict:
    """Forward and forward+backward TFLOP/s of a Llama-style decoder layer (RMSNorm, GQA attention with SDPA,
    SwiGLU MLP) at a small shape, from random weights."""
    import torch
    import torch.nn.functional as F

    if device.type == "cuda":
        B, n, d, H, Hkv, D, inter = 2, 1024, 4096, 32, 8, 128, 14336
    else:
        B, n, d, H, Hkv, D, inter = 1, 128, 256, 4, 2, 64, 688
    g = torch.Generator(device="cpu").manual_seed(0)

    def weight(rows, cols):
        return (torch.randn(rows, cols, generator=g) / math.sqrt(cols)).to(device, dtype).requires_grad_()

    wq, wk, wv, wo = weight(H * D, d), weight(Hkv * D, d), weight(Hkv * D, d), weight(d, H * D)
    wg, wu, wd = weight(inter, d), weight(inter, d), weight(d, inter)
    x = torch.randn(B, n, d, generator=g).to(device, dtype).requires_grad_()

    def rms(t):
        return t * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(t.dtype)

    def layer():
        h = rms(x)
        q = (h @ wq.T).view(B, n, H, D).transpose(1, 2)
        k = (h @ wk.T).view(B, n, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        v = (h @ wv.T).view(B, n, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, n, H * D)
        h2 = x + a @ wo.T
        m = rms(h2)
        return h2 + (F.silu(m @ wg.T) * (m @ wu.T)) @ wd.T

    def forward():
        with torch.no_grad():
            layer()

    def forward_backward():
        layer().float().pow(2).mean().backward()

    params = d * (H * D + 2 * Hkv * D) + d * H * D + 3 * d * inter
    fwd_flops = B * n * (2 * params + 2 * n * H * D)
    repeats = 5 if device.type == "cuda" else 3
    fwd_s = _timeit(forward, device, repeats)
    fb_s = _timeit(forward_backward, device, repeats)
    return {"layer_fwd_tflops": fwd_flops / fwd_s / 1e12, "layer_fwd_bwd_tflops": 3 * fwd_flops / fb_s / 1e12,
            "layer_shape": f"B={B} n={n} d={d} H={H}/{Hkv} D={D} I={inter}"}


def calibrate(name: str | None = None, out: str | None = None, disk_dir: str | None = None,
              disk_bytes: int | None = None) -> tuple[Path, dict]:
    """Measure matmul, decoder-layer, memory and disk throughput here; write a hardware preset YAML."""
    import tempfile

    import torch

    from pipeline.cache import disk_throughput

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmul on a CPU is emulated
    g = torch.Generator(device="cpu").manual_seed(0)

    def matmul_rate(size: int, dt) -> float:
        a = torch.randn(size, size, generator=g).to(device, dt)
        b = torch.randn(size, size, generator=g).to(device, dt)
        return 2 * size**3 / _timeit(lambda: a @ b, device, 10) / 1e12

    big = 8192 if device.type == "cuda" else 1024
    values: dict = {
        "matmul_tflops": matmul_rate(big, dtype),
        "fp32_tflops": matmul_rate(4096, torch.float32) if device.type == "cuda" else None,
    }
    if values["fp32_tflops"] is None:  # on a CPU the working dtype is already fp32
        values["fp32_tflops"] = values["matmul_tflops"]
    layer = _decoder_layer_rates(device, dtype)
    values["layer_tflops"] = layer["layer_fwd_tflops"]
    values["layer_fwd_bwd_tflops"] = layer["layer_fwd_bwd_tflops"]
    numel = (2**28 if device.type == "cuda" else 2**25)  # 1 GiB / 128 MiB of fp32
    src = torch.randn(numel, generator=g).to(device)
    dst = torch.empty_like(src)
    values["memory_GBps"] = 2 * src.numel() * 4 / _timeit(lambda: dst.copy_(src), device, 10) / GB
    del src, dst
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
        values["runtime_reserve_GB"] = context / GB + 1.0  # + 1 GB allocator fragmentation allowance
        device_name = torch.cuda.get_device_name()
    else:
        values["runtime_reserve_GB"] = 1.0
        device_name = platform.processor() or platform.machine()
    if disk_bytes is None:
        disk_bytes = (1024 if device.type == "cuda" else 256) * 2**20
    disk = disk_throughput(disk_dir or tempfile.gettempdir(), total_bytes=disk_bytes,
                           block_bytes=min(16 * 2**20, disk_bytes))
    values["disk_write_GBps"] = disk["write_Bps"] / GB
    values["disk_read_GBps"] = disk["read_Bps"] / GB
    values = {key: round(v, 3) for key, v in values.items()}
    host = socket.gethostname()
    preset = (name or host).replace("/", "-")
    path = Path(out) if out else HARDWARE_DIR / f"{preset}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""# Measured by `linearize plan --calibrate` on {host} ({device_name}), {stamp}.
# torch {torch.__version__}, working dtype {str(dtype).replace('torch.', '')}. Replace by re-running calibrate.
name: {preset}
measured: true
# 2*{big}^3 / t of a {big}x{big} matmul in {str(dtype).replace('torch.', '')} (for reference; the planner uses
# layer_tflops).
matmul_tflops: {values['matmul_tflops']}
# Decoder-layer forward (GEMMs + causal SDPA) at {layer['layer_shape']}: FLOPs / median time.
layer_tflops: {values['layer_tflops']}
# The same layer forward + backward (3x forward FLOPs) / median time (for reference).
layer_fwd_bwd_tflops: {values['layer_fwd_bwd_tflops']}
# fp32 matmul with torch's default precision (the hybrid attention runs in fp32).
fp32_tflops: {values['fp32_tflops']}
# Device-to-device copy of a {numel * 4 // 2**20} MiB fp32 tensor: bytes read + written / time.
memory_GBps: {values['memory_GBps']}
# Sequential write with fsync, then read with the page cache dropped, of a {disk['bytes'] // 2**20} MiB temp file
# in {disk_dir or tempfile.gettempdir()}.
disk_write_GBps: {values['disk_write_GBps']}
disk_read_GBps: {values['disk_read_GBps']}
# Device memory in use with no tensors allocated (CUDA context, libraries) + 1 GB allocator slack; 1 GB on a CPU.
runtime_reserve_GB: {values['runtime_reserve_GB']}
"""
    path.write_text(text)
    return path, values


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="linearize plan", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except ConfigError as _exc:
        print(f"error: {_exc}", file=sys.stderr)
        sys.exit(2)
