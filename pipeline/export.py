"""`linearize export RUN [OUT] [--no-merge]`: the converted model as a self-contained Hugging Face directory.

OUT (default RUN/export) holds:

    config.json                 the base family's config + model_type "linearize_<family>", auto_map and
                                hybrid_attention {window_size, window_kind, feature_dim, layers}
    model.safetensors           base weights with the stage-2 LoRA merged into q/k/v/o (default), plus the
                                feature maps and gamma of every converted layer (kept fp32 in any dtype)
    adapter/                    with --no-merge only: the PEFT adapter; model.safetensors is then unmerged
    modeling_linearize.py, configuration_linearize.py, padding.py   (pipeline/hf_export/)
    naive.py, feature_map.py    verbatim copies of kernels/hybrid_attention/naive.py, blocks/feature_map.py
    tokenizer files, generation_config.json

`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it in any process with torch and
transformers (no import of this project); generate() uses a constant-size cache and accepts left padding.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import fsspec
import torch

from blocks.convert import AttentionSettings
from blocks.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter_files, merge_lora

from .finetune import ADAPTER_DIR, load_stitched
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


def export_model(model: torch.nn.Module, out_dir: str | Path, *, settings: AttentionSettings, layers: list[int],
                 tokenizer=None, adapter: dict[str, bytes] | None = None, dtype: torch.dtype = torch.float32,
                 provenance: dict | None = None) -> Path:
    """Write a converted Hugging Face causal LM (HybridAttention in `layers`) as a loadable directory.

    Args:
        model: the converted model without PEFT wrappers (merge LoRA first, or pass the adapter separately).
        adapter: PEFT adapter files {name: bytes} to write to OUT/adapter/ (the --no-merge form).
        dtype: storage dtype of the weights; feature maps and gamma always stay fp32.
        provenance: recorded in config.json under "linearize" (run directory, base model hash, ...).
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model: model_type {model_type!r} cannot be exported; supported: {sorted(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = FAMILIES[model_type]
    # Cast parameter by parameter: model.to(dtype) would round the fp32 feature maps before they could be kept.
    for name, param in model.named_parameters():
        wanted = torch.float32 if any(part in name for part in FP32_PARAMETERS) else dtype
        if param.dtype != wanted:
            param.data = param.data.to(wanted)
    model.save_pretrained(out)

    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.update({
        "model_type": f"linearize_{model_type}",
        "architectures": [f"Linearized{family}ForCausalLM"],
        "auto_map": {"AutoConfig": f"configuration_linearize.Linearized{family}Config",
                     "AutoModelForCausalLM": f"modeling_linearize.Linearized{family}ForCausalLM"},
        "hybrid_attention": hybrid_config(settings, layers),
        "linearize": dict(provenance or {}, lora="adapter/" if adapter else "merged"),
    })
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
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
    return out


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
    from .models import load_tokenizer
    from .stages import read_run_config

    run = RunDir(run_url)
    if merge is None or dtype is None:
        settings = read_run_config(run).export
        merge = settings.merge if merge is None else merge
        dtype = settings.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    # Built in the storage dtype from the start: at 70B an fp32 copy alone would be 280 GB of host memory.
    # The feature maps and gamma are created fp32 whatever the base dtype (blocks/hybrid_attention.py).
    # Each step is logged with its time: at 70B the export takes minutes and used to print nothing.
    started = time.perf_counter()
    stitched = load_stitched(run, dtype=DTYPES[dtype])
    print(f"export: {stitched.model_config.name} built in {dtype} in {time.perf_counter() - started:.0f} s "
          f"({torch.get_num_threads()} threads)", flush=True)
    adapter = read_adapter(run)
    if adapter is None:
        logger.warning("%s has no finetune adapter: exporting the stitched model without LoRA",
                       run.url_of(ADAPTER_DIR))
    model = stitched.model
    if adapter is not None and merge:
        model = merge_lora(load_adapter_files(model, adapter))
    try:
        tokenizer = load_tokenizer(stitched.model_config)
    except ValueError:
        tokenizer = None
        logger.warning("model %s has random weights and no tokenizer: the export has none either",
                       stitched.model_config.name)
    provenance = {"run": run.url, "base_model": stitched.model_config.name,
                  "base_model_sha256": stitched.meta.get("base_model_sha256")}
    target = out or run.url_of(RunDir.export_dir)
    fs, path = fsspec.core.url_to_fs(target)
    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(path) if local else Path(tmp) / "export"
        writing = time.perf_counter()
        export_model(model, directory, settings=stitched.settings, layers=stitched.layers, tokenizer=tokenizer,
                     adapter=None if merge else adapter, dtype=DTYPES[dtype], provenance=provenance)
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        print(f"export: wrote {size / 1e9:.1f} GB in {time.perf_counter() - writing:.0f} s "
              f"({time.perf_counter() - started:.0f} s in all)", flush=True)
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
