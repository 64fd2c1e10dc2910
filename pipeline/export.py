"""`linearize export RUN [OUT] [--no-merge]`: the converted model as a self-contained Hugging Face directory.

OUT (default RUN/export) holds:

    config.json                 the base family's config + model_type "linearize_<family>", auto_map and
                                hybrid_attention {window_size, window_kind, feature_dim, layers}
    model.safetensors           base weights with the stage-2 LoRA merged into q/k/v/o (default), plus the
                                feature maps and gamma of every converted layer (kept fp32 in any dtype);
                                over 5 GB: model-0000i-of-0000N.safetensors + model.safetensors.index.json
    adapter/                    with --no-merge only: the PEFT adapter; model.safetensors is then unmerged
    modeling_linearize.py, configuration_linearize.py, padding.py   (pipeline/hf_export/)
    naive.py, feature_map.py    verbatim copies of kernels/hybrid_attention/naive.py, blocks/feature_map.py
    tokenizer files, generation_config.json

`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it in any process with torch and
transformers (no import of this project); generate() uses a constant-size cache and accepts left padding.
The weights are made and written one decoder layer at a time, so the export needs host memory for one layer and
one shard, whatever the model's size.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from tqdm import tqdm

from blocks.convert import AttentionSettings, convert_model, decoder_layers, hybrid_modules
from blocks.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter_files, lora_matrices, merge_lora

from .config import ModelConfig
from .finetune import ADAPTER_DIR, checkpoint_tensor_source, read_stitched
from .models import load_tokenizer, model_directory, random_value, teacher_config
from .rundir import RunDir

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_export"
TEMPLATE_FILES = ("modeling_linearize.py", "configuration_linearize.py", "padding.py")
# The math is copied, not re-typed: the export runs exactly the code the project tests.
COPIED_SOURCES = {"naive.py": PROJECT_ROOT / "kernels" / "hybrid_attention" / "naive.py",
                  "feature_map.py": PROJECT_ROOT / "blocks" / "feature_map.py"}
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
FP32_PARAMETERS = (".feature_map_q.", ".feature_map_k.", ".window_logit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hybrid_config(settings: AttentionSettings, layers: list[int]) -> dict:
    return {"window_size": settings.window_size, "window_kind": settings.window_kind,
            "feature_dim": settings.feature_dim, "layers": sorted(layers)}


MAX_SHARD_BYTES = 5 * 10**9
"""Safetensors files of at most this size (transformers' default shard size): a 70B export is ~30 files."""


def _write_directory(out: Path, config: dict, *, settings: AttentionSettings, layers: list[int], tokenizer,
                     adapter: dict[str, bytes] | None, provenance: dict) -> None:
    """Everything but the weights: config.json (the base family's, made loadable as the hybrid), the modeling
    code, the copied math, the tokenizer and, unmerged, the PEFT adapter."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model: model_type {model_type!r} cannot be exported; supported: {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    config.update({
        "model_type": f"linearize_{model_type}",
        "architectures": [f"Linearized{family}ForCausalLM"],
        "auto_map": {"AutoConfig": f"configuration_linearize.Linearized{family}Config",
                     "AutoModelForCausalLM": f"modeling_linearize.Linearized{family}ForCausalLM"},
        "hybrid_attention": hybrid_config(settings, layers),
        "linearize": dict(provenance, lora="adapter/" if adapter else "merged"),
    })
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TEMPLATE_FILES:
        shutil.copyfile(TEMPLATE_DIR / name, out / name)
    for name, source in COPIED_SOURCES.items():
        shutil.copyfile(source, out / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if adapter:
        (out / "adapter").mkdir(exist_ok=True)
        for name, data in adapter.items():
            (out / "adapter" / name).write_bytes(data)


class _ShardWriter:
    """Tensors into safetensors files of at most MAX_SHARD_BYTES, named and indexed as save_pretrained does
    (one file: model.safetensors; more: model-0000i-of-0000N.safetensors + model.safetensors.index.json)."""

    def __init__(self, out: Path):
        self.out, self.max_bytes = out, MAX_SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.files: list[list[str]] = []  # tensor names per written file, in order

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.out / f"part-{len(self.files)}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            (self.out / "part-0.safetensors").rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            (self.out / f"part-{i}.safetensors").rename(self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _pieces(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """The model in pieces that are built, filled and written one at a time: each decoder layer (recursively)
    and each other module with parameters of its own, by name; (name, module, recurse)."""
    layer_list = decoder_layers(model)
    layers_name = next(name for name, module in model.named_modules() if module is layer_list)
    pieces = [(f"{layers_name}.{i}", layer, True) for i, layer in enumerate(layer_list)]
    for name, module in model.named_modules():
        inside_layers = name == layers_name or name.startswith(layers_name + ".")
        if not inside_layers and any(True for _ in module.parameters(recurse=False)):
            pieces.append((name, module, False))
    return pieces


@torch.no_grad()
def write_converted_weights(out: Path, model_config: ModelConfig, settings: AttentionSettings, layers: list[int],
                            state: dict[str, torch.Tensor], dtype: torch.dtype,
                            adapter: dict[str, bytes] | None) -> dict:
    """The converted model's weights, with the adapter merged into q/k/v/o when given, written piece by piece:
    the model is laid out on the meta device and each decoder layer is made on the host, filled (base weights
    as load_model makes them, feature maps and gamma from the stitched state, LoRA folded in), written and let
    go. Host memory holds one layer and one shard, not the model (a 70B bf16 export built whole needed 141 GB).
    Returns the transformers config as a dict."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = teacher_config(model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        convert_model(model, settings, layers=layers)
    names = list(dict(model.named_parameters()))  # a tied weight once, under its first name (as save_pretrained)
    directory = model_directory(model_config)
    base_names = [n for n in names if not any(part in n for part in FP32_PARAMETERS)]
    if directory is None:
        source = partial(random_value, model_config.seed)
    else:
        source = checkpoint_tensor_source(directory, base_names)
    deltas, scaling = lora_matrices(adapter) if adapter else ({}, 0.0)
    hybrid = hybrid_modules(model)
    writer, wanted, written = _ShardWriter(out), set(names), set()
    for prefix, piece, recurse in tqdm(_pieces(model), desc="export", unit="piece", mininterval=5):
        piece.to_empty(device="cpu", recurse=recurse)
        for local, param in piece.named_parameters(recurse=recurse):
            name = f"{prefix}.{local}"
            if name not in wanted:
                continue  # the tied lm_head
            if any(part in name for part in FP32_PARAMETERS):
                index = int(prefix.rpartition(".")[2])
                param.data = state[f"layers.{index}.{local.removeprefix('self_attn.')}"].to(torch.float32)
            else:
                param.copy_(source(name, param.shape, param.dtype))
                lora = deltas.get(name.removesuffix(".weight"))
                if lora is not None:  # as PEFT merges: the fp32 product added to the weight, then rounded once
                    delta = (lora["B"].float() @ lora["A"].float()) * scaling
                    param.copy_((param.float() + delta).to(param.dtype))
            writer.add(name, param.detach().clone())
            written.add(name)
        piece.to_empty(device="meta", recurse=recurse)  # let the host memory go
    writer.close()
    missing = sorted(set(names) - written)
    unused = sorted(set(deltas) - {n.removesuffix(".weight") for n in written})
    if missing or unused or len(hybrid) != len(layers):
        raise RuntimeError(f"export: weights not written {missing[:3]}, LoRA matrices that match no module "
                           f"{unused[:3]}, or converted layers {sorted(hybrid)} != {layers}")
    config.dtype = dtype  # what save_pretrained records
    generation = (GenerationConfig.from_pretrained(directory) if directory is not None
                  and (directory / "generation_config.json").exists() else GenerationConfig.from_model_config(config))
    generation.save_pretrained(out)
    return config.to_diff_dict()  # as save_pretrained writes it: what differs from the defaults


def read_adapter(run: RunDir) -> dict[str, bytes] | None:
    """RUN/finetune/adapter/ as {file name: bytes}, or None when stage 2 has not finished."""
    names = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    if not all(run.exists(f"{ADAPTER_DIR}/{name}") for name in names):
        return None
    return {name: run.read_bytes(f"{ADAPTER_DIR}/{name}") for name in names}


def merge_run_adapter(run: RunDir, model: torch.nn.Module) -> torch.nn.Module | None:
    """`model` (the stitched model) with the run's stage-2 LoRA merged in; None when stage 2 has not finished."""
    adapter = read_adapter(run)
    return None if adapter is None else merge_lora(load_adapter_files(model, adapter))


def export_run(run_url: str, out: str | None = None, *, merge: bool | None = None, dtype: str | None = None) -> str:
    """Export the run's stitched model + stage-2 adapter; returns OUT (default RUN/export).
    `merge` and `dtype` default to the run config's export section."""
    from .stages import read_run_config

    run = RunDir(run_url)
    if merge is None or dtype is None:
        export_settings = read_run_config(run).export
        merge = export_settings.merge if merge is None else merge
        dtype = export_settings.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    started = time.perf_counter()
    meta, state, layers, model_config, settings = read_stitched(run)
    adapter = read_adapter(run)
    if adapter is None:
        logger.warning("%s has no finetune adapter: exporting the stitched model without LoRA",
                       run.url_of(ADAPTER_DIR))
    try:
        tokenizer = load_tokenizer(model_config)
    except ValueError:
        tokenizer = None
        logger.warning("model %s has random weights and no tokenizer: the export has none either", model_config.name)
    provenance = {"run": run.url, "base_model": model_config.name, "base_model_sha256": meta.get("base_model_sha256")}
    target = out or run.url_of(RunDir.export_dir)
    fs, path = fsspec.core.url_to_fs(target)
    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(path) if local else Path(tmp) / "export"
        directory.mkdir(parents=True, exist_ok=True)
        # Each step is logged with its time: at 70B the export takes minutes.
        config = write_converted_weights(directory, model_config, settings, layers, state, DTYPES[dtype],
                                         adapter if merge else None)
        _write_directory(directory, config, settings=settings, layers=layers, tokenizer=tokenizer,
                         adapter=None if merge else adapter, provenance=provenance)
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        print(f"export: {model_config.name} in {dtype}, {size / 1e9:.1f} GB written in "
              f"{time.perf_counter() - started:.0f} s ({torch.get_num_threads()} threads)", flush=True)
        if not local:
            fs.put(str(directory), path, recursive=True)
    return target


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run directory (path or fsspec URL) with stitched/ and finetune/adapter/")
    parser.add_argument("out", nargs="?", default=None, help="output directory (default: RUN/export)")
    parser.add_argument("--no-merge", dest="merge", action="store_false", default=None,
                        help="keep the LoRA adapter separate (OUT/adapter/, PEFT format) instead of merging it "
                             "(default: the run config's export.merge)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="storage dtype (feature maps and gamma stay fp32; default: the run config's "
                             "export.dtype)")


def main(args) -> int:
    out = export_run(args.run, args.out, merge=args.merge, dtype=args.dtype)
    if args.out is None:
        RunDir(args.run).mark("export", "done")
    print(f"exported to {out}\nload with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0
