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
* time, as the driver (pipeline/run.py) and the stages (pipeline/stages.py) run it:
      collect     a chain of one task per boundary, each after the one before: task b > 0 builds block b-1's
                  teacher layers (random weights made on the host, or read from safetensors), reads boundary
                  b-1, runs the layers over all tokens (moving the boundary to the GPU and back) and writes
                  boundary b; task 0 embeds the tokens. The last block's layers never run in collect.
      one block   building its k layers + the evaluation passes (data validation sequences, every eval_every
                  optimizer steps) + training: the teacher's GEMMs at the decoder-layer rate and the student
                  hybrid at a measured multiple of its FLOP and memory-pass model; the boundary read overlaps it.
      wall        the schedule: block b starts when boundary b is complete, on a free GPU (collect holds one).
  Every task also pays a fixed overhead (Ray dispatch, worker start). Stage 2 (LoRA, for the cost line): its
  FLOP bound times a measured efficiency, plus building the model partitioned under ZeRO-3.

It keeps the k that fit GPU memory, disk and host RAM, and chooses the smallest wall time (ties: larger k,
which needs less disk). Time constants come from configs/hardware/<name>.yaml: rates that `--calibrate`
measures on this machine, and constants fitted on measured pipeline runs (each documented in the preset with
the run it came from); `--check RUN.json ...` re-plans measured runs (pipeline/bench_scale.py) with their own
inputs and prints planned against measured, the fitted runs and the ones they are checked on.

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

from pipeline.config import CONFIGS_DIR, ConfigError, ModelConfig, RunConfig, load_cluster_config, load_model_config
from pipeline.config import load_yaml, resolve_run_config
from pipeline.config import parse_bytes, parse_count

HARDWARE_DIR = CONFIGS_DIR / "hardware"
KERNELS = ("quadratic", "chunked")
WEIGHT_SOURCES = ("random", "checkpoint")
GB, TB, HOUR = 1e9, 1e12, 3600.0
FP32, BF16, INT64 = 4, 2, 8
TRAINABLE_BYTES_PER_PARAM = 20  # fp32 parameter, grad, AdamW m and v, and the best-checkpoint copy


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Hardware:
    """Time constants of one kind of worker (configs/hardware/<name>.yaml).

    The first group is calibrated by `--calibrate` (rates of this machine). The second group is fitted on measured
    pipeline runs (`--check` re-plans those runs and prints planned against measured); each is optional, and a
    preset that lacks one leaves that term out of its plans (the plan says which). The preset's comments name the
    run and the arithmetic behind every fitted value."""

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
    """Sequential read throughput: cache boundaries, and layer weights from a safetensors checkpoint."""
    runtime_reserve_GB: float
    """Device memory the model cannot use: CUDA context, library workspaces, allocator fragmentation."""
    measured: bool = False
    # Fitted on measured runs; None = not measured for this preset (the term is left out).
    stage1_attention_slowdown: float | None = None
    """Stage-1 step time beyond the teacher's GEMMs, over the modelled time of the chunked hybrid (its fp32 FLOPs
    at fp32_tflops + its map passes at memory_GBps). A ratio to this machine's own rates. Measured with fp32
    features (attention.feature_dtype 'float32'), which take the Triton kernels to fp32."""
    stage1_attention_slowdown_model_features: float | None = None
    """The same ratio with the features in the model dtype (attention.feature_dtype 'model', the default): the
    kernels' bf16 path. None: stage1_attention_slowdown is used for both."""
    eval_step_fraction: float | None = None
    """Seconds of a stage-1 evaluation pass per token and layer (forward only, per-layer MSE read back), as a
    fraction of a training micro-step's per token and layer. A ratio."""
    weight_build_params_per_s: float | None = None
    """Deterministic random weights made by one task on the host and moved to its GPU, parameters per second
    (per task; the measured runs had 1 to 4 tasks building at once and showed no dependence on that number)."""
    host_copy_GBps: float | None = None
    """Collect: moving a boundary between the GPU and host memory (to the GPU, back, and joined into a shard),
    bytes per second of one boundary moved once."""
    cache_write_GBps: float | None = None
    """Effective rate of writing cache shards (safetensors serialisation, sha256, write, fsync). None: the raw
    disk_write_GBps."""
    task_overhead_s: float | None = None
    """Seconds per Ray task, inside it, beyond its modelled work: CUDA start, plan and cache indexes."""
    task_start_s: float | None = None
    """Seconds from a task's submission, its GPU free, to its function starting: Ray starts a fresh worker process
    for every GPU task (cluster/blocks.py, max_calls=1), which imports torch and the project. In the collect
    chain and the schedule, not in a task's own wall."""
    lora_efficiency: float | None = None
    """Stage 2: tokens/s per rank (ZeRO-3) over the FLOP bound at layer_tflops (4 FLOPs per token per matmul
    weight: forward and activation gradients; 6 with gradient checkpointing). A ratio. Measured with fp32
    features. None: stage 2 is the FLOP-bound lower bound."""
    lora_efficiency_model_features: float | None = None
    """The same ratio with the features in the model dtype (the default). None: lora_efficiency is used."""
    lora_activation_bytes: float | None = None
    """Stage 2: bytes of saved activations per token, per unit of hidden size, per decoder layer, without gradient
    checkpointing (the Llama MLP's and attention's saved tensors, the hybrid attention's, LoRA's). None: the
    stage-2 memory line is left out."""
    lora_startup_params_per_s: float | None = None
    """Stage 2: building the model partitioned under ZeRO-3 plus the DeepSpeed engine, parameters per second
    per rank (each rank makes 1/world of the tensors)."""
    fitted_on: str = ""
    """The model preset of the run the fitted constants came from (`--check` marks its rows 'fit')."""
    also_fitted_on_run: str = ""
    """A run JSON (file stem) some constants were refitted on later; `--check` marks its rows 'fit' too."""
    source: str = ""

    FITTED = ("stage1_attention_slowdown", "stage1_attention_slowdown_model_features", "eval_step_fraction",
              "weight_build_params_per_s", "host_copy_GBps", "cache_write_GBps", "task_overhead_s", "task_start_s",
              "lora_efficiency", "lora_efficiency_model_features", "lora_activation_bytes", "lora_startup_params_per_s")

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "Hardware":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        optional = ("measured", "fitted_on", "also_fitted_on_run", *cls.FITTED)
        missing = [n for n in names if n not in optional and n not in data]
        if missing:
            raise ConfigError(f"--hardware: {source or 'preset'} lacks {missing}")
        unknown = sorted(set(data) - set(names) - {"matmul_tflops", "layer_fwd_bwd_tflops"})
        if unknown:
            raise ConfigError(f"--hardware: {source or 'preset'}: unknown keys {unknown}; valid: {names}")
        values = {}
        for key in names:
            if key not in data:
                continue
            value = data[key]
            if key in ("name", "fitted_on", "also_fitted_on_run"):
                values[key] = str(value)
            elif key == "measured":
                values[key] = bool(value)
            elif value is None and key in cls.FITTED:
                values[key] = None
            else:
                zero_ok = key in ("runtime_reserve_GB", "task_overhead_s", "task_start_s")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                        value == 0 and not zero_ok):
                    raise ConfigError(f"--hardware: {source}: {key} must be "
                                      f"{'a number >= 0' if zero_ok else 'a positive number'}, got {value!r}")
                values[key] = float(value)
        return cls(source=source, **values)

    def left_out(self) -> list[str]:
        """The fitted constants this preset lacks (their terms are not in its plans)."""
        falls_back = ("cache_write_GBps", "stage1_attention_slowdown_model_features", "lora_efficiency_model_features",
                      "lora_activation_bytes")
        return [key for key in self.FITTED if getattr(self, key) is None and key not in falls_back]

    def stage1_slowdown(self, feature_dtype: str) -> float | None:
        """The stage-1 constant for runs whose features reach the kernels in `feature_dtype`."""
        if feature_dtype == "model" and self.stage1_attention_slowdown_model_features is not None:
            return self.stage1_attention_slowdown_model_features
        return self.stage1_attention_slowdown

    def lora_efficiency_for(self, feature_dtype: str) -> float | None:
        """The stage-2 constant for runs whose features reach the kernels in `feature_dtype`."""
        if feature_dtype == "model" and self.lora_efficiency_model_features is not None:
            return self.lora_efficiency_model_features
        return self.lora_efficiency


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
    feature_dtype: str = "model"
    """attention.feature_dtype: 'model' (bf16 kernels) or 'float32' (fp32 kernels); picks the stage-1 constant."""
    window_size: int = 64
    shard_bytes: int = 512 * 10**6
    """Target size of one cache shard (the reader holds one, plus one prefetched)."""
    grad_accum: int = 8
    """Micro-batches per optimizer step (transfer.grad_accum; the LoLCATs recipe's 8)."""
    eval_every: int = 100
    """Optimizer steps between evaluations on the validation sequences (transfer.eval_every; the recipe's 100)."""
    weights: str | None = None
    """'random' (deterministic weights generated on the host) or 'checkpoint' (safetensors read from disk);
    None: the model preset's (model.weights)."""
    lora_tokens: int | None = None
    """Stage 2's training tokens (finetune.train_tokens); None: as many as stage 1 trains on (the LoLCATs recipe:
    20M and 20M)."""

    @property
    def stage2_tokens(self) -> float:
        """What stage 2 trains on: lora_tokens, else stage 1's tokens times its epochs."""
        return self.lora_tokens if self.lora_tokens is not None else self.tokens * self.epochs

    @property
    def train_sequences(self) -> int:
        return math.ceil(self.tokens / self.seq_len)

    @property
    def micro_steps(self) -> int:
        return math.ceil(self.train_sequences * self.epochs / self.micro_batch)

    @property
    def evaluations(self) -> int:
        """Evaluation passes of one block, as pipeline/stages.py transfer_block runs them: at step 0, every
        eval_every optimizer steps, and after the last step unless it was just evaluated."""
        steps = self.micro_steps // self.grad_accum
        return 1 + math.ceil(steps / self.eval_every)

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


def step_seconds(model: ModelConfig, workload: Workload, hardware: Hardware) -> dict[str, float]:
    """Seconds per token and layer of one stage-1 training micro-step, by part: the teacher's GEMMs and SDPA in
    bf16 at layer_tflops; the student hybrid's fp32 FLOPs and its score-map passes as modelled for the workload's
    kernel; and 'attention', what the plan counts for the hybrid. With the preset's stage1_attention_slowdown
    (measured on the chunked path, which is what the stages run: 'triton' on a GPU, 'blocked' on a CPU) that is
    the chunked model times the slowdown, plus whatever the quadratic kernel adds over the chunked model at the
    calibrated rates (the quadratic path was not measured)."""
    def hybrid_and_maps(w: Workload) -> tuple[float, float]:
        hybrid = flops_per_token_layer(model, w)["hybrid_fp32"] / (hardware.fp32_tflops * 1e12)
        maps = (KERNEL_PROFILES[w.kernel].map_passes * model.num_heads * _score_map_keys(w) * FP32
                / (hardware.memory_GBps * GB))
        return hybrid, maps

    flops = flops_per_token_layer(model, workload)
    gemm = (flops["gemm"] + flops["teacher_attention_bf16"]) / (hardware.layer_tflops * 1e12)
    hybrid, maps = hybrid_and_maps(workload)
    attention = hybrid + maps
    slowdown = hardware.stage1_slowdown(workload.feature_dtype)
    if slowdown is not None:
        chunked = sum(hybrid_and_maps(dataclasses.replace(workload, kernel="chunked")))
        attention = slowdown * chunked + max(0.0, attention - chunked)
    return {"gemm": gemm, "hybrid": hybrid, "map_passes": maps, "attention": attention, "step": gemm + attention}


def weights_source(model: ModelConfig, workload: Workload) -> str:
    """'random' or 'checkpoint': the workload's choice, else the model preset's."""
    if workload.weights is not None:
        return workload.weights
    return "random" if model.weights == "random" else "checkpoint"


def build_seconds(params: float, model: ModelConfig, workload: Workload, hardware: Hardware) -> float:
    """One task putting `params` weights on its device: generated on the host (random weights; 0 when the preset
    has no weight_build_params_per_s) or read from the safetensors checkpoint (bf16) at the disk's read rate."""
    if weights_source(model, workload) == "random":
        rate = hardware.weight_build_params_per_s
        return params / rate if rate else 0.0
    return params * BF16 / (hardware.disk_read_GBps * GB)


def block_layers(model: ModelConfig, k: int) -> list[int]:
    """Layers of each block: k, ..., k, and what is left for the last."""
    num_blocks = math.ceil(model.num_layers / k)
    return [k] * (num_blocks - 1) + [model.num_layers - (num_blocks - 1) * k]


def collect_tasks(model: ModelConfig, k: int, workload: Workload, hardware: Hardware) -> list[dict[str, float]]:
    """Seconds of each collect task, by part. Task b writes boundary b: task 0 embeds the token rows; task b > 0
    builds block b-1's teacher layers, reads boundary b-1 and runs those layers over it (the last block's layers
    are never run in collect). Every boundary moves from the GPU to the host once, and the inputs of task b > 0
    to the GPU once more (host_copy_GBps). Each task waits task_start_s for its worker first: the chain's tasks
    start one after another."""
    d = model.hidden_size
    tokens = workload.train_tokens_stored + workload.val_tokens
    hidden = tokens * d * BF16  # what crosses between GPU and host
    boundary = tokens * (d * BF16 + INT64)  # what the shard files hold
    flops = flops_per_token_layer(model, workload)

    def copies(times: int) -> float:
        return times * hidden / (hardware.host_copy_GBps * GB) if hardware.host_copy_GBps else 0.0

    write = boundary / ((hardware.cache_write_GBps or hardware.disk_write_GBps) * GB)
    overhead, start = hardware.task_overhead_s or 0.0, hardware.task_start_s or 0.0
    tasks = [{"start": start, "overhead": overhead,
              "build": build_seconds(model.vocab_size * d, model, workload, hardware),
              "read": 0.0, "compute": copies(1), "write": write}]
    for layers in block_layers(model, k)[:-1]:
        forward = tokens * layers * (flops["gemm"] + flops["sdpa_causal"]) / (hardware.layer_tflops * 1e12)
        tasks.append({"start": start, "overhead": overhead,
                      "build": build_seconds(layers * model.params_per_layer, model, workload, hardware),
                      "read": boundary / (hardware.disk_read_GBps * GB), "compute": forward + copies(2),
                      "write": write})
    return tasks


def block_task(model: ModelConfig, layers: int, workload: Workload, hardware: Hardware) -> dict[str, float]:
    """Seconds of one transfer task of `layers` layers, by part (pipeline/stages.py transfer_block): the task's
    overhead, building its layers, every evaluation pass, and training, which the boundary read (a prefetching
    reader) overlaps; 'total' is their sum."""
    step = step_seconds(model, workload, hardware)
    tokens = workload.train_tokens_stored * workload.epochs
    row_bytes = model.hidden_size * BF16 + INT64
    read = (tokens + workload.val_tokens) * row_bytes / (hardware.disk_read_GBps * GB)
    eval_pass = workload.val_tokens * layers * step["step"] * (hardware.eval_step_fraction or 0.0)
    parts = {
        "overhead": hardware.task_overhead_s or 0.0,
        "build": build_seconds(layers * model.params_per_layer, model, workload, hardware),
        "eval": workload.evaluations * eval_pass,
        "train": max(tokens * layers * step["step"], read),
    }
    return {**parts, "total": sum(parts.values()), "eval_pass": eval_pass, "read": read,
            "gemm": tokens * layers * step["gemm"], "hybrid": tokens * layers * step["hybrid"],
            "map_passes": tokens * layers * step["map_passes"], "attention": tokens * layers * step["attention"]}


def schedule_wall_s(collect_s: list[float], block_s: list[float], workers: int) -> float:
    """Wall seconds of collect + transfer as the driver runs them (pipeline/run.py Driver.blocks): collect task b
    is submitted when boundary b-1 is complete (a chain), the transfer of block b when boundary b is; each task
    holds one of `workers` GPUs, and waits for the earliest free one in the order the driver submits them
    (collect b+1, then transfer b). A transfer-only run is collect_s = [0, ...]."""
    free = [0.0] * max(workers, 1)

    def run(submitted: float, seconds: float) -> float:
        i = free.index(min(free))
        free[i] = max(free[i], submitted) + seconds
        return free[i]

    ready = run(0.0, collect_s[0])  # boundary 0 is complete
    ends = [ready]
    for b, seconds in enumerate(block_s):
        next_ready = run(ready, collect_s[b + 1]) if b + 1 < len(collect_s) else ready
        ends += [run(ready, seconds), next_ready]
        ready = next_ready
    return max(ends)


def block_times(model: ModelConfig, k: int, workload: Workload, hardware: Hardware,
                limits: Limits) -> dict[str, float]:
    """Seconds: the collect chain by part, one full k-layer block by part, and the wall time of the schedule."""
    collect = collect_tasks(model, k, workload, hardware)
    blocks = {n: block_task(model, n, workload, hardware) for n in set(block_layers(model, k))}
    collect_s = sum(sum(task.values()) for task in collect)
    start = hardware.task_start_s or 0.0  # a transfer task's worker starts too; its own wall (block_s) excludes it
    wall = schedule_wall_s([sum(task.values()) for task in collect],
                           [start + blocks[n]["total"] for n in block_layers(model, k)], limits.workers)
    full = blocks[k]  # block_layers always starts with k
    return {
        "task_start_s": start,
        "collect_start_s": sum(t["start"] for t in collect),
        "collect_overhead_s": sum(t["overhead"] for t in collect),
        "collect_build_s": sum(t["build"] for t in collect),
        "collect_compute_s": sum(t["compute"] for t in collect),
        "collect_io_s": sum(t["read"] + t["write"] for t in collect),
        "collect_s": collect_s,
        "block_overhead_s": full["overhead"], "block_build_s": full["build"], "block_eval_s": full["eval"],
        "block_gemm_s": full["gemm"], "block_hybrid_s": full["hybrid"], "block_map_passes_s": full["map_passes"],
        "block_attention_s": full["attention"], "block_train_s": full["train"], "block_io_s": full["read"],
        "block_s": full["total"], "transfer_s": wall - collect_s, "wall_s": wall,
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
        times=block_times(model, k, workload, hardware, limits),
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


def _count(tokens: float) -> str:
    return f"{tokens / 1e6:.3g}M" if tokens >= 1e6 else f"{tokens / 1e3:.3g}K"


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


def matmul_params(model: ModelConfig) -> int:
    """Weights each token meets in a matmul: the decoder layers and the LM head (the embedding is a lookup)."""
    return model.num_layers * model.params_per_layer + model.vocab_size * model.hidden_size


def total_params(model: ModelConfig) -> int:
    """Every weight of the model: embedding, layers, final norm, and the LM head unless tied to the embedding."""
    heads = 1 if model.hf_config.get("tie_word_embeddings") else 2
    return model.num_layers * model.params_per_layer + heads * model.vocab_size * model.hidden_size + model.hidden_size


def lora_tokens_per_s(model: ModelConfig, hardware: Hardware, gradient_checkpointing: bool = False,
                      feature_dtype: str = "model") -> float:
    """Stage-2 training tokens/s of one rank: the FLOP bound (forward 2 FLOPs and activation gradients 2 FLOPs per
    matmul weight per token; the frozen base needs no weight gradients, LoRA's are negligible; gradient
    checkpointing runs the forward again in the backward: 2 more) at layer_tflops, times the preset's measured
    efficiency for the features' dtype (ZeRO-3 gathers, launch overheads, the hybrid attention), or the bound."""
    flops = (6 if gradient_checkpointing else 4) * matmul_params(model)
    return hardware.layer_tflops * 1e12 / flops * (hardware.lora_efficiency_for(feature_dtype) or 1.0)


def lora_startup_s(model: ModelConfig, hardware: Hardware, gpus: int) -> float:
    """Stage 2's model build (partitioned under ZeRO-3, each rank making 1/gpus of the tensors) and DeepSpeed
    engine start; 0 when the preset has no lora_startup_params_per_s."""
    rate = hardware.lora_startup_params_per_s
    return total_params(model) / max(gpus, 1) / rate if rate else 0.0


LOGIT_COPIES = 3
"""Stage 2's logits live in fp32 about three times at the peak: the upcast logits, the log-softmax, its gradient."""


def lora_memory(model: ModelConfig, seq_len: int, micro_batch: int, gpus: int, hardware: Hardware,
                gradient_checkpointing: bool) -> dict[str, float]:
    """Bytes of one stage-2 rank at its peak (torch's allocator; the runtime reserve comes on top), ZeRO-3 over
    `gpus` ranks, bf16: the rank's partition of the frozen weights; two decoder layers gathered whole (the one
    computing and the one prefetched); the logits in fp32; the saved activations, all layers' (lora_activation_bytes
    per token, hidden unit and layer) or, with gradient checkpointing, each layer's bf16 input plus one layer's
    activations while it is recomputed. Fitted on the 8B run (no checkpointing), checked on the two 70B runs."""
    tokens, d = seq_len * micro_batch, model.hidden_size
    layer_activations = (hardware.lora_activation_bytes or 0.0) * tokens * d
    saved = (model.num_layers * tokens * d * BF16 + layer_activations if gradient_checkpointing
             else model.num_layers * layer_activations)
    return {"weights_partition": total_params(model) * BF16 / max(gpus, 1),
            "gathered_layers": 2 * model.params_per_layer * BF16,
            "logits": LOGIT_COPIES * tokens * model.vocab_size * FP32,
            "saved_activations": saved}


def lora_plan(model: ModelConfig, limits: Limits, hardware: Hardware, seq_len: int,
              micro_batch: int = 1) -> dict:
    """Stage 2 on all GPUs: without gradient checkpointing when a rank fits the GPU memory (less the runtime
    reserve), else with it (50% more FLOPs), else it does not fit. {"gradient_checkpointing", "fits", "memory"
    (the chosen setting's terms), "without_bytes"}."""
    def total(checkpointing: bool) -> tuple[dict[str, float], float]:
        terms = lora_memory(model, seq_len, micro_batch, limits.gpus, hardware, checkpointing)
        return terms, sum(terms.values()) + hardware.runtime_reserve_GB * GB

    plain, plain_total = total(False)
    limit = limits.gpu_memory if limits.gpus else limits.host_memory
    if limit is None or plain_total <= limit or hardware.lora_activation_bytes is None:
        return {"gradient_checkpointing": False, "fits": True, "memory": plain, "without_bytes": plain_total}
    recomputed, recomputed_total = total(True)
    return {"gradient_checkpointing": True, "fits": recomputed_total <= limit, "memory": recomputed,
            "without_bytes": plain_total}


def lora_stage_s(model: ModelConfig, workload: Workload, hardware: Hardware, gpus: int,
                 gradient_checkpointing: bool = False) -> float:
    """Stage 2 over workload.lora_tokens (default: stage 1's tokens), on all GPUs: start-up plus training. A
    FLOP-bound lower bound when the preset has no lora_efficiency."""
    train = workload.stage2_tokens / (max(gpus, 1) * lora_tokens_per_s(
        model, hardware, gradient_checkpointing, workload.feature_dtype))
    return lora_startup_s(model, hardware, gpus) + train


def cost(p: Plan) -> dict:
    """GPU-hours of the chosen plan's stage 1 and of stage 2, with the paper's where published."""
    c, gpus = p.chosen, max(p.limits.gpus, 1)
    stage2 = lora_plan(p.model, p.limits, p.hardware, p.workload.seq_len)
    stage2_s = lora_stage_s(p.model, p.workload, p.hardware, p.limits.gpus, stage2["gradient_checkpointing"])
    w = p.workload
    out = {"stage 1": {"wall_h": c.wall_s / HOUR, "gpus": gpus, "gpu_hours": c.wall_s / HOUR * gpus,
                       "tokens": w.tokens * w.epochs},
           "stage 2 (LoRA)": {"wall_h": stage2_s / HOUR, "gpus": gpus, "gpu_hours": stage2_s / HOUR * gpus,
                              "tokens": w.stage2_tokens,
                              "lower_bound": p.hardware.lora_efficiency_for(p.workload.feature_dtype) is None,
                              "gradient_checkpointing": stage2["gradient_checkpointing"], "fits": stage2["fits"],
                              "memory_bytes_per_gpu": sum(stage2["memory"].values())
                              + p.hardware.runtime_reserve_GB * GB,
                              "memory_terms": stage2["memory"], "without_checkpointing_bytes": stage2["without_bytes"]}}
    for stage, (hours, paper_gpus) in PAPER_COSTS.get(p.model.name, {}).items():
        out[stage]["paper"] = {"wall_h": hours, "gpus": paper_gpus, "gpu_hours": hours * paper_gpus}
    return out


def _cost_lines(p: Plan) -> list[str]:
    lines, costs = [], cost(p)
    if p.hardware.lora_activation_bytes is not None:
        stage2 = costs["stage 2 (LoRA)"]
        terms, reserve = stage2["memory_terms"], p.hardware.runtime_reserve_GB * GB
        where = f"ZeRO-3 over {max(p.limits.gpus, 1)} GPUs" if p.limits.gpus else "one CPU worker"
        setting = ("gradient checkpointing on (without it "
                   f"{stage2['without_checkpointing_bytes'] / GB:.1f} GB)" if stage2["gradient_checkpointing"]
                   else "no gradient checkpointing needed")
        lines.append(f"  stage 2 (LoRA): {where}, micro-batch 1 × {p.workload.seq_len}: "
                     f"{stage2['memory_bytes_per_gpu'] / GB:.1f} GB per GPU = weights {terms['weights_partition'] / GB:.1f} + 2 gathered layers "
                     f"{terms['gathered_layers'] / GB:.1f} + logits {terms['logits'] / GB:.1f} + saved activations "
                     f"{terms['saved_activations'] / GB:.1f} + reserve {reserve / GB:.1f}; {setting}"
                     + ("" if stage2["fits"] else f"; over the {_limit(p.limits.gpu_memory, GB, 'GB')} of a GPU: "
                        "more GPUs or fewer tokens per micro-batch (the model's checks are within 2%; its "
                        "2-gathered-layers term is the least certain at this size)"))
    for stage, value in costs.items():
        kind = "FLOP-bound lower bound: " if value.get("lower_bound") else ""
        line = (f"  cost, {stage}: {kind}{value['wall_h']:.2f} h × {value['gpus']} GPUs = "
                f"{value['gpu_hours']:.1f} GPU-hours over {_count(value['tokens'])} tokens")
        if "paper" in value:
            paper = value["paper"]
            line += (f" (LoLCATs paper: {paper['wall_h']:g} h on {paper['gpus']} H100s = "
                     f"{paper['gpu_hours']:g} GPU-hours)")
        lines.append(line)
    hw = p.hardware
    if hw.fitted_on:
        note = f"  (fitted terms from measured {hw.fitted_on} runs; `linearize plan --check RUN.json ...` compares"
        note += " plans with measured runs"
    else:
        note = "  (no fitted constants in this preset: FLOP-model times, which measured runs found 5-12x optimistic"
    left_out = hw.left_out()
    if left_out:
        note += f"; not measured for {hw.name}, so left out: {', '.join(left_out)}"
    lines.append(note + ")")
    return lines


def _constants_line(hw: Hardware) -> str:
    """The preset's fitted constants, one line."""
    described = [  # (value, how it reads)
        (hw.stage1_attention_slowdown, lambda v: f"stage-1 hybrid × {v:g} (fp32 features)"),
        (hw.stage1_attention_slowdown_model_features, lambda v: f"× {v:g} (model-dtype features)"),
        (hw.eval_step_fraction, lambda v: f"evaluation {v:g} of a step"),
        (hw.weight_build_params_per_s, lambda v: f"random weights {v / 1e9:g}B params/s per task"),
        (hw.host_copy_GBps, lambda v: f"GPU<->host copies {v:g} GB/s"),
        (hw.cache_write_GBps, lambda v: f"cache writes {v:g} GB/s"),
        (hw.task_overhead_s, lambda v: f"{v:g} s per task"),
        (hw.task_start_s, lambda v: f"{v:g} s to start a task's worker"),
        (hw.lora_efficiency, lambda v: f"stage-2 efficiency {v:g} (fp32 features)"),
        (hw.lora_efficiency_model_features, lambda v: f"{v:g} (model-dtype features)"),
        (hw.lora_startup_params_per_s, lambda v: f"stage-2 start {v / 1e6:g}M params/s per rank"),
    ]
    parts = [describe(value) for value, describe in described if value is not None]
    return "  fitted: " + ("; ".join(parts) if parts else "none") + (f" (on {hw.fitted_on})" if hw.fitted_on else "")


def format_plan(p: Plan, all_rows: bool = False) -> str:
    m, w, lim, hw = p.model, p.workload, p.limits, p.hardware
    workers = f"{lim.gpus} GPUs" if lim.gpus else "1 CPU worker"
    out = [
        f"linearize plan: {m.name} ({m.num_layers} layers, d={m.hidden_size}, {m.num_heads} heads × {m.head_dim}, "
        f"{m.params_per_layer / 1e9:.3f}B params per layer)",
        f"  {w.tokens:,} training tokens ({w.train_sequences:,} sequences of {w.seq_len}) × {w.epochs:g} epoch(s) "
        f"+ {w.val_sequences} validation sequences; kernel {w.kernel}; micro-batch {w.micro_batch} × "
        f"{w.grad_accum} per step, evaluation every {w.eval_every} steps; {weights_source(m, w)} weights",
        f"  cluster: {workers}, GPU memory {_limit(lim.gpu_memory if lim.gpus else None, GB, 'GB')}, "
        f"host RAM per node {_limit(lim.host_memory, GB, 'GB')}, disk {_limit(lim.disk, TB, 'TB')}",
        f"  time constants: {hw.name} ({hw.source}; measured: {str(hw.measured).lower()}): layer "
        f"{hw.layer_tflops:g} TFLOP/s bf16, fp32 {hw.fp32_tflops:g} TFLOP/s, memory {hw.memory_GBps:g} GB/s, "
        f"disk write {hw.disk_write_GBps:g} / read {hw.disk_read_GBps:g} GB/s per worker",
        _constants_line(hw),
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
    hybrid = f"hybrid fp32 {_dur(t['block_hybrid_s'])} + score-map passes {_dur(t['block_map_passes_s'])}"
    slowdown = hw.stage1_slowdown(w.feature_dtype)
    if slowdown is not None:
        hybrid = (f"hybrid {_dur(t['block_attention_s'])} (measured: {slowdown:g} × the chunked model, "
                  f"{w.feature_dtype} features)")
    out.append(f"  collect: a chain of {c.num_blocks} tasks, one per boundary, each after the one before: teacher "
               f"forward of {m.num_layers - c.last_block_layers} layers over all tokens with GPU<->host copies "
               f"{_dur(t['collect_compute_s'])} + building weights {_dur(t['collect_build_s'])} + cache I/O "
               f"{_dur(t['collect_io_s'])} + task overheads {_dur(t['collect_overhead_s'])} + worker starts "
               f"{_dur(t['collect_start_s'])} = {_dur(t['collect_s'])}")
    out.append(f"  one block: overhead {_dur(t['block_overhead_s'])} + {weights_source(m, w)} weights "
               f"{_dur(t['block_build_s'])} + {w.evaluations} evaluations {_dur(t['block_eval_s'])} + training "
               f"{_dur(t['block_train_s'])} (teacher GEMMs {_dur(t['block_gemm_s'])} + {hybrid}; the boundary read "
               f"{_dur(t['block_io_s'])} overlaps it) = {_dur(t['block_s'])}")
    start = f" {_dur(t['task_start_s'])} (its worker's start)" if t["task_start_s"] else ""
    out.append(f"  wall: {_dur(t['wall_s'])}: block b starts{start} after boundary b is complete, the last one after "
               f"the whole collect chain ({c.waves} wave{'s' if c.waves > 1 else ''})")
    out += _cost_lines(p)
    return "\n".join(out)


def _dur(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < HOUR else f"{seconds / HOUR:.2f} h"


# --------------------------------------------------------------------------------------------------
# Check: re-plan measured runs (the JSON of pipeline/bench_scale.py) and compare.

CHECK_TOLERANCE = 0.20
"""A planned quantity is 'within' when |planned / measured - 1| <= this."""
CHECK_KIND = "planner_check"
"""The 'kind' of --check's own JSON, so a glob over the folder that holds it skips it."""


def run_inputs(config: RunConfig) -> tuple[Workload, Limits]:
    """The planner's inputs of a run config, as the stages run it: the chunked kernel profile, because the stages
    build the hybrid with implementation 'auto' ('triton' on a GPU, 'blocked' on a CPU)."""
    transfer, cluster = config.transfer, config.cluster
    workload = Workload(tokens=transfer.train_tokens, seq_len=config.data.seq_len,
                        val_sequences=config.data.validation_sequences, micro_batch=transfer.micro_batch_size,
                        kernel="chunked", feature_dim=config.attention.feature_dim,
                        feature_dtype=config.attention.feature_dtype, window_size=config.attention.window_size,
                        grad_accum=transfer.grad_accum, eval_every=transfer.eval_every,
                        lora_tokens=config.finetune.train_tokens)
    limits = Limits(gpus=cluster.num_gpus, gpu_memory=cluster.gpu_memory or None,
                    host_memory=cluster.host_memory or None, disk=cluster.disk or None)
    return workload, limits


def _field(data: dict, path: str, source: str):
    """data[a][b]... for path 'a.b'; a clear error naming the file and the field when it is missing or null."""
    value = data
    for key in path.split("."):
        if not isinstance(value, dict) or value.get(key) is None:
            raise ConfigError(f"--check: {source} has no {path!r}; give the JSON that "
                              "`python -m pipeline.bench_scale run` or `scaling` wrote (and, for a resumed run or a "
                              "scaling run, the JSON of the original run with it)")
        value = value[key]
    return value


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _check_row(quantity: str, planned: float, measured: float, note: str = "") -> dict:
    ratio = planned / measured if measured else math.inf
    return {"quantity": quantity, "planned": planned, "measured": measured, "ratio": ratio,
            "within": abs(ratio - 1) <= CHECK_TOLERANCE, "note": note}


def _load_runs(paths: list[str]) -> tuple[dict[str, dict], list[tuple[str, dict]]]:
    """Run JSON merged by run directory (a resumed run's JSON adds to its first one's), and scaling JSON."""
    runs: dict[str, dict] = {}
    scalings = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--check: {path}: cannot read it as JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--check: {path}: expected a JSON object, got {type(data).__name__}")
        if data.get("kind") == CHECK_KIND:
            continue  # this command's own output
        if data.get("mode") == "scaling":
            scalings.append((path, data))
            continue
        # A run is its directory and its config: a later run in the same directory with another config (another
        # lease, another budget) is a run of its own; a JSON without a config (a resume's summary) adds to the
        # latest run of its directory.
        run_dir = _field(data, "run_dir", path)
        if "config" in data:
            key = f"{run_dir} {json.dumps(data['config'], sort_keys=True)}"
        else:
            key = next((k for k in reversed(runs) if k.split(" ", 1)[0] == run_dir), run_dir)
        merged = runs.setdefault(key, {"files": []})
        merged["files"].append(path)
        merged.update({key: value for key, value in data.items() if key != "files"})
    return runs, scalings


def _block_rows(transfers: list[dict], model: ModelConfig, workload: Workload, hardware: Hardware, source: str,
                note: str) -> list[dict]:
    """Each part of a transfer task and its whole, planned against the mean of the blocks that started fresh (a
    block resumed after a fault did less)."""
    fresh = [t for i, t in enumerate(transfers) if not _field(t, "resumed_from_micro_step", f"{source} transfer[{i}]")]
    for i, t in enumerate(fresh):
        for key in ("wall_s", "load_s", "train_s", "eval_s", "micro_steps", "layers"):
            _field(t, key, f"{source} transfer[{i}]")
    if not fresh:
        return []
    layers = fresh[0]["layers"][1] - fresh[0]["layers"][0]
    task = block_task(model, layers, workload, hardware)
    # train_s counts the micro-steps up to the last optimizer step (pipeline/stages.py transfer_block).
    timed_steps = fresh[0]["micro_steps"] // workload.grad_accum * workload.grad_accum
    step = step_seconds(model, workload, hardware)["step"]
    timed = timed_steps * workload.micro_batch * workload.seq_len * layers * step
    measured = {key: _mean([t[key] for t in fresh]) for key in ("load_s", "train_s", "eval_s", "wall_s")}
    return [
        _check_row("one block: load = overhead + weights + first evaluation (s)",
                   task["overhead"] + task["build"] + task["eval_pass"], measured["load_s"], note),
        _check_row("one block: training, timed micro-steps (s)", timed, measured["train_s"], note),
        _check_row(f"one block: {workload.evaluations} evaluations (s)", task["eval"], measured["eval_s"], note),
        _check_row("one block: task wall (s)", task["total"], measured["wall_s"], note),
    ]


def had_fresh_workers(run: dict) -> bool:
    """Whether a run JSON's GPU tasks each started a fresh Ray worker (task_start_s). They have since session 4's
    stage-2 fix; the same commit made bench_scale record finetune.gradient_checkpointing, and tasks carry start
    stamps (started_at) since shortly after. JSON with neither comes from runs that reused workers."""
    tasks = [*run.get("blocks", {}).get("collect", []), *run.get("blocks", {}).get("transfer", [])]
    return ("gradient_checkpointing" in run.get("config", {}).get("finetune", {})
            or any("started_at" in task for task in tasks))


def _stage1_rows(run: dict, cand: Candidate, model: ModelConfig, workload: Workload, hardware: Hardware,
                 source: str) -> list[dict]:
    """Collect, each part of a block, the wall, block memory and cache of a run JSON with 'blocks'."""
    transfers = _field(run, "blocks.transfer", source)
    with_collect = bool(run["blocks"].get("collect"))
    faults = run.get("faults_fired") or []
    note = ("blocks ran beside the collect chain" if with_collect else "blocks ran alone") + (
        "; blocks resumed after a fault are left out" if faults else "")
    reused = "" if had_fresh_workers(run) else "workers reused (before session 4's fix): no worker starts planned"
    rows = []
    if with_collect:
        rows.append(_check_row(f"collect: chain of {cand.num_blocks} tasks (s)", cand.times["collect_s"],
                               _field(run, "blocks.collect_wall_s", source), reused))
    rows += _block_rows(transfers, model, workload, hardware, source, note)
    if with_collect and transfers:  # a run stopped after collect (`--until collect`) has no stage-1 wall
        rows.append(_check_row("collect + transfer wall (s)", cand.times["wall_s"],
                               _field(run, "blocks.wall_s", source),
                               "; ".join(part for part in (reused, f"faults fired: {', '.join(faults)}"
                                                           if faults else "") if part)))
    peaks = [_field(t, "peak_gpu_bytes", f"{source} transfer[{i}]") for i, t in enumerate(transfers)]
    if peaks:
        rows.append(_check_row("block memory, torch peak (GB; plan minus runtime reserve)",
                               (cand.memory_total - cand.memory["runtime_reserve"]) / GB, max(peaks) / GB))
    rows.append(_check_row("cache on disk (GB)", cand.cache_total / GB, _field(run, "cache_bytes", source) / GB))
    return rows


def _stage2_rows(run: dict, config: RunConfig, hardware: Hardware, source: str) -> list[dict]:
    """Tokens/s per rank and start-up of a run JSON with 'finetune' (the mean over its ranks)."""
    ranks = _field(run, "finetune.ranks", source)
    for i, rank in enumerate(ranks):
        for key in ("tokens_per_s", "init_s"):
            _field(rank, key, f"{source} finetune.ranks[{i}]")
    if not ranks:
        raise ConfigError(f"--check: {source}: finetune.ranks is empty; the stage-2 run recorded no rank")
    model, world = config.model, len(ranks)
    checkpointing = config.finetune.gradient_checkpointing
    partial = run["finetune"].get("partial")  # stopped mid-stage: its newest checkpoint's figures
    note = (f"ZeRO-{config.finetune.zero_stage}, {world} ranks, micro-batch {config.finetune.micro_batch_size} x "
            f"{config.data.seq_len}{', gradient checkpointing' if checkpointing else ''}, "
            f"{config.attention.feature_dtype} features"
            + (f"; stopped after step {run['finetune'].get('step')} of {run['finetune'].get('steps')}" if partial
               else ""))
    rows = []
    peaks = [rank.get("peak_gpu_bytes") for rank in ranks]
    if hardware.lora_activation_bytes is not None and all(peaks):
        terms = lora_memory(model, config.data.seq_len, config.finetune.micro_batch_size, world, hardware,
                            checkpointing)
        rows.append(_check_row("stage 2: GPU memory per rank, torch peak (GB)", sum(terms.values()) / GB,
                               max(peaks) / GB, note))
    rows += [
        _check_row("stage 2: tokens/s per rank",
                   lora_tokens_per_s(model, hardware, checkpointing, config.attention.feature_dtype),
                   _mean([r["tokens_per_s"] for r in ranks]), note),
        _check_row("stage 2: model build + engine start (s)", lora_startup_s(model, hardware, world),
                   _mean([r["init_s"] for r in ranks]), note),
    ]
    stage_s = (run.get("stage_times_s") or {}).get("finetune")
    whole = not partial and not any(rank.get("resumed_from_step") for rank in ranks)
    if stage_s and whole:  # the whole stage in one go: start, training, evaluations, checkpoints, the adapter
        workload, _ = run_inputs(config)
        rows.append(_check_row(f"stage 2: the stage's wall, {_count(workload.stage2_tokens)} tokens (s)",
                               lora_stage_s(model, workload, hardware, world, checkpointing), stage_s, note))
    return rows


def measured_run_config(data: dict) -> RunConfig:
    """The config of a measured run's JSON. Runs measured before bench_scale recorded attention.feature_dtype
    (session 9) computed with fp32 features, the default then; the default has since changed, so say it."""
    attention = {"feature_dtype": "float32", **data.get("attention", {})}
    return resolve_run_config({**data, "attention": attention})


def check_runs(paths: list[str], hardware: str | None = None) -> dict:
    """Re-plan every measured run in `paths` with the run's own inputs (its config, its k, the chunked kernel) and
    the preset `hardware` (default: the one its plan used), and compare: stage-1 rows for a run JSON with
    'blocks', the per-block rows and the transfer wall of each GPU count of a scaling JSON, and stage-2 rows for
    any JSON with a 'finetune' section. Rows of the model the preset was fitted on are marked 'fit'."""
    runs, scalings = _load_runs(paths)
    out_runs, rows = [], []
    planned: dict[str, tuple] = {}  # run_dir -> (model, workload, hardware, candidate)
    for run in runs.values():
        source = ", ".join(run["files"])
        config = measured_run_config(_field(run, "config", source))
        hw = load_hardware(hardware or _field(run, "plan.hardware_preset", source))
        if "blocks" in run and not had_fresh_workers(run):
            hw = dataclasses.replace(hw, task_start_s=None)
        k = int(_field(run, "plan.k", source))
        model = config.model
        workload, limits = run_inputs(config)
        cand = evaluate(model, k, workload, limits, hw)
        planned[run["run_dir"]] = (model, workload, hw, cand)
        run_rows = _stage1_rows(run, cand, model, workload, hw, source) if "blocks" in run else []
        run_rows += _stage2_rows(run, config, hw, source) if "finetune" in run else []
        label = Path(run["files"][0]).stem
        role = "fit" if model.name == hw.fitted_on or label == hw.also_fitted_on_run else "check"
        rows += [{"run": label, "model": model.name, "gpus": limits.gpus, "role": role, **row} for row in run_rows]
        chosen = plan(model, workload, limits, hw).chosen
        out_runs.append({"run": label, "files": run["files"], "model": model.name, "gpus": limits.gpus,
                         "hardware": hw.name, "k_run": k, "k_now": chosen.k if chosen else None,
                         "planned_times_s": {key: round(v, 3) for key, v in cand.times.items()}})
    for path, data in scalings:
        from_run = _field(data, "from_run", path)
        if from_run not in planned:
            raise ConfigError(f"--check: {path} reran stage 1 of {from_run!r}, and no run JSON given has that "
                              "run_dir; give that run's JSON too")
        model, workload, hw, cand = planned[from_run]
        block_totals = [block_task(model, n, workload, hw)["total"] for n in block_layers(model, cand.k)]
        for i, entry in enumerate(_field(data, "rows", path)):
            where = f"{path} rows[{i}]"
            gpus = _field(entry, "gpus", where)
            start = (hw.task_start_s or 0.0) if had_fresh_workers(entry) else 0.0  # each block's worker, first
            run_rows = _block_rows(_field(entry, "blocks.transfer", where), model, workload, hw, where,
                                   "blocks ran alone (stage 1 only)")
            run_rows.append(_check_row(f"transfer wall, {len(block_totals)} blocks on {gpus} GPUs (s)",
                                       schedule_wall_s([0.0] * len(block_totals),
                                                       [start + total for total in block_totals], gpus),
                                       _field(entry, "transfer_wall_s", where)))
            role = "fit" if model.name == hw.fitted_on else "check"
            rows += [{"run": f"{Path(path).stem} ({gpus} GPUs)", "model": model.name, "gpus": gpus, "role": role,
                      **row} for row in run_rows]
    used = [path for run in runs.values() for path in run["files"]] + [path for path, _ in scalings]
    return {"kind": CHECK_KIND, "tolerance": CHECK_TOLERANCE, "hardware": hardware, "files": used,
            "runs": out_runs, "rows": rows, "worker_starts": collect_chain_gaps(runs)}


def collect_chain_gaps(runs: dict[str, dict]) -> dict:
    """What task_start_s is fitted on: in each run with task stamps, the seconds between one collect task's end
    and the next one's start (bench_scale.start_waits). {"runs", "gaps", "min_s", "max_s", "mean_s"}."""
    from .bench_scale import start_waits  # the JSON's own reader of its stamps

    per_run = [list(start_waits(run["blocks"])["collect"].values()) for run in runs.values() if "blocks" in run]
    gaps = [gap for run_gaps in per_run for gap in run_gaps]
    if not gaps:
        return {"runs": 0, "gaps": 0}
    return {"runs": sum(1 for run_gaps in per_run if run_gaps), "gaps": len(gaps), "min_s": min(gaps),
            "max_s": max(gaps), "mean_s": sum(gaps) / len(gaps)}


def format_check(result: dict) -> str:
    """The rows of check_runs as a table: quantity | planned | measured | ratio | within 20%?"""
    width = max((len(r["quantity"]) for r in result["rows"]), default=10)
    out = [f"planner check: planned / measured, within = |ratio - 1| <= {result['tolerance']:.0%}; rows marked "
           "'fit' are of the model the preset's constants were fitted on"]
    for run in result["runs"]:
        out.append(f"  {run['run']}: {run['model']} on {run['gpus']} GPUs, {run['hardware']} constants, "
                   f"k={run['k_run']} as run (the planner would now choose k={run['k_now']})")
    current = None
    for r in result["rows"]:
        if r["run"] != current:
            current = r["run"]
            out += ["", f"{current} ({r['role']})",
                    f"  {'quantity':<{width}} {'planned':>10} {'measured':>10} {'ratio':>6}  within 20%?"]
        note = f"  ({r['note']})" if r["note"] else ""
        out.append(f"  {r['quantity']:<{width}} {r['planned']:>10.2f} {r['measured']:>10.2f} {r['ratio']:>6.2f}  "
                   f"{'yes' if r['within'] else 'NO'}{note}")
    starts = result.get("worker_starts") or {}
    if starts.get("gaps"):
        out += ["", f"worker starts between collect tasks (task_start_s is their mean): {starts['gaps']} gaps in "
                    f"{starts['runs']} runs, {starts['min_s']:.2f}-{starts['max_s']:.2f} s, "
                    f"mean {starts['mean_s']:.2f} s"]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model preset name (configs/models) or a path to a config.json")
    parser.add_argument("--tokens", help="stage-1 training tokens, e.g. 20M")
    parser.add_argument("--lora-tokens", help="stage-2 training tokens, e.g. 20M (default: as many as --tokens)")
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
    parser.add_argument("--feature-dtype", choices=("model", "float32"), default="model",
                        help="attention.feature_dtype of the run: picks the measured stage-1 constant (default "
                             "%(default)s)")
    parser.add_argument("--window", type=int, default=64, help="softmax window (default 64)")
    parser.add_argument("--shard-size", default="512MB", help="target cache shard size (default 512MB)")
    parser.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step (default 8)")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="optimizer steps between stage-1 evaluations (default 100, the LoLCATs recipe's)")
    parser.add_argument("--weights", choices=WEIGHT_SOURCES,
                        help="teacher weights: generated on the host (random) or read from safetensors "
                             "(checkpoint); default: the model preset's")
    parser.add_argument("--hardware", help="time-constant preset (configs/hardware) or a YAML path (default h100; "
                                           "with --check: each run's own preset)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--all", action="store_true", help="print every row of the table")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this machine and write configs/hardware/<--name or hostname>.yaml")
    parser.add_argument("--name", help="with --calibrate: preset name (default: the host name)")
    parser.add_argument("--out", help="with --calibrate: where to write the YAML; with --check: the JSON")
    parser.add_argument("--check", nargs="+", metavar="RUN_JSON",
                        help="re-plan measured runs (JSON of pipeline/bench_scale.py) with their own inputs and print "
                             "planned against measured")
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
        feature_dtype=args.feature_dtype,
        window_size=_positive(args.window, "--window"),
        shard_bytes=_bytes_flag(args.shard_size, "--shard-size"),
        grad_accum=_positive(args.grad_accum, "--grad-accum"),
        eval_every=_positive(args.eval_every, "--eval-every"),
        weights=args.weights,
        lora_tokens=(None if args.lora_tokens is None
                     else _positive(parse_count(args.lora_tokens, "--lora-tokens"), "--lora-tokens")),
    )
    if args.kernel not in KERNELS:
        raise ConfigError(f"--kernel: {args.kernel!r} is not one of {list(KERNELS)}")
    limits = Limits(gpus=gpus, gpu_memory=gpu_memory, host_memory=host, disk=disk,
                    gpus_per_node=_positive(args.gpus_per_node, "--gpus-per-node"))
    if args.weights is not None and args.weights not in WEIGHT_SOURCES:
        raise ConfigError(f"--weights: {args.weights!r} is not one of {list(WEIGHT_SOURCES)}")
    return model, workload, limits, load_hardware(args.hardware or "h100")


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
    if args.check:
        result = check_runs(args.check, args.hardware)
        result["command"] = " ".join(["python -m pipeline.planner --check", *result["files"]]
                                     + (["--hardware", args.hardware] if args.hardware else [])
                                     + (["--out", args.out] if args.out else []))
        print(json.dumps(result, indent=1) if args.json else format_check(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {args.out}")
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
