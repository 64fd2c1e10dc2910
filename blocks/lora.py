"""Stage-2 LoRA on the converted layers: PEFT adapters on q, k, v, o of every hybrid attention layer.

Owns which modules get adapters (the q/k/v/o projections of converted layers only; layers left as
softmax attention keep their weights), the freezing rule (everything but the LoRA matrices, so the
feature maps and gamma trained in stage 1 stay fixed), and the adapter in PEFT's on-disk format
(`adapter_config.json` + `adapter_model.safetensors`) built from *given* tensors: under ZeRO-3 a rank
holds only a shard of each parameter, so the caller gathers full tensors first and hands them here.

No storage and no DeepSpeed here: functions return bytes / modules and the pipeline persists them.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .convert import hybrid_modules
from .hybrid_attention import HybridAttention

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(kw_only=True)
class LoraSettings:
    """LoRA hyper-parameters; mirrors pipeline.config.FinetuneConfig's lora_* fields without importing it."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: LoRA rank must be a positive int (the paper uses 8), got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must lie in [0, 1), got {self.dropout!r}")


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full module names of q/k/v/o of every converted layer, e.g. 'model.layers.3.self_attn.q_proj'."""
    converted = hybrid_modules(model)
    if not converted:
        raise ValueError("model: no converted (hybrid) attention layers to put LoRA on; call convert_model first")
    owner = {id(module): idx for idx, module in converted.items()}
    names = []
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf in PROJECTIONS and id(model.get_submodule(parent)) in owner:
            names.append(name)
    return names


def add_lora(model: nn.Module, settings: LoraSettings | None = None, seed: int | None = 0) -> PeftModel:
    """Wrap a converted causal LM with LoRA on the converted layers' q, k, v, o; only LoRA trains.

    PEFT freezes every non-LoRA parameter, which keeps the feature maps and gamma of stage 1 fixed.
    LoRA A is drawn from torch's global generator: `seed` (None: leave it alone) makes the initial
    adapter the same in every process and every call, without changing the caller's RNG state.
    """
    settings = settings or LoraSettings()
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=lora_target_modules(model), bias="none", task_type="CAUSAL_LM")
    if seed is None:
        return get_peft_model(model, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_parameters(peft_model: PeftModel) -> dict[str, nn.Parameter]:
    """The trainable LoRA parameters by their name in `peft_model.named_parameters()`."""
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    stray = [name for name in params if ".lora_" not in name]
    if stray:
        raise ValueError(f"peft_model: parameters other than LoRA are trainable: {stray[:3]}; "
                         "build it with add_lora, which freezes everything else")
    return params


def adapter_files(peft_model: PeftModel, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """PEFT's adapter directory as {file name: bytes}, from full tensors keyed like lora_parameters().

    The result loads with `PeftModel.from_pretrained(base, directory)`.
    """
    state = get_peft_model_state_dict(peft_model, state_dict=dict(tensors))
    if not state:
        raise ValueError("tensors: no LoRA tensors found; pass the full tensors of lora_parameters(peft_model)")
    with tempfile.TemporaryDirectory() as tmp:
        # PEFT's own writer turns the config's sets into lists and adds its version fields.
        peft_model.peft_config["default"].save_pretrained(tmp)
        config_bytes = (Path(tmp) / ADAPTER_CONFIG).read_bytes()
    weights = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}
    return {ADAPTER_CONFIG: config_bytes, ADAPTER_WEIGHTS: save_safetensors_bytes(weights)}


def load_adapter_files(model: nn.Module, files: dict[str, bytes], trainable: bool = False) -> PeftModel:
    """Attach a LoRA adapter given as {file name: bytes} (as written by adapter_files) to a converted model."""
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if name not in files]
    if missing:
        raise ValueError(f"files: the adapter lacks {missing}; expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    targets = json.loads(files[ADAPTER_CONFIG]).get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    # PEFT may save the target list shortened to name suffixes ('k_proj') when they select the same modules,
    # so compare the modules the saved list selects, not the list itself.
    projections = [name for name, _ in model.named_modules() if name.rpartition(".")[2] in PROJECTIONS]
    selected = {name for name in projections if any(name == t or name.endswith("." + t) for t in targets)}
    expected_targets = set(lora_target_modules(model))
    if selected != expected_targets:
        raise ValueError(f"files: the adapter targets {sorted(selected ^ expected_targets)[:3]} ... that "
                         "are not (or not all of) this model's converted q/k/v/o; was it trained on a model "
                         "converted at the same layers?")
    with tempfile.TemporaryDirectory() as tmp:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            (Path(tmp) / name).write_bytes(files[name])
        peft_model = PeftModel.from_pretrained(model, tmp, is_trainable=trainable)
    # PEFT only warns about adapter tensors that match no module; a silently unused adapter is worse.
    expected = {key for key in load_safetensors_bytes(files[ADAPTER_WEIGHTS])}
    loaded = set(get_peft_model_state_dict(peft_model))
    if expected != loaded:
        raise ValueError(f"files: adapter tensors {sorted(expected ^ loaded)[:3]} do not match this model's LoRA "
                         "modules; was it trained on a model converted at the same layers?")
    return peft_model


def lora_matrices(files: dict[str, bytes]) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """An adapter's LoRA matrices by module name ('model.layers.3.self_attn.q_proj' -> {'A': .., 'B': ..}) and its
    scaling (lora_alpha / r, or / sqrt(r) with rsLoRA): the module's update is scaling * B @ A."""
    config = json.loads(files[ADAPTER_CONFIG])
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("adapter: DoRA and per-module ranks or alphas are not plain B @ A updates; this needs an "
                         "adapter trained by linearize's stage 2 (one rank and alpha for every module)")
    rank = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_safetensors_bytes(files[ADAPTER_WEIGHTS]).items():
        module, _, which = key.removeprefix("base_model.model.").rpartition(".lora_")
        matrices.setdefault(module, {})[which.removesuffix(".weight")] = tensor
    return matrices, scaling


def mix_adapters(adapters: list[dict[str, bytes]], weights: list[float]) -> dict[str, bytes]:
    """One adapter whose update of every module is sum_i weights[i] * (adapter i's update), exactly: the A matrices
    stacked and the B matrices, each times its weight and scaling, side by side (rank = the sum of the ranks,
    lora_alpha = rank, so scaling 1). A weight-space blend of adapters trained from the same stitched model."""
    if len(adapters) != len(weights) or len(adapters) < 2:
        raise ValueError(f"weights: {len(weights)} weights for {len(adapters)} adapters; give one weight for each of "
                         "two or more adapters")
    parts = [lora_matrices(files) for files in adapters]
    modules = set(parts[0][0])
    for i, (matrices, _) in enumerate(parts[1:], start=1):
        if set(matrices) != modules:
            raise ValueError(f"adapters: adapter {i} targets {sorted(set(matrices) ^ modules)[:3]} ... that adapter 0 "
                             "does not (or the reverse); mix adapters trained on the same converted model")
    tensors = {}
    for module in sorted(modules):
        a = torch.cat([matrices[module]["A"].float() for matrices, _ in parts], dim=0)
        b = torch.cat([weight * scaling * matrices[module]["B"].float()
                       for (matrices, scaling), weight in zip(parts, weights)], dim=1)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    rank = sum(json.loads(files[ADAPTER_CONFIG])["r"] for files in adapters)
    config = dict(json.loads(adapters[0][ADAPTER_CONFIG]), r=rank, lora_alpha=rank, use_rslora=False)
    return {ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
            ADAPTER_WEIGHTS: save_safetensors_bytes(tensors)}


@contextmanager
def teacher_view(peft_model: PeftModel):
    """Inside the block, `peft_model` computes the original (unconverted) model: adapters off and every converted
    layer in softmax mode. LoRA only adds to the frozen q/k/v/o, so this is exactly the teacher's attention from the
    same weights, under ZeRO-3 too (no second copy of the model). Restores student mode on exit."""
    converted = [module for module in peft_model.modules() if isinstance(module, HybridAttention)]
    if not converted:
        raise ValueError("peft_model: no converted (hybrid) attention layers; it has no teacher view")
    with peft_model.disable_adapter():
        for module in converted:
            module.set_mode("teacher")
        try:
            yield peft_model
        finally:
            for module in converted:
                module.set_mode("student")


def merge_lora(peft_model: PeftModel) -> nn.Module:
    """Fold the LoRA matrices into q, k, v, o and return the plain converted model (no PEFT wrappers)."""
    return peft_model.merge_and_unload()
