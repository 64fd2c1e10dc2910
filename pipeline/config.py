"""Typed configuration: YAML presets in configs/ loaded into dataclasses, validated before any model loads.

A run config composes four parts, each either a preset name (a file in configs/<kind>/NAME.yaml) or an inline
mapping, plus fields that override the preset:

    model: smollm2-135m            # configs/models/smollm2-135m.yaml
    recipe: lolcats                # configs/recipes/lolcats.yaml: attention, data, transfer, finetune
    cluster: local                 # configs/clusters/local.yaml
    transfer: {train_tokens: 2M}   # overrides on top of the recipe

Every error names the key (as a dotted path), the value, and what to write instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import struct
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
WINDOW_KINDS = ("sliding", "terrace")
FEATURE_DTYPES = ("float32", "model")


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names key, value and fix."""


# --------------------------------------------------------------------------------------------------
# YAML: duplicate keys are errors, and 1e-2 is a float (plain PyYAML reads it as a string).


class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                f"(first at line {seen[key] + 1}) in {node.start_mark.name}: keep one of them"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict:
    text = Path(path).read_text()
    data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# Human-friendly quantities: "20M" tokens, "80GB" of memory.

_COUNT_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_BYTES_SUFFIX = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_count(value: Any, key: str = "value") -> int:
    """'20M' -> 20_000_000; ints pass through. Used for token budgets."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a count like 2000000 or '2M', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key}: expected a count like 2000000 or '2M', got {value!r}")
    return int(round(float(m.group(1)) * _COUNT_SUFFIX[m.group(2).upper()]))


def parse_bytes(value: Any, key: str = "value") -> int:
    """'80GB' -> 80e9 bytes, '64GiB' -> 64*2**30; a bare number is gigabytes (10**9)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * 10**9)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?I?B)\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key}: expected a size like '80GB' or '64GiB', got {value!r}")
    return int(round(float(m.group(1)) * _BYTES_SUFFIX[m.group(2).upper()]))


# --------------------------------------------------------------------------------------------------
# The config classes. Field docstrings are the documentation of the YAML keys.


@dataclass(kw_only=True)
class ModelConfig:
    """Which pretrained model to convert, and its shapes (the published config.json fields)."""

    name: str
    architecture: str = "LlamaForCausalLM"
    weights: str = "random"
    """'smollm2' (the real SmolLM2-135M-Instruct, installed by `linearize assets`), 'random' (deterministic
    random weights from `seed`, so every stage runs at a published shape without downloading it), or a path to a
    Hugging Face model directory."""
    seed: int = 0
    hf_config: dict = field(default_factory=dict)
    """config.json fields: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, ..."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"model.architecture: {self.architecture!r} is not supported; use one of {list(SUPPORTED_ARCHITECTURES)}"
            )
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in required if k not in self.hf_config]
        if missing:
            raise ConfigError(f"model.hf_config: missing {missing}; copy them from the model's config.json")
        for key in required:
            value = self.hf_config[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.hf_config.{key}: must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads and "head_dim" not in self.hf_config:
            raise ConfigError(
                f"model.hf_config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_heads}; set head_dim explicitly"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.hf_config.num_key_value_heads: {self.num_kv_heads} must divide "
                f"num_attention_heads {self.num_heads}"
            )

    @property
    def num_layers(self) -> int:
        return self.hf_config["num_hidden_layers"]

    @property
    def hidden_size(self) -> int:
        return self.hf_config["hidden_size"]

    @property
    def num_heads(self) -> int:
        return self.hf_config["num_attention_heads"]

    @property
    def num_kv_heads(self) -> int:
        return self.hf_config.get("num_key_value_heads", self.num_heads)

    @property
    def head_dim(self) -> int:
        return self.hf_config.get("head_dim") or self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return self.hf_config["intermediate_size"]

    @property
    def vocab_size(self) -> int:
        return self.hf_config["vocab_size"]

    @property
    def params_per_layer(self) -> int:
        """Weights of one decoder layer: q,k,v,o + gated MLP (3 matrices) + two norms."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        if self.hf_config.get("attention_bias") or self.architecture == "Qwen2ForCausalLM":
            attn += self.num_heads * hd + 2 * self.num_kv_heads * hd
        return attn + 3 * d * self.intermediate_size + 2 * d


@dataclass(kw_only=True)
class AttentionConfig:
    """The hybrid attention that replaces softmax attention (DESIGN.md, 'The hybrid attention, exactly')."""

    window_size: int = 64
    window_kind: str = "terrace"
    """'terrace' (previous 64-block + causal part of the current one; the paper's main results) or 'sliding'."""
    feature_dim: int = 64
    """f: W is head_dim x f per head, so the Hedgehog map has 2f features."""
    gamma_init: float = 0.1
    layers: list[int] | None = None
    """Layer indices to convert (negative counts from the end); null = all layers."""
    keep_softmax: list[int] | None = None
    """Layer indices to leave as full softmax attention even when `layers` selects them: peers keep the layers that
    convert worst (reference/peers.md). Those layers keep a KV cache that grows with the context."""
    init_from: str | None = None
    """Optional checkpoint of trained feature maps (safetensors); its feature dim must match feature_dim."""
    feature_dtype: str = "model"
    """dtype of the Hedgehog features given to the Triton kernels. 'model' (the default since session 9): cast to the
    model's dtype (bf16 on a GPU), the tensor-core path the kernel benchmark times and the dtype the paper's code
    computes them in. 'float32' (every run up to session 8): the kernels promote q, k, v to it and compute with exact
    fp32 dots, 82x slower on an H100 for the same quality (docs/results.md section 7, session 9). The CPU paths and
    the exported model compute in fp32 either way."""

    def __post_init__(self) -> None:
        if self.window_size <= 0:
            raise ConfigError(f"attention.window_size: must be a positive number of tokens, got {self.window_size}; "
                              "the paper uses 64")
        if self.window_kind not in WINDOW_KINDS:
            raise ConfigError(f"attention.window_kind: {self.window_kind!r} is not one of {list(WINDOW_KINDS)}")
        if self.feature_dim <= 0:
            raise ConfigError(f"attention.feature_dim: must be positive, got {self.feature_dim}; the paper uses 64")
        if not 0.0 < self.gamma_init < 1.0:
            raise ConfigError(f"attention.gamma_init: must lie strictly between 0 and 1 (it is a sigmoid), "
                              f"got {self.gamma_init}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"attention.feature_dtype: {self.feature_dtype!r} is not one of {list(FEATURE_DTYPES)}")


@dataclass(kw_only=True)
class DataConfig:
    """Training text (ShareGPT, packed) and held-out text (Brown corpus)."""

    train_source: str = "sharegpt"
    seq_len: int = 1024
    validation_sequences: int = 8
    eval_seq_len: int = 1024
    eval_sequences: int = 8

    def __post_init__(self) -> None:
        if self.train_source != "sharegpt":
            raise ConfigError(f"data.train_source: {self.train_source!r} is not available; use 'sharegpt'")
        for key in ("seq_len", "validation_sequences", "eval_seq_len", "eval_sequences"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"data.{key}: must be positive, got {getattr(self, key)}")


@dataclass(kw_only=True)
class TransferConfig:
    """Stage 1: attention transfer of the feature maps and gamma, block by block."""

    train_tokens: int = 2_000_000
    layers_per_block: int | str = "auto"
    """k; 'auto' lets the planner choose it."""
    lr: float = 1e-2
    micro_batch_size: int = 1
    grad_accum: int = 8
    grad_clip: float = 1.0
    mse_scale: float = 1000.0
    eval_every: int = 50
    patience: int = 10
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"transfer.lr: must be positive, got {self.lr}; the paper uses 1e-2")
        if isinstance(self.layers_per_block, str) and self.layers_per_block != "auto":
            raise ConfigError(f"transfer.layers_per_block: {self.layers_per_block!r}; write a number of layers "
                              "or 'auto'")
        for key in ("micro_batch_size", "grad_accum", "eval_every", "checkpoint_every", "train_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"transfer.{key}: must be positive, got {getattr(self, key)}")


OBJECTIVES = ("next_token", "distill", "mixed")


@dataclass(kw_only=True)
class FinetuneConfig:
    """Stage 2: LoRA on q,k,v,o with DeepSpeed; feature maps and gamma frozen."""

    train_tokens: int = 2_000_000
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lr: float = 1e-4
    schedule: str = "plateau"
    """'plateau' (ReduceLROnPlateau x0.1 on eval loss, as the paper) or 'cosine' (after warmup_steps)."""
    warmup_steps: int = 0
    min_lr: float = 1e-5
    patience: int = 10
    """Evaluations without improvement before the plateau schedule lowers the LR."""
    zero_stage: int = 2
    micro_batch_size: int = 1
    grad_accum: int = 8
    grad_clip: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    """Recompute decoder layers in the backward: less activation memory (needed at 70B), ~1/3 more compute."""
    objective: str = "next_token"
    """'next_token' (the paper: cross-entropy on the training rows) or 'distill': token-level KL(teacher ||
    student) on the same rows, the teacher being the converted model itself with its adapters off and its converted
    layers in softmax mode, so no second copy is loaded (one extra no-grad forward per micro-batch). Distillation
    pulls the model toward the original's predictions everywhere instead of toward the training text's domain.
    'mixed': (1 - distill_weight) * cross-entropy + distill_weight * KL at every position; its gradient is that of
    cross-entropy against the blend (1 - w) * next token + w * teacher distribution (classic knowledge distillation),
    so the text's domain is learned while the original's predictions anchor the short contexts."""
    distill_weight: float = 0.5
    """The KL's share of the 'mixed' objective, strictly between 0 (next_token) and 1 (distill)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"finetune.objective: {self.objective!r} is not one of {list(OBJECTIVES)}")
        if self.objective == "mixed" and not 0.0 < self.distill_weight < 1.0:
            raise ConfigError(f"finetune.distill_weight: {self.distill_weight} is not strictly between 0 and 1; "
                              "0 is objective next_token and 1 is objective distill")
        if self.schedule not in ("plateau", "cosine"):
            raise ConfigError(f"finetune.schedule: {self.schedule!r} is not one of ['plateau', 'cosine']")
        if self.warmup_steps < 0 or self.patience <= 0 or self.min_lr < 0:
            raise ConfigError(f"finetune: warmup_steps ({self.warmup_steps}) and min_lr ({self.min_lr}) must be "
                              f">= 0 and patience ({self.patience}) > 0")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"finetune.zero_stage: {self.zero_stage} is not supported; use 2 or 3")
        if self.lora_r <= 0:
            raise ConfigError(f"finetune.lora_r: must be positive, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"finetune.lora_dropout: must be in [0, 1), got {self.lora_dropout}")


@dataclass(kw_only=True)
class ExportConfig:
    """The export stage (`linearize export`): the Hugging Face directory written at the end of a run."""

    dtype: str = "float32"
    """Storage dtype of the weights: float32, bfloat16 or float16 (feature maps and gamma stay fp32). At 70B
    an fp32 export is 280 GB; bfloat16 halves it and builds the model in bf16 on the host."""
    merge: bool = True
    """Merge the stage-2 LoRA into q/k/v/o (false: keep it as a PEFT adapter in OUT/adapter/)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"export.dtype: {self.dtype!r} is not one of ['bfloat16', 'float16', 'float32']")


EVAL_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu")


@dataclass(kw_only=True)
class EvalConfig:
    """The eval stage and `linearize eval`: held-out perplexity by position (data.eval_seq_len x
    data.eval_sequences Brown documents), zero-shot tasks, passkey retrieval, throughput, the linear-mass
    diagnostic, and the gate the converted model must pass against the teacher and SWA+sinks baselines."""

    baselines: bool = True
    """Also measure the teacher and the training-free sliding window + sinks, in the same run."""
    stages: list[str] = field(default_factory=lambda: ["stage1", "stage2"])
    """Which of a run's converted models to measure: after stage 1 (stitched), after stage 2 (with LoRA)."""
    swa_window: int = 64
    swa_sinks: int = 4
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    task_limit: int | None = 200
    """Items per 0-shot task (seeded sample, the same for every model); null = all."""
    mmlu_limit: int | None = 10
    """MMLU questions per subject (57 subjects, 5-shot prompts of ~720 tokens); null = all 14,042."""
    passkey_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    passkey_trials: int = 10
    passkey_aligned: bool = True
    """Passkey questions end where the needle's key digits start (its lead space token, for tokenizers that split
    it off); false: the prompt of sessions 2-9, where a lone " " against " a" decided many trials."""
    batch_size: int = 8
    max_perplexity_ratio: float = 1.05
    """Gate: overall held-out perplexity <= this x the teacher's."""
    max_late_perplexity_ratio: float = 1.08
    """Gate: perplexity at positions 1024-2048 (the last bucket measured) <= this x the teacher's."""
    max_accuracy_drop: float = 1.0
    """Gate: mean zero-shot accuracy (points) at most this far below the teacher's."""
    max_training_tokens: int | None = 40_000_000
    """Gate: tokens of stage 1 + stage 2 behind the converted model at most this (LoLCATs' budget, 20M + 20M);
    null = no limit. Checked where the results record them (a run's models, not an exported directory's)."""

    def __post_init__(self) -> None:
        if not self.stages or any(stage not in ("stage1", "stage2") for stage in self.stages):
            raise ConfigError(f"eval.stages: {self.stages} must be a non-empty list of 'stage1' and 'stage2'")
        unknown = [t for t in self.tasks if t not in EVAL_TASKS]
        if unknown:
            raise ConfigError(f"eval.tasks: {unknown} unknown; choose from {list(EVAL_TASKS)} (or [] for none)")
        for key in ("task_limit", "mmlu_limit"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"eval.{key}: must be positive or null (all items), got {getattr(self, key)}")
        if any(length < 64 for length in self.passkey_lengths):
            raise ConfigError(f"eval.passkey_lengths: {self.passkey_lengths} has a length below 64 tokens; the "
                              "needle and the question alone take ~40")
        for key in ("swa_window", "passkey_trials", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"eval.{key}: must be positive, got {getattr(self, key)}")
        if self.swa_sinks < 0:
            raise ConfigError(f"eval.swa_sinks: must be >= 0, got {self.swa_sinks}")
        if min(self.max_perplexity_ratio, self.max_late_perplexity_ratio) < 1.0 or self.max_accuracy_drop < 0:
            raise ConfigError("eval: max_perplexity_ratio and max_late_perplexity_ratio must be >= 1 and "
                              f"max_accuracy_drop >= 0, got {self.max_perplexity_ratio}, "
                              f"{self.max_late_perplexity_ratio}, {self.max_accuracy_drop}")
        if self.max_training_tokens is not None and self.max_training_tokens <= 0:
            raise ConfigError(f"eval.max_training_tokens: must be positive or null (no limit), got "
                              f"{self.max_training_tokens}")


@dataclass(kw_only=True)
class ClusterConfig:
    """Where the work runs: a local Ray instance or a Ray cluster address, and its limits for the planner."""

    name: str = "local"
    address: str = "local"
    num_gpus: int = 0
    gpu_memory: int = 80 * 10**9
    host_memory: int = 24 * 10**9
    disk: int = 50 * 10**9
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.num_gpus < 0:
            raise ConfigError(f"cluster.num_gpus: must be >= 0, got {self.num_gpus}")


@dataclass(kw_only=True)
class RunConfig:
    """Everything one conversion run needs; written resolved to RUN/run.yaml."""

    model: ModelConfig
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = 0
    run_dir: str | None = None

    def __post_init__(self) -> None:
        num_layers = self.model.num_layers
        k = self.transfer.layers_per_block
        if isinstance(k, int) and not 1 <= k <= num_layers:
            raise ConfigError(
                f"transfer.layers_per_block: {k} is outside 1..{num_layers} (model {self.model.name} has "
                f"{num_layers} layers); pick a value in that range or 'auto'"
            )
        for key in ("layers", "keep_softmax"):
            for idx in getattr(self.attention, key) or []:
                if not -num_layers <= idx < num_layers:
                    raise ConfigError(
                        f"attention.{key}: index {idx} does not exist in {self.model.name} "
                        f"({num_layers} layers: 0..{num_layers - 1}, or negative from the end)"
                    )
        if not self.converted_layers:
            if not self.attention.keep_softmax:
                raise ConfigError("attention.layers: the selection is empty; give at least one index, or null for all")
            raise ConfigError(f"attention.keep_softmax: {self.attention.keep_softmax} keeps every layer that "
                              f"attention.layers ({self.attention.layers}) selects; leave at least one to convert")
        if self.attention.init_from:
            check_feature_dim(self.attention.init_from, self.attention.feature_dim, self.model.head_dim)

    @property
    def converted_layers(self) -> list[int]:
        """Sorted indices of the layers that become hybrid: `attention.layers` (all when null) minus `keep_softmax`."""
        n = self.model.num_layers
        selected = range(n) if self.attention.layers is None else {i % n for i in self.attention.layers}
        kept = {i % n for i in self.attention.keep_softmax or []}
        return sorted(set(selected) - kept)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields given as quantities are parsed before the type check.
_COUNT_FIELDS = {("transfer", "train_tokens"), ("finetune", "train_tokens")}
_BYTES_FIELDS = {("cluster", "gpu_memory"), ("cluster", "host_memory"), ("cluster", "disk")}


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return value if it matches the (string) annotation of a dataclass field; ints are accepted as floats."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
    if hint is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def build(cls: type, data: dict, section: str) -> Any:
    """Build a config dataclass from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{section}.{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {names}"
            raise ConfigError(f"{dotted}: unknown key; {hint}")
        if (section, key) in _COUNT_FIELDS:
            value = parse_count(value, dotted)
        elif (section, key) in _BYTES_FIELDS:
            value = parse_bytes(value, dotted)
        kwargs[key] = _check_type(value, hints[key], dotted)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ConfigError(f"{section}: missing required key(s) {missing}")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Presets and composition.


def preset_names(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / kind).glob("*.yaml"))


def _resolve_preset(kind: str, value: str) -> dict:
    path = Path(value)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return load_yaml(path)
    candidate = CONFIGS_DIR / kind / f"{value}.yaml"
    if not candidate.exists():
        raise ConfigError(
            f"{kind.rstrip('s')}: no preset named {value!r}; available: {preset_names(kind)} (or a path to a .yaml file)"
        )
    return load_yaml(candidate)


def load_model_config(value: str | dict, overrides: dict | None = None) -> ModelConfig:
    data = dict(_resolve_preset("models", value)) if isinstance(value, str) else dict(value)
    if overrides:
        data.update(overrides)
    return build(ModelConfig, data, "model")


def load_cluster_config(value: str | dict) -> ClusterConfig:
    data = _resolve_preset("clusters", value) if isinstance(value, str) else value
    return build(ClusterConfig, data, "cluster")


_RECIPE_SECTIONS = {"attention": AttentionConfig, "data": DataConfig, "transfer": TransferConfig,
                    "finetune": FinetuneConfig, "eval": EvalConfig, "export": ExportConfig}
_RUN_KEYS = ("model", "recipe", "cluster", "seed", "run_dir", *_RECIPE_SECTIONS)


def resolve_run_config(data: dict) -> RunConfig:
    """Compose a run config mapping (presets + overrides) into a validated RunConfig."""
    for key in data:
        if key not in _RUN_KEYS:
            close = difflib.get_close_matches(str(key), _RUN_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {list(_RUN_KEYS)}"
            raise ConfigError(f"{key}: unknown top-level key; {hint}")
    if "model" not in data:
        raise ConfigError(f"model: missing; name a preset from {preset_names('models')} or give a mapping")
    model = load_model_config(data["model"])
    recipe = _resolve_preset("recipes", data["recipe"]) if isinstance(data.get("recipe"), str) else dict(
        data.get("recipe") or {})
    for key in recipe:
        if key not in _RECIPE_SECTIONS:
            raise ConfigError(f"recipe.{key}: unknown section; valid: {list(_RECIPE_SECTIONS)}")
    sections = {}
    for name, cls in _RECIPE_SECTIONS.items():
        merged = dict(recipe.get(name) or {})
        override = data.get(name) or {}
        if not isinstance(override, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {override!r}")
        merged.update(override)
        sections[name] = build(cls, merged, name)
    cluster = load_cluster_config(data.get("cluster", "local"))
    seed = _check_type(data.get("seed", 0), int, "seed")
    run_dir = _check_type(data.get("run_dir"), str | None, "run_dir")
    return RunConfig(model=model, cluster=cluster, seed=seed, run_dir=run_dir, **sections)


def load_run_config(path: str | Path) -> RunConfig:
    """Load a run config file (or a resolved RUN/run.yaml)."""
    try:
        return resolve_run_config(load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def run_config_to_yaml(config: RunConfig) -> str:
    """The resolved form written to RUN/run.yaml: inline mappings only, so it loads without presets. Sizes are
    written with their unit ('80000000000B'): a bare number would read back as gigabytes."""
    data = config.to_dict()
    for section, key in _BYTES_FIELDS:
        data[section][key] = f"{data[section][key]}B"
    return yaml.safe_dump(data, sort_keys=False)


def check_feature_dim(checkpoint: str, feature_dim: int, head_dim: int) -> None:
    """Read only the safetensors header and check every feature-map matrix is (heads, head_dim, feature_dim)."""
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"attention.init_from: {checkpoint!r} does not exist")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    for name, info in header.items():
        if name.endswith("feature_map_q.weight") or name.endswith("feature_map_k.weight"):
            shape = info["shape"]
            if shape[-1] != feature_dim or shape[-2] != head_dim:
                raise ConfigError(
                    f"attention.feature_dim: {feature_dim} does not match the checkpoint {checkpoint} "
                    f"({name} has shape {shape}, i.e. feature_dim {shape[-1]}); set attention.feature_dim: "
                    f"{shape[-1]} or train a new checkpoint"
                )
