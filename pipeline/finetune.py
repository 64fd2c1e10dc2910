"""Stage 2, `linearize finetune RUN`: LoRA on q, k, v, o of the stitched model, trained with DeepSpeed in Ray.

Input (the stitch stage's contract): RUN/stitched/hybrid.safetensors (feature maps and gamma, keys
`layers.N.feature_map_q.weight` ..., global layer indices) and RUN/stitched/stitched.json
({"model": ModelConfig as a dict, "attention": {window_size, window_kind, feature_dim, gamma_init, feature_dtype},
"base_model_sha256": ...}). Training: next-token loss on packed ShareGPT rows (or, with finetune.objective
'distill', KL to the original model's predictions on them, or 'mixed', a weighted sum of the two; see
Stage2Worker._loss), DeepSpeed ZeRO-2 or 3 (`finetune.zero_stage`), bf16 on GPU and fp32 on CPU, gradient
accumulation, global-norm clipping, AdamW
(weight decay 0), LR warmup then plateau (the paper's ReduceLROnPlateau: x0.1 after `patience` evals
without improvement, floor min_lr) or cosine, periodic eval on the validation split, best-eval selection.

RUN/finetune/ (everything a resume needs, none of it tied to the number of workers):

    plan.json                   global batch (rows per optimizer step, fixed for the run), steps, rows
    data/train.safetensors      the training rows in order (int32), data/validation.safetensors
    checkpoint/latest.json      -> the newest complete step-NNNNNN/ (written last, atomically)
    checkpoint/step-NNNNNN/     lora.safetensors (full fp32 LoRA weights), optimizer.safetensors (full
                                AdamW moments, gathered from the ZeRO partitions), best.safetensors,
                                state.json (step, data position, schedule, best eval, metrics history,
                                each rank's cost so far)
    adapter/                    the best LoRA in PEFT format (adapter_config.json, adapter_model.safetensors)
    result.json                 written last: the stage is complete

A resume with N' workers re-splits the same global batch: grad_accum' = global batch / (micro batch x N').
Randomness (LoRA dropout) is reseeded from (seed, step, global micro-batch slot) before every micro-batch,
so it depends neither on the world size nor on where a run was interrupted.

Building the model: under ZeRO-2 every rank builds the whole stitched model (load_stitched). Under ZeRO-3 it is
built already partitioned (load_stitched_partitioned): the base model is constructed inside deepspeed.zero.Init,
so each parameter is split across the ranks as soon as its module exists, and then filled. Random weights: each
rank generates exactly the elements of its own partitions (a random tensor is made of independently seeded
pieces, pipeline/models.py), with no collective at all. Checkpoint weights: one tensor at a time, each read by one
owner rank (round-robin, so the ranks read in parallel) that broadcasts it into the partitions. No rank ever holds
more than its share plus one full tensor (70B on 4 GPUs: 35 GB of bf16 weights per GPU, not 140). Either way the
result is bit-identical to load_model's.

Fault injection (tests and the GPU scale proof): $LINEARIZE_FAULT (pipeline/stages.py FAULT_ENV) may hold
`finetune:exit_after=N[:rank=R]` among its `;`-separated specs: rank R (default 0) SIGKILLs itself right after
optimizer step N (and its checkpoint, if one falls there), once: the marker RUN/faults/finetune-rankR-N.fired
stops it from firing again when the driver restarts from the last checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from blocks.convert import AttentionSettings, convert_model, load_hybrid_state_dict
from blocks.lora import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, adapter_files, add_lora, lora_parameters, mix_adapters, teacher_view)

from .config import ModelConfig, RunConfig
from .rundir import RunDir
from .stages import FAULT_ENV, Fault, parse_faults, read_run_config

logger = logging.getLogger(__name__)

STITCHED_WEIGHTS = "stitched/hybrid.safetensors"
STITCHED_META = "stitched/stitched.json"
PLAN = "finetune/plan.json"
TRAIN_DATA = "finetune/data/train.safetensors"
VALIDATION_DATA = "finetune/data/validation.safetensors"
LATEST = "finetune/checkpoint/latest.json"
ADAPTER_DIR = "finetune/adapter"
RESULT = "finetune/result.json"
SCHEDULES = ("plateau", "cosine")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# The stitched model


@dataclass
class StitchedModel:
    model: torch.nn.Module
    model_config: ModelConfig
    settings: AttentionSettings
    layers: list[int]
    meta: dict


def read_stitched(run: RunDir) -> tuple[dict, dict[str, torch.Tensor], list[int], ModelConfig, AttentionSettings]:
    """stitched.json, the feature maps and gamma (small: every rank loads all of them), their layers."""
    for rel in (STITCHED_META, STITCHED_WEIGHTS):
        if not run.exists(rel):
            raise FileNotFoundError(f"{run.url_of(rel)} does not exist; run the stitch stage first")
    meta = run.read_json(STITCHED_META)
    state = load_safetensors_bytes(run.read_bytes(STITCHED_WEIGHTS))
    layers = sorted({int(key.split(".")[1]) for key in state})
    # A stitched.json written before attention.feature_dtype existed was trained with fp32 features: keep them.
    attention = AttentionSettings(**{"feature_dtype": "float32", **meta["attention"]})
    return meta, state, layers, ModelConfig(**meta["model"]), attention


def load_stitched(run: RunDir, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> StitchedModel:
    """The base model with the stitched layers converted and their feature maps and gamma loaded."""
    from .models import load_model

    meta, state, layers, model_config, settings = read_stitched(run)
    model = load_model(model_config, dtype=dtype, device=device)
    convert_model(model, settings, layers=layers)
    load_hybrid_state_dict(model, state)
    return StitchedModel(model, model_config, settings, layers, meta)


TensorSource = Callable[[str, torch.Size, torch.dtype], torch.Tensor]
"""(full parameter name, shape, dtype) -> the full tensor, on CPU."""


def checkpoint_tensor_source(directory: Path, names: list[str]) -> TensorSource:
    """Reads single tensors from a Hugging Face directory's safetensors files (only the headers are read here).
    Every rank checks that all `names` exist before any collective starts, so a bad checkpoint fails everywhere."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.weights: {directory} holds no .safetensors files to read the weights from")
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update({key: file for key in f.keys()})
    missing = [name for name in names if name not in where]
    if missing:
        raise ValueError(f"model.weights: {directory} lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")

    def read(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"model.weights: {where[name]} holds {name} with shape {tuple(tensor.shape)}, but the "
                             f"model's config.json makes it {tuple(shape)}")
        return tensor.to(dtype)

    return read


def _fill_partitioned(named: list[tuple[str, torch.nn.Parameter]], source: TensorSource, rank: int,
                      world_size: int) -> None:
    """Give the ZeRO-3-partitioned parameters `named` their values, one full tensor at a time (collective: every
    rank passes the same list).

    Parameters are taken in groups of `world_size`; in a group, rank r makes tensor r (generation and disk reads,
    the slow part, run on all ranks at once), then each tensor in turn is gathered and its owner's copy is
    broadcast back into the partitions (GatheredParameters with modifier_rank).
    """
    import deepspeed

    for first in range(0, len(named), world_size):
        group = named[first:first + world_size]
        mine = None
        if rank < len(group):
            name, param = group[rank]
            mine = source(name, param.ds_shape, param.dtype)
        for owner, (name, param) in enumerate(group):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=owner):
                if rank == owner:
                    param.data.copy_(mine)
        mine = None


RangeSource = Callable[[str, int, int, int, torch.dtype], torch.Tensor]
"""(full parameter name, numel, start, stop, dtype) -> elements [start, stop) of the flat tensor, on CPU."""


def _partition_range(param: torch.nn.Parameter) -> tuple[int, int]:
    """The flat elements [start, stop) of `param` that this rank's ZeRO-3 partition holds (stop - start may be
    less than the partition, or 0: the padding). DeepSpeed 0.19 (partition_parameters.py, Init._partition_param)
    pads the flat tensor to a multiple of the partition group's size W and gives group rank r the elements
    [r * size, (r + 1) * size) with size = ceil(numel / W) = ds_tensor.ds_numel, in ds_tensor[0:size]."""
    import deepspeed.comm as dist

    size, numel = param.ds_tensor.ds_numel, param.ds_numel
    world_size = dist.get_world_size(group=param.ds_process_group)
    if size != -(-numel // world_size):  # a DeepSpeed whose layout this code does not know
        raise RuntimeError(f"ZeRO-3 partition of {numel} elements over {world_size} ranks holds {size}, not "
                           f"ceil({numel} / {world_size}): DeepSpeed's partition layout changed; see "
                           "partition_parameters.py, Init._partition_param")
    start = min(dist.get_rank(group=param.ds_process_group) * size, numel)
    return start, min(start + size, numel)


def _partition_is_writable(param: torch.nn.Parameter) -> bool:
    """Whether param.ds_tensor is the whole of what DeepSpeed keeps of the parameter, so writing it is enough: not
    swapped out to NVMe, not quantized, no hpZ secondary partition to keep in step."""
    part = param.ds_tensor
    return (part is not None and getattr(part, "final_location", None) is None
            and not hasattr(part, "ds_quant_scale") and getattr(param, "ds_secondary_tensor", None) is None)


def _fill_local_partitions(named: list[tuple[str, torch.nn.Parameter]], source: RangeSource) -> None:
    """Write each parameter's own ZeRO-3 partition straight into param.ds_tensor, in its dtype (no collective, no
    full tensor): the rank makes only the elements it holds. The padding keeps whatever DeepSpeed left there."""
    for name, param in named:
        start, stop = _partition_range(param)
        values = source(name, param.ds_numel, start, stop, param.ds_tensor.dtype)
        with torch.no_grad():
            param.ds_tensor.narrow(0, 0, stop - start).copy_(values)


def load_stitched_partitioned(run: RunDir, ds_config: dict, dtype: torch.dtype,
                              device: torch.device) -> StitchedModel:
    """load_stitched for ZeRO-3 (collective: every rank calls it): the base model is built inside
    deepspeed.zero.Init, so its parameters are partitioned across the ranks from the start, then filled with
    the values load_model gives them: random weights by each rank generating only the elements of its own
    partitions (random_value_range, no collective), a Hugging Face directory's safetensors by _fill_partitioned.

    The converted layers' feature maps and gamma are created outside zero.Init (ordinary parameters, loaded on
    every rank); deepspeed.initialize partitions them, and PEFT's LoRA, like any parameter it finds unpartitioned.
    """
    from functools import partial

    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .models import _rotary, model_directory, random_value, random_value_range, teacher_config

    meta, state, layers, model_config, settings = read_stitched(run)
    directory = model_directory(model_config)
    config = teacher_config(model_config)
    # no_init_weights: transformers' own init would gather every parameter to fill it with values we replace.
    # memory_efficient_linear off: zero.Init would otherwise replace F.linear with its own autograd function in
    # this process for good (it is never restored), changing the numerics of every later run in the actor; the
    # engine's own conversion (ZeRO-2, or ZeRO-3 of an unpartitioned model) never does. The config's value
    # overrides zero.Init's mem_efficient_linear argument, so it has to be set there.
    # No dtype argument: zero.Init then takes it from the config (bf16 on GPU, fp32 on CPU); DeepSpeed 0.19.8
    # ignores an explicit dtype on an accelerator without fp16 (the CPU one) and picks bf16.
    init_config = {**ds_config, "zero_optimization": {**ds_config["zero_optimization"],
                                                      "memory_efficient_linear": False}}
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=init_config, enabled=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"deepspeed.zero.Init built parameters in {wrong}, not {dtype}; check ds_config's bf16")
    if config.tie_word_embeddings:
        model.tie_weights()  # before filling: the tied matrix is then one parameter, filled once
    named = list(model.named_parameters())  # a tied parameter appears once, so it is filled once
    stray = [name for name, param in named if not hasattr(param, "ds_id")]
    if stray:
        raise RuntimeError(f"parameters {stray[:3]} were not partitioned by deepspeed.zero.Init")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if directory is None:  # each rank generates just its partitions; layouts it cannot write take the gather path
        _fill_local_partitions([(name, p) for name, p in named if _partition_is_writable(p)],
                               partial(random_value_range, model_config.seed))
        _fill_partitioned([(name, p) for name, p in named if not _partition_is_writable(p)],
                          partial(random_value, model_config.seed), rank, world_size)
    else:  # safetensors are read whole: each tensor by one owner rank, broadcast into the partitions
        _fill_partitioned(named, checkpoint_tensor_source(directory, [name for name, _ in named]), rank, world_size)
    # The rotary buffer as load_model leaves it: built outside zero.Init (whose tensor constructors would cast it),
    # cast to the model dtype for random weights (load_model's model.to(dtype)), fp32 as from_pretrained keeps it.
    rotary = _rotary(model_config, config, "cpu")
    model.model.rotary_emb = rotary.to(device=device, dtype=dtype) if directory is None else rotary.to(device)
    model.eval()
    convert_model(model, settings, layers=layers)
    load_hybrid_state_dict(model, state)
    return StitchedModel(model, model_config, settings, layers, meta)


def _cast_unpartitioned(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters zero.Init did not create (feature maps, gamma, LoRA) to the training dtype, as the
    DeepSpeed engine does to a model that was not built under zero.Init (and skips for one that was)."""
    for param in model.parameters():
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


# --------------------------------------------------------------------------------------------------
# Data and plan (driver side)


def write_finetune_data(run: RunDir, train: torch.Tensor, validation: torch.Tensor) -> None:
    """Store the (N, T) training rows (in training order) and (V, T) validation rows in the run directory."""
    for name, rows in (("train", train), ("validation", validation)):
        if rows.dim() != 2 or rows.shape[0] == 0 or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected a non-empty (N, T) integer tensor of token ids, got "
                             f"{rows.dtype} {tuple(rows.shape)}")
    if train.shape[1] != validation.shape[1]:
        raise ValueError(f"validation: rows have {validation.shape[1]} tokens but training rows have {train.shape[1]}")
    run.write_bytes(TRAIN_DATA, save_safetensors_bytes({"input_ids": train.to(torch.int32).contiguous()}))
    run.write_bytes(VALIDATION_DATA, save_safetensors_bytes({"input_ids": validation.to(torch.int32).contiguous()}))


def _read_rows(run: RunDir, rel: str) -> torch.Tensor:
    return load_safetensors_bytes(run.read_bytes(rel))["input_ids"].to(torch.int64)


def prepare_data(run: RunDir, config: RunConfig, num_train_rows: int) -> None:
    """Tokenize ShareGPT rows for this run (once; a resume reuses them)."""
    if run.exists(TRAIN_DATA) and run.exists(VALIDATION_DATA):
        return
    from .data import packed_training_sequences
    from .models import load_tokenizer, model_directory

    seq_len, num_validation = config.data.seq_len, config.data.validation_sequences
    if model_directory(config.model) is None:
        # Random-weight presets have no tokenizer: random ids exercise every stage at the real shape (as stage 1).
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 2)
        train = torch.randint(0, config.model.vocab_size, (num_train_rows, seq_len), generator=generator)
        validation = torch.randint(0, config.model.vocab_size, (num_validation, seq_len), generator=generator)
    else:
        tokenizer = load_tokenizer(config.model)
        train = packed_training_sequences(tokenizer, seq_len, num_train_rows, split="train", seed=config.seed)
        validation = packed_training_sequences(tokenizer, seq_len, num_validation, split="validation",
                                               seed=config.seed)
    write_finetune_data(run, train, validation)


def make_plan(config: RunConfig, world_size: int) -> dict:
    """Rows per optimizer step (fixed for the whole run, whatever the later worker count) and step count."""
    cfg = config.finetune
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world_size
    num_rows = math.ceil(cfg.train_tokens / config.data.seq_len)
    total_steps = num_rows // global_batch
    if total_steps < 1:
        raise ValueError(f"finetune.train_tokens: {cfg.train_tokens} tokens make {num_rows} rows of "
                         f"{config.data.seq_len}, fewer than one optimizer step of {global_batch} rows "
                         f"(micro_batch_size x grad_accum x {world_size} workers); raise train_tokens to at least "
                         f"{global_batch * config.data.seq_len}")
    return {"global_batch": global_batch, "total_steps": total_steps, "num_train_rows": total_steps * global_batch,
            "seq_len": config.data.seq_len, "first_world_size": world_size}


def accumulation_steps(global_batch: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each of `world_size` ranks for the run's fixed global batch."""
    rows_per_micro_step = micro_batch_size * world_size
    if global_batch % rows_per_micro_step:
        divisors = [n for n in range(1, global_batch // micro_batch_size + 1)
                    if (global_batch // micro_batch_size) % n == 0]
        raise ValueError(
            f"workers: {world_size} workers x micro_batch_size {micro_batch_size} do not divide the run's global "
            f"batch of {global_batch} rows (fixed when the run started); resume with one of {divisors} workers")
    return global_batch // rows_per_micro_step


# --------------------------------------------------------------------------------------------------
# Fault injection ($LINEARIZE_FAULT, see the module docstring)


def finetune_faults(spec: str | None) -> tuple[Fault, ...]:
    """The `finetune:exit_after=N[:rank=R]` items of a LINEARIZE_FAULT spec (stages.parse_faults checks them all)."""
    return tuple(fault for fault in parse_faults(spec) if fault.stage == "finetune")


def fault_marker(fault: Fault) -> str:
    return f"faults/finetune-rank{fault.rank}-{fault.exit_after}.fired"


# --------------------------------------------------------------------------------------------------
# Options handed to every worker (plain data: they travel through Ray)


@dataclass(kw_only=True)
class TrainOptions:
    run_url: str
    zero_stage: int
    micro_batch_size: int
    global_batch: int
    total_steps: int
    lr: float
    schedule: str = "plateau"
    warmup_steps: int = 0
    min_lr: float = 1e-5
    patience: int = 10
    grad_clip: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 50
    lora: dict = field(default_factory=dict)
    seed: int = 0
    use_gpu: bool = False
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward instead of keeping its activations (70B: ~0.5 GB per layer
    and 1k-token row would otherwise sit beside the ZeRO-3 partitions)."""
    kill_at_step: int | None = None
    """Fault injection for tests: rank 0 SIGKILLs itself after finishing this optimizer step."""
    faults: tuple[Fault, ...] = ()
    """Fault injection from $LINEARIZE_FAULT (each fires once per run directory)."""
    objective: str = "next_token"
    """'next_token', 'distill' or 'mixed' (pipeline.config.FinetuneConfig.objective)."""
    distill_weight: float = 0.5
    """The KL's share of the 'mixed' objective."""
    return_weights: bool = False
    """Return every rank's view of the final LoRA weights (tests: equal across ranks)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {SCHEDULES}")


def train_options(run: RunDir, config: RunConfig, plan: dict, use_gpu: bool, **extra) -> TrainOptions:
    cfg = config.finetune
    # Fields the lead may add to FinetuneConfig; the defaults are the paper's (lolcats.md §4).
    return TrainOptions(
        run_url=run.url, zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size,
        global_batch=plan["global_batch"], total_steps=plan["total_steps"], lr=cfg.lr,
        schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
        min_lr=cfg.min_lr, patience=cfg.patience, grad_clip=cfg.grad_clip,
        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
        lora={"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout}, seed=config.seed,
        use_gpu=use_gpu, gradient_checkpointing=cfg.gradient_checkpointing, objective=cfg.objective,
        distill_weight=cfg.distill_weight, **extra)


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of (step, state), so it resumes exactly


class LRSchedule:
    """Linear warmup, then either plateau (x0.1 after `patience` evals without a 1e-4 relative improvement,
    as torch's ReduceLROnPlateau) or cosine decay to min_lr at the last step."""

    def __init__(self, options: TrainOptions, state: dict | None = None):
        self.options = options
        self.scale, self.best, self.bad_evals = 1.0, math.inf, 0
        if state:
            self.scale, self.best, self.bad_evals = state["scale"], state["best"], state["bad_evals"]

    def lr(self, step: int) -> float:
        o = self.options
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            span = max(1, o.total_steps - o.warmup_steps)
            progress = min(1.0, (step - o.warmup_steps) / span)
            return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(o.min_lr, o.lr * self.scale)

    def observe(self, eval_loss: float) -> None:
        if self.options.schedule != "plateau":
            return
        if eval_loss < self.best * (1.0 - 1e-4):
            self.best, self.bad_evals = eval_loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.options.patience:
            self.scale, self.bad_evals = self.scale * 0.1, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad_evals": self.bad_evals}


# --------------------------------------------------------------------------------------------------
# Checkpoints: full (world-size-independent) tensors, written by rank 0


OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")


def _step_dir(step: int) -> str:
    return f"finetune/checkpoint/step-{step:06d}"


def latest_checkpoint(run: RunDir) -> dict | None:
    """The newest complete checkpoint's state.json (with 'dir'), or None."""
    pointer = run.read_json(LATEST, default=None)
    if pointer is None:
        return None
    state = run.read_json(f"{pointer['dir']}/state.json")
    state["dir"] = pointer["dir"]
    return state


def _gather_full(engine, params: dict[str, torch.nn.Parameter], with_optimizer: bool):
    """Full fp32 LoRA weights (and AdamW moments) on every rank: collective under ZeRO-2 and ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights, moments = {}, {}
    for name, param in params.items():
        weights[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
        if with_optimizer:
            for key in OPTIMIZER_KEYS:
                moments[f"{name}.{key}"] = safe_get_full_optimizer_state(param, key).detach().float().cpu().clone()
    return weights, moments


def _restore_optimizer(engine, params: dict[str, torch.nn.Parameter], weights: dict, moments: dict, step: int):
    """Put full fp32 weights and AdamW moments back into the ZeRO partitions of this world size."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero_optimizer = engine.optimizer
    base = zero_optimizer.optimizer  # the torch AdamW, stepping this rank's flat fp32 partitions
    # The flat fp32 partitions AdamW keys its state by (ZeRO-3 and ZeRO-1/2 name them differently).
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None:
        flats = zero_optimizer.single_partition_of_fp32_groups
    # torch.optim.AdamW creates its state lazily at the first step; create it now, in its own layout.
    for flat in flats:
        base.state[flat] = {"step": torch.tensor(float(step), dtype=torch.float32),
                            "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    # ZeRO-1/2 link each parameter's fragment to the optimizer state after the first step; do it now.
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    device = next(iter(params.values())).device
    for name, param in params.items():
        safe_set_full_fp32_param(param, weights[name].to(device))
        for key in OPTIMIZER_KEYS:
            safe_set_full_optimizer_state(param, moments[f"{name}.{key}"].to(device), key)


# --------------------------------------------------------------------------------------------------
# The worker (runs on every rank inside a DeepSpeedWorkerGroup)


def _seed_for(seed: int, step: int, slot: int) -> int:
    return (seed * 1_000_003 + step * 65_537 + slot) % (2**63 - 1)


def distillation_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          rows_per_chunk: int = 1) -> torch.Tensor:
    """KL(teacher || student) between the next-token distributions at every position: [batch, length], fp32.

    Computed a few rows at a time so that only one chunk's fp32 softmaxes exist beside the logits (a 16k-token
    micro-batch at a 49k vocabulary is 3.2 GB per fp32 copy)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from the student's "
                         f"{tuple(student_logits.shape)}")
    rows = []
    for first in range(0, student_logits.shape[0], rows_per_chunk):
        student = F.log_softmax(student_logits[first:first + rows_per_chunk].float(), dim=-1)
        teacher = F.log_softmax(teacher_logits[first:first + rows_per_chunk].float(), dim=-1)
        rows.append(F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1))
    return torch.cat(rows)


def train_worker(options: TrainOptions) -> dict:
    """Train (or resume) on this rank until options.total_steps; returns this rank's summary."""
    return Stage2Worker(options).run()


class Stage2Worker:
    """One rank of stage 2: the DeepSpeed engine over the LoRA model, the data slice, checkpoints (rank 0 writes).

    Every method that gathers or reduces is collective: all ranks call it in the same order.
    """

    def __init__(self, options: TrainOptions):
        import deepspeed
        import torch.distributed as dist

        started = time.perf_counter()
        self.options, self.dist = options, dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.run_dir = RunDir(options.run_url)
        self.grad_accum = accumulation_steps(options.global_batch, options.micro_batch_size, self.world_size)
        self.device = torch.device("cuda", torch.cuda.current_device()) if options.use_gpu else torch.device("cpu")
        if options.use_gpu:
            torch.cuda.reset_peak_memory_stats()  # the actor may have run other work before: count this run only
        ds_config = {
            "train_micro_batch_size_per_gpu": options.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": options.grad_clip,
            "zero_optimization": {"stage": options.zero_stage},
            "bf16": {"enabled": options.use_gpu},
            "steps_per_print": 10**9,
        }

        dtype = torch.bfloat16 if options.use_gpu else torch.float32
        if options.zero_stage == 3:
            stitched = load_stitched_partitioned(self.run_dir, ds_config, dtype, self.device)
        else:
            stitched = load_stitched(self.run_dir, dtype=dtype, device=self.device)
        if options.gradient_checkpointing:
            # Non-reentrant: the recompute re-enters ZeRO-3's parameter-fetch hooks like the forward did, and
            # needs no input that requires grad (the embeddings are frozen).
            stitched.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = add_lora(stitched.model, LoraSettings(**options.lora), seed=options.seed)
        self.model.config.use_cache = False
        self.params = lora_parameters(self.model)
        build_s = time.perf_counter() - started

        self.step, self.history, self.best, self.best_weights = 0, [], {"loss": math.inf, "step": None}, None
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            weights, moments = self._load_checkpoint(checkpoint)
        if options.zero_stage == 3:
            _cast_unpartitioned(self.model, dtype)
        # A torch optimizer: a DeepSpeed config optimizer JIT-compiles its CPU/fused kernels (~55 s, stack.md §6).
        optimizer = torch.optim.AdamW(list(self.params.values()), lr=options.lr, weight_decay=0.0)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, model_parameters=list(self.params.values()),
                                                    optimizer=optimizer, config=ds_config)
        if checkpoint is not None:
            _restore_optimizer(self.engine, self.params, weights, moments, self.step)
        self.schedule = LRSchedule(options, checkpoint["schedule"] if checkpoint else None)

        self.train_rows = _read_rows(self.run_dir, TRAIN_DATA)
        self.validation_rows = _read_rows(self.run_dir, VALIDATION_DATA)
        if self.train_rows.shape[0] < options.total_steps * options.global_batch:
            raise ValueError(f"{self.run_dir.url_of(TRAIN_DATA)} holds {self.train_rows.shape[0]} rows, fewer than "
                             f"the plan's {options.total_steps} steps x {options.global_batch}")
        self.started = started
        self.stats = {"rank": self.rank, "build_s": build_s, "init_s": time.perf_counter() - started,
                      "peak_gpu_bytes_after_init": _peak_gpu_bytes(options.use_gpu), "resumed_from_step": self.step,
                      "steps_run": 0, "train_s": 0.0}
        # A 70B build takes minutes before the first step: say where the time went (Ray forwards rank 0's stdout).
        self._say(f"model built in {build_s:.0f} s, engine ready at {self.stats['init_s']:.0f} s"
                  + (f", {self.stats['peak_gpu_bytes_after_init'] / 1e9:.1f} GB GPU peak" if options.use_gpu else "")
                  + (f"; resuming at step {self.step}" if self.step else ""))

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"finetune: {message}", flush=True)

    def _load_checkpoint(self, checkpoint: dict) -> tuple[dict, dict]:
        folder = checkpoint["dir"]
        weights = load_safetensors_bytes(self.run_dir.read_bytes(f"{folder}/lora.safetensors"))
        moments = load_safetensors_bytes(self.run_dir.read_bytes(f"{folder}/optimizer.safetensors"))
        if self.run_dir.exists(f"{folder}/best.safetensors"):
            self.best_weights = load_safetensors_bytes(self.run_dir.read_bytes(f"{folder}/best.safetensors"))
        self.step, self.history, self.best = checkpoint["step"], checkpoint["history"], checkpoint["best"]
        # Before deepspeed.initialize, so the module's copy (bf16 on GPU) is built from the saved weights too.
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name])
        return weights, moments

    def evaluate(self) -> float:
        """Mean of the objective (next-token CE, or KL from the original model) over the validation rows, split
        across ranks; it picks the best adapter. Every rank runs the same number of forwards (ZeRO-3 gathers
        parameters collectively inside each); rows past the end count zero."""
        self.engine.eval()
        micro = self.options.micro_batch_size
        rows = self.validation_rows
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        with torch.no_grad():
            for i in range(math.ceil(rows.shape[0] / (micro * self.world_size))):
                first = (i * self.world_size + self.rank) * micro
                index = torch.arange(first, first + micro)
                real = (index < rows.shape[0]).to(self.device)
                batch = rows[index.clamp(max=rows.shape[0] - 1)].to(self.device)
                token_loss = self._token_losses(batch)
                total += torch.tensor([(token_loss.sum(-1) * real).sum().item(),
                                       real.sum().item() * token_loss.shape[1]], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(total)
        self.engine.train()
        return (total[0] / total[1]).item()

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """The training objective on one micro-batch: next-token cross-entropy, the token-mean KL from the original
        model (distill), whose logits come from a no-grad forward of the same engine in its teacher view, or their
        weighted sum (mixed)."""
        if self.options.objective == "next_token":
            return self.engine(input_ids=batch, labels=batch).loss
        return self._token_losses(batch).mean()

    def _token_losses(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-token values of the objective, [rows, positions]: CE of each next token, KL at each position, or
        (mixed) (1 - w) * CE + w * KL at the positions that have a next token."""
        logits = self.engine(input_ids=batch).logits
        if self.options.objective in ("next_token", "mixed"):
            cross_entropy = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(),
                                            reduction="none").view(batch.shape[0], -1)
            if self.options.objective == "next_token":
                return cross_entropy
        with torch.no_grad(), teacher_view(self.engine.module):
            teacher_logits = self.engine(input_ids=batch).logits
        if self.options.objective == "distill":
            return distillation_token_kl(logits, teacher_logits)
        weight = self.options.distill_weight
        kl = distillation_token_kl(logits[:, :-1], teacher_logits[:, :-1])
        return (1.0 - weight) * cross_entropy + weight * kl

    def train_step(self) -> dict:
        """One optimizer step over the global batch's rows (this rank's micro-batches of it)."""
        started = time.perf_counter()
        options, step = self.options, self.step
        lr = self.schedule.lr(step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for micro in range(self.grad_accum):
            slot = micro * self.world_size + self.rank  # the global micro-batch slot: same rows for any world size
            first = step * options.global_batch + slot * options.micro_batch_size
            batch = self.train_rows[first:first + options.micro_batch_size].to(self.device)
            torch.manual_seed(_seed_for(options.seed, step, slot))
            loss = self._loss(batch)
            self.engine.backward(loss)
            self.engine.step()  # applies the update at the accumulation boundary only
            losses.append(loss.detach().float().cpu())
        train_loss = torch.stack(losses).mean().reshape(1).double().to(self.device)  # NCCL: GPU tensors only
        self.dist.all_reduce(train_loss)
        self.step += 1
        self.stats["steps_run"] += 1
        self.stats["train_s"] += time.perf_counter() - started
        return {"step": self.step, "lr": lr, "train_loss": train_loss.item() / self.world_size,
                "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "tokens": self.step * options.global_batch * self.train_rows.shape[1]}

    def save_checkpoint(self) -> None:
        full, moments = _gather_full(self.engine, self.params, with_optimizer=True)
        # Each rank's cost so far (collective), so a run stopped mid-stage (a node lost, a time limit) still says
        # how fast its steps were; RESULT has the same field for a finished one.
        ranks = self._rank_stats()
        if self.rank == 0:
            run, folder = self.run_dir, _step_dir(self.step)
            run.write_bytes(f"{folder}/lora.safetensors", save_safetensors_bytes(full))
            run.write_bytes(f"{folder}/optimizer.safetensors", save_safetensors_bytes(moments))
            if self.best_weights is not None:
                run.write_bytes(f"{folder}/best.safetensors", save_safetensors_bytes(self.best_weights))
            run.write_json(f"{folder}/state.json", {
                "step": self.step, "rows_consumed": self.step * self.options.global_batch,
                "global_batch": self.options.global_batch, "world_size": self.world_size,
                "schedule": self.schedule.state_dict(), "best": self.best, "history": self.history,
                "total_steps": self.options.total_steps, "ranks": ranks})
            previous = run.read_json(LATEST, default=None)
            run.write_json(LATEST, {"dir": folder, "step": self.step})  # the commit point of this checkpoint
            if previous is not None and previous["dir"] != folder:
                run.remove(previous["dir"], recursive=True)
        self.dist.barrier()

    def run(self) -> dict:
        options = self.options
        self.engine.train()
        if self.step == 0 and not self.history:
            # The starting point of the curve: what stage 1 alone gives (LoRA B is zero at init).
            self.history.append({"step": 0, "eval_loss": self.evaluate()})
        started = time.time()
        while self.step < options.total_steps:
            record = self.train_step()
            record["seconds"] = round(time.time() - started, 2)
            if self.stats["steps_run"] in (1, 5):  # the first steps' pace, long before the first evaluation
                self._say(f"step {self.step}/{options.total_steps}: {record['seconds']:.1f} s since the start of "
                          f"training, train loss {record['train_loss']:.4f}")
            if self.step % options.eval_every == 0 or self.step == options.total_steps:
                record["eval_loss"] = self.evaluate()
                self.schedule.observe(record["eval_loss"])
                if record["eval_loss"] < self.best["loss"]:
                    self.best = {"loss": record["eval_loss"], "step": self.step}
                    self.best_weights, _ = _gather_full(self.engine, self.params, with_optimizer=False)
                if self.rank == 0:  # Ray forwards a worker's stdout to the driver
                    print(f"finetune step {self.step}/{options.total_steps}: train loss {record['train_loss']:.4f}, "
                          f"eval loss {record['eval_loss']:.4f} (best {self.best['loss']:.4f} at step "
                          f"{self.best['step']}), lr {record['lr']:.2e}, {record['seconds']:.0f} s", flush=True)
            self.history.append(record)
            if self.step % options.checkpoint_every == 0 or self.step == options.total_steps:
                self.save_checkpoint()
            if options.kill_at_step == self.step and self.rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no cleanup, no exception
            self._fault_point()

        final_weights, _ = _gather_full(self.engine, self.params, with_optimizer=False)
        best_weights = self.best_weights if self.best_weights is not None else final_weights
        result = {"steps": options.total_steps, "world_size": self.world_size, "objective": options.objective,
                  "best": self.best, "history": self.history, "ranks": self._rank_stats()}
        if self.rank == 0:
            for name, data in adapter_files(self.model, best_weights).items():
                self.run_dir.write_bytes(f"{ADAPTER_DIR}/{name}", data)
            self.run_dir.write_json(RESULT, result)
        self.dist.barrier()
        if options.return_weights:
            result["weights"] = _local_view(self.params)
            result["final_weights"] = final_weights
        return result

    def _fault_point(self) -> None:
        for fault in self.options.faults:
            marker = fault_marker(fault)
            if fault.exit_after == self.step and fault.rank == self.rank and not self.run_dir.exists(marker):
                self.run_dir.write_text(marker, f"pid {os.getpid()}\n")
                logger.warning("fault injection: finetune rank %d is killed after step %d", self.rank, self.step)
                os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no cleanup, no exception

    def _rank_stats(self) -> list[dict]:
        """This attempt's cost on every rank (collective): build and init time, training tokens/s, wall time, peak
        GPU memory (torch's allocator; None on CPU) and the process's peak host memory."""
        stats = dict(self.stats)
        tokens = stats["steps_run"] * self.grad_accum * self.options.micro_batch_size * self.train_rows.shape[1]
        stats.update({"tokens": tokens, "tokens_per_s": tokens / stats["train_s"] if stats["train_s"] else None,
                      "wall_s": time.perf_counter() - self.started,
                      "peak_gpu_bytes": _peak_gpu_bytes(self.options.use_gpu),
                      # ru_maxrss is in KiB on Linux; it covers the actor's whole life (it may have run other work)
                      "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
        gathered = [None] * self.world_size
        self.dist.all_gather_object(gathered, stats)
        return gathered


def _peak_gpu_bytes(use_gpu: bool) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if use_gpu else None


def _local_view(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """This rank's copy of each LoRA weight as the model uses it (gathered under ZeRO-3)."""
    import deepspeed

    out = {}
    for name, param in params.items():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param]):
                out[name] = param.detach().float().cpu().clone()
        else:
            out[name] = param.detach().float().cpu().clone()
    return out


# --------------------------------------------------------------------------------------------------
# The driver


def run_finetune(run_url: str, *, num_workers: int | None = None, use_gpu: bool | None = None, workers=None,
                 max_restarts: int = 2, kill_at_step: int | None = None, return_weights: bool = False,
                 faults: str | None = None) -> dict:
    """Run (or resume, or return the finished result of) stage 2 for the run directory at `run_url`.

    Args:
        num_workers: DeepSpeed ranks (default: the cluster's GPUs, or 1 CPU worker).
        use_gpu: default: whether the cluster config has GPUs.
        workers: an existing cluster.deepspeed_worker.DeepSpeedWorkerGroup to run on (tests share one);
            after a failure a fresh group of the same size is made.
        max_restarts: how many times a failed attempt is restarted from the last checkpoint.
        kill_at_step: fault injection (first attempt only): rank 0 is SIGKILLed after this step.
        faults: a LINEARIZE_FAULT spec (default: the environment variable); its finetune items apply here.
    Returns: rank 0's summary (steps, best eval, history, `ranks`: every rank's time and memory for the last
    attempt; with return_weights, every rank's view of the LoRA weights too).
    """
    from cluster.connect import connect
    from cluster.deepspeed_worker import DeepSpeedWorkerGroup, WorkerGroupError

    run = RunDir(run_url)
    if run.exists(RESULT) and not return_weights:
        return run.read_json(RESULT)
    fault_list = finetune_faults(faults if faults is not None else os.environ.get(FAULT_ENV))
    config = read_run_config(run)
    if use_gpu is None:
        use_gpu = config.cluster.num_gpus > 0
    if workers is not None:
        num_workers = workers.world_size
    elif num_workers is None:
        num_workers = config.cluster.num_gpus if use_gpu else 1
    plan = run.read_json(PLAN, default=None)
    if plan is None:
        plan = make_plan(config, num_workers)
        run.write_json(PLAN, plan)
    prepare_data(run, config, plan["num_train_rows"])
    connect(config.cluster.address, num_cpus=config.cluster.num_cpus)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}

    attempt = 0
    while True:
        if workers is None:
            workers = DeepSpeedWorkerGroup(num_workers, use_gpu=use_gpu, env=env)
        elif not workers.alive:
            workers = workers.respawn()
        options = train_options(run, config, plan, use_gpu, kill_at_step=kill_at_step if attempt == 0 else None,
                                 faults=fault_list, return_weights=return_weights)
        try:
            results = workers.run(train_worker, options)
            break
        except WorkerGroupError as error:
            attempt += 1
            checkpoint = latest_checkpoint(run)
            logger.warning("finetune attempt %d failed (%s); last checkpoint: step %s", attempt, error,
                           checkpoint["step"] if checkpoint else None)
            if attempt > max_restarts:
                raise
    result = results[0]
    if return_weights:
        result["rank_weights"] = [r.pop("weights") for r in results]
    return result


def write_mixed_adapter(run_url: str, sources: list[str], weights: list[float]) -> dict:
    """Stage 2 without training: RUN's adapter becomes sum_i weights[i] * (source i's LoRA update), the sources
    being finished stage-2 runs over the very same stitched model as RUN (checked byte for byte). Writes
    RUN/finetune/adapter and RUN/finetune/result.json (objective 'mix', the sources and weights); returns it."""
    run = RunDir(run_url)
    if not run.exists(STITCHED_WEIGHTS):
        raise ValueError(f"run: {run.url_of(STITCHED_WEIGHTS)} does not exist; make RUN with `linearize run CONFIG "
                         "--run-dir RUN --stage1-from SOURCE --until stitch` first")
    stitched = run.read_bytes(STITCHED_WEIGHTS)
    adapters = []
    for url in sources:
        source = RunDir(url)
        if not source.exists(f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"):
            raise ValueError(f"--mix {url}: {source.url_of(ADAPTER_DIR)} holds no adapter; its stage 2 has not "
                             "finished")
        if source.read_bytes(STITCHED_WEIGHTS) != stitched:
            raise ValueError(f"--mix {url}: its stitched state differs from {run.url_of(STITCHED_WEIGHTS)}; mix "
                             "only adapters trained on the same stage-1 model (start RUN with --stage1-from)")
        adapters.append({name: source.read_bytes(f"{ADAPTER_DIR}/{name}") for name in (ADAPTER_CONFIG,
                                                                                        ADAPTER_WEIGHTS)})
    for name, data in mix_adapters(adapters, weights).items():
        run.write_bytes(f"{ADAPTER_DIR}/{name}", data)
    urls = [RunDir(url).url for url in sources]
    source_results = [RunDir(url).read_json(RESULT, default={}) for url in urls]
    source_tokens = [trained_tokens(r) for r in source_results]
    # A blend costs every source's training, whatever its weight: its token budget is the sum over the distinct
    # sources (a run named twice trained once).
    distinct = dict(zip(urls, source_tokens))
    result = {"steps": 0, "objective": "mix", "sources": urls, "weights": weights,
              "source_objectives": [r.get("objective") for r in source_results], "source_tokens": source_tokens,
              "tokens": None if None in source_tokens else sum(distinct.values())}
    run.write_json(RESULT, result)
    return result


def trained_tokens(result: dict) -> int | None:
    """Stage-2 tokens behind a finished run's adapter: the last training step's count, or for a mix the sum over
    its sources; None when the result does not say (a run from before tokens were logged)."""
    if result.get("objective") == "mix":
        return result.get("tokens")
    counts = [entry["tokens"] for entry in result.get("history", []) if "tokens" in entry]
    return counts[-1] if counts else None


# --------------------------------------------------------------------------------------------------
# CLI: linearize finetune RUN


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run directory (path or fsspec URL) holding stitched/")
    parser.add_argument("--workers", type=int, default=None,
                        help="DeepSpeed ranks (default: the cluster's GPUs, or 1 CPU worker); a resume may use "
                             "another count that divides the global batch")
    parser.add_argument("--cpu", action="store_true", help="train on CPU workers even if the cluster has GPUs")
    parser.add_argument("--max-restarts", type=int, default=2, help="restarts from the last checkpoint on failure")
    parser.add_argument("--mix", nargs="+", metavar="SOURCE", default=None,
                        help="train nothing: RUN's adapter becomes the weighted sum of these finished runs' LoRA "
                             "updates (same stitched model as RUN)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", default=None,
                        help="with --mix: one weight per source, e.g. 0.5 0.5")


def main(args) -> int:
    run = RunDir(args.run)
    if args.mix is not None or args.weights is not None:
        if args.mix is None or args.weights is None or len(args.mix) != len(args.weights):
            raise SystemExit(f"--mix and --weights: give one weight per source (got {len(args.mix or [])} sources "
                             f"and {len(args.weights or [])} weights)")
        result = write_mixed_adapter(args.run, args.mix, args.weights)
        run.mark("finetune", "done")
        print(f"finetune done: adapter in {run.url_of(ADAPTER_DIR)} = "
              + " + ".join(f"{w:g} x {url}" for w, url in zip(args.weights, result["sources"])))
        if result["tokens"] is not None:
            print(f"stage-2 tokens behind it: {result['tokens']:,} (every source's training counts, whatever its "
                  "weight)")
        return 0
    run.mark("finetune", "running")
    result = run_finetune(args.run, num_workers=args.workers, use_gpu=False if args.cpu else None,
                          max_restarts=args.max_restarts)
    run.mark("finetune", "done")
    best = result["best"]
    print(f"finetune done: {result['steps']} steps on {result['world_size']} workers; best eval loss "
          f"{best['loss']:.4f} at step {best['step']}; adapter in {run.url_of(ADAPTER_DIR)}")
    return 0
