"""Export cost at a model preset's shape, without training: a run directory holding only what `linearize export`
reads (stitched feature maps and gamma, drawn at random, and a random rank-8 LoRA adapter on every converted
q/k/v/o) for deterministic random base weights, then `python -m pipeline.cli export RUN OUT` in a child process.
Prints a table and writes JSON: wall seconds, the child's peak host memory (ru_maxrss), bytes written, and the
model's size in the export dtype (what an export that builds the whole model first holds at least).

    python -m pipeline.bench_export --model llama3-8b --layers 16 --dtype bfloat16 --work-dir /tmp/bench-export \\
        --out docs/results/export/bench_export_cpu.json

--layers keeps the first N decoder layers of the preset (a 70B export is 141 GB of disk). --code DIR runs the
export of another checkout (e.g. one before the layer-by-layer export) on the same kind of run, for comparison.
The run directory and the export are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors_bytes

GB = 1e9


def make_export_run(run_dir: Path, model: str, layers: int | None, seed: int = 0) -> dict:
    """RUN/stitched/ and RUN/finetune/adapter/ for the preset `model` (first `layers` decoder layers), all layers
    converted with the default attention settings. Returns the model config as written."""
    from transformers import AutoModelForCausalLM

    from blocks.convert import AttentionSettings, convert_model, hybrid_modules
    from blocks.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTIONS

    from .config import load_model_config, resolve_run_config, run_config_to_yaml
    from .finetune import ADAPTER_DIR, STITCHED_META, STITCHED_WEIGHTS
    from .models import teacher_config
    from .rundir import RunDir

    model_cfg = load_model_config(model)
    hf = dict(model_cfg.hf_config, **({"num_hidden_layers": layers} if layers else {}))
    model_dict = {**dataclasses.asdict(model_cfg), "weights": "random", "hf_config": hf}
    model_cfg = load_model_config(model_dict)
    settings = AttentionSettings()
    with torch.device("meta"):  # the shapes only
        skeleton = AutoModelForCausalLM.from_config(teacher_config(model_cfg))
        convert_model(skeleton, settings)
    generator = torch.Generator().manual_seed(seed)
    state, lora, rank = {}, {}, 8
    for index, module in hybrid_modules(skeleton).items():
        for name, param in module.named_parameters():
            if ".feature_map_" in f".{name}" or name == "window_logit":
                state[f"layers.{index}.{name}"] = 0.02 * torch.randn(param.shape, generator=generator)
        for projection in PROJECTIONS:
            weight = getattr(module, projection).weight
            prefix = f"base_model.model.model.layers.{index}.self_attn.{projection}"
            lora[f"{prefix}.lora_A.weight"] = 0.02 * torch.randn(rank, weight.shape[1], generator=generator)
            lora[f"{prefix}.lora_B.weight"] = 0.02 * torch.randn(weight.shape[0], rank, generator=generator)
    run = RunDir(str(run_dir))
    run.write_text(RunDir.run_yaml, run_config_to_yaml(resolve_run_config({"model": model_dict, "cluster": "local"})))
    run.write_bytes(STITCHED_WEIGHTS, save_safetensors_bytes(state))
    run.write_json(STITCHED_META, {"model": model_dict, "attention": dataclasses.asdict(settings),
                                   "base_model_sha256": None})
    # What the export reads of PEFT's adapter config (r, lora_alpha); the targets as add_lora names them.
    targets = [f"model.layers.{i}.self_attn.{p}" for i in hybrid_modules(skeleton) for p in PROJECTIONS]
    run.write_text(f"{ADAPTER_DIR}/{ADAPTER_CONFIG}", json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "bias": "none",
         "task_type": "CAUSAL_LM"}))
    run.write_bytes(f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}", save_safetensors_bytes(lora))
    return model_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b", help="model preset (default: %(default)s)")
    parser.add_argument("--layers", type=int, help="keep the first N decoder layers (default: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--work-dir", default="/tmp/linearize-bench-export", help="run directory and export go here")
    parser.add_argument("--keep", action="store_true", help="keep the run directory and the export")
    parser.add_argument("--code", help="a checkout of this project whose export is measured (default: this one)")
    parser.add_argument("--out", help="JSON path (default: WORK_DIR/bench_export.json)")
    args = parser.parse_args(argv)

    from .export import DTYPES

    work = Path(args.work_dir)
    if work.exists():
        shutil.rmtree(work)
    run_dir, out_dir = work / "run", work / "export"
    model = make_export_run(run_dir, args.model, args.layers)
    from .config import load_model_config
    from .planner import total_params

    params = total_params(load_model_config(model))
    started = time.perf_counter()
    command = [sys.executable, "-m", "pipeline.cli", "export", str(run_dir), str(out_dir), "--dtype", args.dtype]
    code = Path(args.code).resolve() if args.code else Path(__file__).resolve().parent.parent
    subprocess.run(command, check=True, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    written = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    result = {"model": args.model, "layers": model["hf_config"]["num_hidden_layers"], "dtype": args.dtype,
              "parameters": params, "model_bytes": params * DTYPES[args.dtype].itemsize, "export_bytes": written,
              "shards": len(list(out_dir.glob("*.safetensors"))), "wall_s": wall, "peak_host_bytes": peak,
              "code": subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or str(code),
              "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
              "command": "python -m pipeline.bench_export " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not args.keep:
        shutil.rmtree(work)
    out = Path(args.out or work / "bench_export.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'model':<12} {'layers':>6} {'dtype':<9} {'model GB':>8} {'written GB':>10} {'shards':>6} "
          f"{'wall s':>7} {'peak host GB':>12}")
    print(f"{args.model:<12} {result['layers']:>6} {args.dtype:<9} {result['model_bytes'] / GB:>8.2f} "
          f"{written / GB:>10.2f} {result['shards']:>6} {wall:>7.1f} {peak / GB:>12.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
