"""GPU scale proof (issue 8): the whole pipeline at a Llama shape with deterministic random weights on the GPUs of
one machine, with faults, and the stage-1 scaling over 1, 2, 4 GPUs. Prints a table last and writes JSON (with
the device named) under --out (default $OUT, else the work directory).

Two modes, each sized for one device command of under 10 minutes:

    # plan -> collect -> transfer (all GPUs) -> stitch -> DeepSpeed ZeRO-3 LoRA (all GPUs) -> export, one transfer
    # worker and one DeepSpeed rank killed mid-run (LINEARIZE_FAULT, pipeline/stages.py and pipeline/finetune.py)
    python -m pipeline.bench_scale run --model llama3-8b --gpus 4 --work-dir /tmp/scale \\
        --faults "transfer:block=1:exit_after=30;finetune:exit_after=10:rank=1"
    # stage 1 again on the same cache with 1, 2 and 4 GPUs (hard links, nothing recomputed but transfer)
    python -m pipeline.bench_scale scaling --from-run /tmp/scale/llama3-8b-4gpu --gpus 1,2,4
    # where a run's time went, as a PNG beside its JSON (`run` draws it too)
    python -m pipeline.bench_scale timeline --run-json docs/results/scale/scale_run_llama3.1-70b_2gpu_session12.json

What it records, per run: the planner's prediction (plan.json: k, per-block GPU memory, cache bytes, collect /
block / wall seconds with the hardware preset named by the cluster) beside what happened: wall seconds per stage
(RUN/stage_times.json), collect and transfer wall and every task's peak GPU memory (RUN/blocks/summary.json;
torch's allocator), every DeepSpeed rank's peak and pace (RUN/finetune/result.json, or the newest checkpoint of a
run stopped in stage 2), the GPUs' own used memory sampled with nvidia-smi (CUDA contexts included), the cache's
bytes on disk, the export's size, and what the faults cost (micro-steps and optimizer steps that were redone).

The run itself is the normal CLI (`python -m pipeline.run run CONFIG --run-dir DIR`) in a subprocess that sees
the first N GPUs, so the Ray instance, the workers and the retries are the production ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

GB = 1e9
MODES = ("run", "scaling", "timeline")


# --------------------------------------------------------------------------------------------------
# Measuring around the run


class GpuMemorySampler:
    """The peak of `nvidia-smi`'s used memory per GPU (MiB -> bytes) while the block is active, every 0.5 s.
    This includes the CUDA contexts and the allocators' caches, which torch's own peak does not."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peaks, self._stop = interval_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        for line in out.strip().splitlines():
            index, used = (part.strip() for part in line.split(","))
            self.peaks[int(index)] = max(self.peaks.get(int(index), 0), int(float(used) * 2**20))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "GpuMemorySampler":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_logged(command: list[str], env: dict, log_path: Path, time_limit_s: float | None = None) -> tuple[int, float]:
    """Run `command`, its output both printed and kept in log_path; returns (exit code, wall seconds). Past
    `time_limit_s` the command's whole process group (driver, Ray, workers) is killed and the code is 124, so a
    device command that must end in time still reports what the run directory holds."""
    started = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        timer = None
        if time_limit_s:
            timer = threading.Timer(time_limit_s, lambda: os.killpg(process.pid, signal.SIGKILL))
            timer.start()
        for line in process.stdout:
            if "it/s]" in line or "s/it]" in line:  # Ray's progress bars: kept in the log, not on the console
                log.write(line)
                continue
            sys.stdout.write(line)
            log.write(line)
        code = process.wait()
        if timer is not None:
            timer.cancel()
    if code == -signal.SIGKILL and time_limit_s and time.perf_counter() - started >= time_limit_s:
        code = 124
    return code, time.perf_counter() - started


def gpu_env(gpus: int) -> dict:
    """The environment of a run on the first `gpus` GPUs (Ray counts what CUDA_VISIBLE_DEVICES shows)."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    # DEVICE.md: NVLink multicast can take the host's GPUs down; keep it off in every process.
    env.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # no torch CUDA: say so rather than fail the report
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


# --------------------------------------------------------------------------------------------------
# Mode "run": the whole pipeline


def model_label(model: str) -> str:
    """A preset name as it is; a YAML path by its file name."""
    return Path(model).stem if model.endswith((".yaml", ".yml")) else model


def run_config(args) -> dict:
    """The run YAML of this measurement: the model preset and the LoLCATs recipe at small token budgets."""
    return {
        "model": args.model,
        "recipe": "lolcats",
        # Recorded, not left to the default, so `planner --check` knows which kernel path the run timed.
        "attention": {"feature_dtype": args.feature_dtype},
        "cluster": {"name": args.hardware, "address": "local", "num_gpus": args.gpus,
                    "gpu_memory": args.gpu_memory, "host_memory": args.host_memory, "disk": args.disk},
        "data": {"seq_len": args.seq_len, "validation_sequences": 16, "eval_seq_len": args.seq_len,
                 "eval_sequences": 4},
        "transfer": {"train_tokens": args.train_tokens, "layers_per_block": args.layers_per_block,
                     "micro_batch_size": 1, "grad_accum": 8, "eval_every": 20, "checkpoint_every": 5},
        "finetune": {"train_tokens": args.finetune_tokens, "zero_stage": 3, "micro_batch_size": 1,
                     "grad_accum": args.finetune_grad_accum, "eval_every": args.finetune_eval_every,
                     "checkpoint_every": args.finetune_checkpoint_every,
                     "gradient_checkpointing": args.gradient_checkpointing},
        "export": {"dtype": args.export_dtype},
    }


def summarize(run_dir: Path) -> dict:
    """What the run directory says happened, beside the plan's prediction."""
    def read(rel: str):
        path = run_dir / rel
        return json.loads(path.read_text()) if path.exists() else None

    plan, blocks, finetune = read("plan.json"), read("blocks/summary.json"), read("finetune/result.json")
    out = {"run_dir": str(run_dir), "stage_times_s": read("stage_times.json"),
           "cache_bytes": folder_bytes(run_dir / "cache"), "export_bytes": folder_bytes(run_dir / "export")}
    if plan:
        out["plan"] = {key: plan[key] for key in ("k", "num_blocks", "blocks", "waves", "per_block_memory_bytes",
                                                   "cache_bytes", "predicted_times_s", "hardware_preset", "cost")}
    if blocks:
        transfers = [t for t in blocks["transfer"] if not t.get("skipped") and t.get("attempt")]
        out["blocks"] = {
            "collect_wall_s": blocks["collect_wall_s"], "transfer_wall_s": blocks["transfer_wall_s"],
            "wall_s": blocks["wall_s"],
            # started_at/ended_at (wall clock) line the tasks up against each other; first_* are the parts of
            # a fresh process's first step and evaluation that include JIT compilation.
            "collect": [{key: c.get(key) for key in ("boundary", "seconds", "compute_s", "write_s", "read_s",
                                                      "tokens", "bytes_written", "peak_gpu_bytes", "started_at",
                                                      "ended_at")} for c in blocks["collect"]],
            "transfer": [{"block": t["block"], "layers": t["layers"], **{key: t["attempt"].get(key) for key in (
                "wall_s", "load_s", "build_s", "validation_read_s", "train_s", "eval_s", "first_micro_step_s",
                "first_eval_s", "tokens_per_s",
                "peak_gpu_bytes", "resumed_from_micro_step", "started_at", "ended_at")},
                "micro_steps": t["micro_steps"]} for t in transfers],
        }
        out["blocks"]["start_wait_s"] = start_waits(out["blocks"])
        out["blocks"]["warm_up"] = blocks.get("warm_up")  # the kernel warm-up task, where the run had one
    if finetune is None:  # stopped mid-stage 2 (a time limit): what its newest checkpoint recorded
        pointer = read("finetune/checkpoint/latest.json")
        finetune = read(f"{pointer['dir']}/state.json") if pointer else None
        if finetune:
            finetune = {"partial": True, "steps": finetune.get("total_steps"),
                        **{key: finetune.get(key) for key in ("step", "best", "history", "ranks")}}
    if finetune:
        out["finetune"] = {key: value for key, value in finetune.items() if key != "history"}
        out["finetune"]["steps_run"] = len([h for h in finetune.get("history", []) if "train_loss" in h])
    faults = run_dir / "faults"
    out["faults_fired"] = sorted(p.name for p in faults.iterdir()) if faults.exists() else []
    return out


def start_waits(blocks: dict) -> dict:
    """Seconds each task waited between the moment it could start and the start of its work (a fresh worker
    process's start and imports, plus scheduling), from the tasks' wall-clock stamps: a collect task from the end
    of the one before it (the chain), a block from the end of the boundary it reads. {"collect": {boundary: s},
    "transfer": {block: s}}; tasks without stamps (older JSON, skipped or resumed work) are left out."""
    collect = sorted((c for c in blocks.get("collect", []) if c.get("started_at") and c.get("ended_at")),
                     key=lambda c: c["started_at"])
    ended = {c["boundary"]: c["ended_at"] for c in collect}
    waits = {"collect": {later["boundary"]: later["started_at"] - earlier["ended_at"]
                         for earlier, later in zip(collect, collect[1:])},
             "transfer": {t["block"]: t["started_at"] - ended[t["block"]] for t in blocks.get("transfer", [])
                          if t.get("started_at") and t["block"] in ended}}
    return waits


def measure_run(args) -> dict:
    work = Path(args.work_dir)
    run_dir = work / f"{model_label(args.model)}-{args.gpus}gpu"
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / f"{model_label(args.model)}-{args.gpus}gpu.yaml"
    config_path.write_text(yaml.safe_dump(run_config(args), sort_keys=False))
    env = gpu_env(args.gpus)
    if args.faults:
        env["LINEARIZE_FAULT"] = args.faults
    command = [sys.executable, "-m", "pipeline.run", "run", str(config_path), "--run-dir", str(run_dir)]
    if args.until:
        command += ["--until", args.until]
    with GpuMemorySampler() as sampler:
        code, wall = run_logged(command, env, work / "run.log", args.time_limit_s)
    return {"mode": "run", "model": args.model, "gpus": args.gpus, "faults": args.faults, "exit_code": code,
            "wall_s": wall, "config": run_config(args), "nvidia_smi_peak_bytes": sampler.peaks, **summarize(run_dir)}


# --------------------------------------------------------------------------------------------------
# Mode "scaling": stage 1 again on the finished run's cache with fewer or more GPUs


def copy_for_transfer(source: Path, target: Path) -> None:
    """A run directory with `source`'s plan, tokens and boundary cache (hard links: no bytes copied) and no
    trained blocks, marked collected, so `resume --until transfer` runs stage 1 alone."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in ("run.yaml", "plan.json"):
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "cache", target / "cache", copy_function=os.link)
    (target / "state.json").write_text(json.dumps({"stages": {"plan": "done", "collect": "done"}}))


def measure_scaling(args) -> dict:
    source = Path(args.from_run)
    rows = []
    for gpus in [int(g) for g in args.gpus.split(",")]:
        target = source.parent / f"{source.name}-transfer-{gpus}gpu"
        copy_for_transfer(source, target)
        command = [sys.executable, "-m", "pipeline.run", "resume", str(target), "--until", "transfer"]
        with GpuMemorySampler() as sampler:
            code, wall = run_logged(command, gpu_env(gpus), source.parent / "scaling.log", args.time_limit_s)
        summary = summarize(target)
        rows.append({"gpus": gpus, "exit_code": code, "command_wall_s": wall,
                     "transfer_wall_s": summary.get("blocks", {}).get("transfer_wall_s"),
                     "num_blocks": len(summary.get("blocks", {}).get("transfer", [])),
                     "nvidia_smi_peak_bytes": sampler.peaks, "blocks": summary.get("blocks")})
        shutil.rmtree(target / "cache")  # only links; the source keeps the data
    base = next((r for r in rows if r["gpus"] == min(r["gpus"] for r in rows)), None)
    for row in rows:
        if base and base["gpus"] and base["transfer_wall_s"] and row["transfer_wall_s"]:
            speedup = base["transfer_wall_s"] / row["transfer_wall_s"]
            row["speedup"] = speedup
            row["parallel_efficiency"] = speedup / (row["gpus"] / base["gpus"])
    return {"mode": "scaling", "from_run": str(source), "rows": rows}


# --------------------------------------------------------------------------------------------------
# Report


def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:.1f}"


def table(result: dict) -> str:
    if result["mode"] == "scaling":
        lines = ["GPUs  blocks  transfer wall s  speed-up  efficiency"]
        for r in result["rows"]:
            lines.append(f"{r['gpus']:>4}  {r['num_blocks']:>6}  {r['transfer_wall_s'] or float('nan'):>15.1f}  "
                         f"{r.get('speedup', float('nan')):>8.2f}  {r.get('parallel_efficiency', float('nan')):>10.0%}")
        return "\n".join(lines)
    plan, blocks = result.get("plan", {}), result.get("blocks", {})
    predicted = plan.get("predicted_times_s") or {}
    lines = [f"{result['model']} on {result['gpus']} GPU(s), exit code {result['exit_code']}, "
             f"wall {result['wall_s']:.0f} s; plan k={plan.get('k')} ({plan.get('num_blocks')} blocks, "
             f"{plan.get('hardware_preset')} constants)",
             "quantity                         predicted     measured"]

    def row(name, predicted_value, measured_value, unit=""):
        fmt = (lambda v: "-" if v is None else f"{v:.1f}{unit}")
        lines.append(f"{name:<32} {fmt(predicted_value):>10} {fmt(measured_value):>12}")

    row("collect wall (s)", predicted.get("collect_s"), blocks.get("collect_wall_s"))
    block_walls = [t["wall_s"] for t in blocks.get("transfer", []) if t.get("wall_s")]
    row("one block's transfer (s, max)", predicted.get("block_s"), max(block_walls) if block_walls else None)
    row("collect + transfer wall (s)", predicted.get("wall_s"), blocks.get("wall_s"))
    waits = [*(blocks.get("start_wait_s") or {}).get("collect", {}).values(),
             *(blocks.get("start_wait_s") or {}).get("transfer", {}).values()]
    row("task start wait (s, max)", predicted.get("task_start_s"), max(waits) if waits else None)
    peaks = [t["peak_gpu_bytes"] for t in blocks.get("transfer", []) if t.get("peak_gpu_bytes")]
    row("block GPU memory (GB, max)", (plan.get("per_block_memory_bytes") or 0) / GB or None,
        max(peaks) / GB if peaks else None)
    row("cache (GB)", (plan.get("cache_bytes") or 0) / GB or None, result["cache_bytes"] / GB)
    for stage, seconds in (result.get("stage_times_s") or {}).items():
        lines.append(f"stage {stage:<26} {'':>10} {seconds:>11.1f}s")
    finetune = result.get("finetune") or {}
    for rank in finetune.get("ranks", []) or []:
        lines.append(f"finetune rank {rank.get('rank')}: peak {_gb(rank.get('peak_gpu_bytes'))} GB, "
                     f"{rank.get('tokens_per_s') or 0:,.0f} tokens/s")
    smi = result.get("nvidia_smi_peak_bytes") or {}
    lines.append("nvidia-smi peak per GPU (GB): " + ", ".join(f"{i}: {_gb(v)}" for i, v in sorted(smi.items())))
    lines.append(f"faults fired: {result.get('faults_fired')}; export {result['export_bytes'] / GB:.1f} GB")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Where the time went: a timeline of a run JSON


def timeline_rows(result: dict) -> list[tuple[str, list[tuple[float, float, str]]]]:
    """A run JSON's time, as rows of (label, [(start s, length s, kind)]) from the run's start. The stages are laid
    end to end from stage_times_s (each stage's wall; the driver's few seconds between stages are left out). Inside
    the collect stage, which also runs the transfer, each task is placed by its own clock stamps, with the wait
    before it ('start': from the moment it could start, a fresh worker's start included) and, for a block, its
    load (building its layers, the first evaluation) apart from the rest. Stage 2's ranks show their build and
    engine start, then training; the rest of the stage is evaluations, checkpoints and the adapter."""
    stages = result.get("stage_times_s") or {}
    offsets, at = {}, 0.0
    for stage, seconds in stages.items():
        offsets[stage], at = at, at + seconds
    rows: list[tuple[str, list[tuple[float, float, str]]]] = [
        ("stages", [(offsets[stage], seconds, stage) for stage, seconds in stages.items()])]
    blocks = result.get("blocks") or {}
    collect = sorted((c for c in blocks.get("collect", []) if c.get("started_at")), key=lambda c: c["started_at"])
    if collect and "collect" in offsets and blocks.get("collect_wall_s"):
        zero = collect[-1]["ended_at"] - blocks["collect_wall_s"]  # the collect stage's start, on the tasks' clock

        def place(stamp: float) -> float:
            return offsets["collect"] + stamp - zero

        ready = zero
        for task in collect:
            rows.append((f"collect boundary {task['boundary']}",
                         [(place(ready), task["started_at"] - ready, "start"),
                          (place(task["started_at"]), task["ended_at"] - task["started_at"], "collect")]))
            ready = task["ended_at"]
        warm = blocks.get("warm_up") or {}
        if warm.get("started_at"):
            rows.append(("kernel warm-up", [(place(warm["started_at"]), warm["ended_at"] - warm["started_at"],
                                              "warm-up")]))
        ended = {c["boundary"]: c["ended_at"] for c in collect}
        for block in blocks.get("transfer", []):
            if not block.get("started_at"):
                continue
            begin = block["started_at"]
            parts = [(place(begin), block.get("load_s", 0.0), "block load"),
                     (place(begin) + block.get("load_s", 0.0), block["ended_at"] - begin - block.get("load_s", 0.0),
                      "block train + eval")]
            if block["block"] in ended:
                parts.insert(0, (place(ended[block["block"]]), begin - ended[block["block"]], "start"))
            rows.append((f"transfer block {block['block']}", parts))
    for rank in (result.get("finetune") or {}).get("ranks", []):
        if "finetune" in offsets and rank.get("init_s") is not None:
            start = offsets["finetune"]
            rows.append((f"stage 2 rank {rank['rank']}",
                         [(start, rank["init_s"], "stage-2 build"),
                          (start + rank["init_s"], rank.get("train_s") or 0.0, "stage-2 training")]))
    return rows


TIMELINE_COLOURS = {"plan": "#999999", "collect": "#4c72b0", "transfer": "#55a868", "stitch": "#999999",
                    "finetune": "#c44e52", "export": "#8172b2", "eval": "#999999", "start": "#dddddd",
                    "warm-up": "#ccb974", "block load": "#8fbc8f", "block train + eval": "#2e7d32",
                    "stage-2 build": "#e6a0a2", "stage-2 training": "#c44e52"}


def plot_timeline(result: dict, path: Path) -> Path:
    """timeline_rows as a PNG: one bar per row, time on x, a legend of the kinds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = timeline_rows(result)
    figure = Figure(figsize=(12.0, 1.4 + 0.42 * len(rows)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    kinds = []
    end = max((start + length for _, parts in rows for start, length, _ in parts), default=1.0)
    for y, (label, parts) in enumerate(rows):
        for start, length, kind in parts:
            axes.broken_barh([(start, max(length, 0.0))], (y - 0.35, 0.7),
                             facecolors=TIMELINE_COLOURS.get(kind, "#777777"), edgecolor="white", linewidth=0.5)
            kinds += [kind] if kind not in kinds else []
            if label == "stages" and length > 0.06 * end:  # name the long stages on their bar
                axes.text(start + length / 2, y, f"{kind} {length:.0f} s", ha="center", va="center", color="white",
                          fontsize=8)
    axes.set_yticks(range(len(rows)), [label for label, _ in rows])
    axes.invert_yaxis()
    axes.set_xlabel("seconds from the run's start (stages end to end)")
    axes.set_title(f"{result.get('model')} on {result.get('gpus')} GPU(s), {result.get('device', '')}: "
                   f"{result.get('wall_s', 0):.0f} s, exit code {result.get('exit_code')}")
    axes.grid(True, axis="x", alpha=0.3)
    names = {"collect": "collect (+ transfer)"}  # the collect stage runs each block as its boundary is ready
    axes.legend(handles=[Patch(color=TIMELINE_COLOURS.get(k, "#777777"), label=names.get(k, k)) for k in kinds],
                loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--model", default="llama3-8b", help="model preset (default: %(default)s)")
    parser.add_argument("--gpus", default="4", help="run: GPUs (default 4); scaling: a list such as 1,2,4")
    parser.add_argument("--hardware", default="h200", help="planner constants: configs/hardware/NAME.yaml")
    parser.add_argument("--gpu-memory", default="141GB")
    parser.add_argument("--host-memory", default="500GB")
    parser.add_argument("--disk", default="200GB")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--train-tokens", default="512K", help="stage-1 tokens (default: %(default)s)")
    parser.add_argument("--layers-per-block", default="auto", help="k (default: the planner's)")
    parser.add_argument("--finetune-tokens", default="160K", help="stage-2 tokens (default: %(default)s)")
    parser.add_argument("--finetune-grad-accum", type=int, default=2)
    parser.add_argument("--finetune-eval-every", type=int, default=5, help="stage-2 steps between evaluations")
    parser.add_argument("--finetune-checkpoint-every", type=int, default=5, help="stage-2 steps between checkpoints")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="stage 2 recomputes decoder layers in the backward (needed at 70B)")
    parser.add_argument("--feature-dtype", default="model", choices=("model", "float32"),
                        help="attention.feature_dtype (default %(default)s; float32 is the path of every run before "
                             "session 9)")
    parser.add_argument("--export-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="export storage dtype (default %(default)s; at 70B fp32 is 280 GB: use bfloat16)")
    parser.add_argument("--faults", default="", help="LINEARIZE_FAULT for the run (default: none)")
    parser.add_argument("--until", help="last stage (default: all)")
    parser.add_argument("--time-limit-s", type=float, help="kill a run (its whole process group) after this many "
                        "seconds and report what it finished (exit code 124)")
    parser.add_argument("--from-run", help="scaling: the finished run whose cache is reused")
    parser.add_argument("--run-json", help="timeline: a run JSON of this script, drawn as RUN_JSON's .png")
    parser.add_argument("--work-dir", default="/tmp/linearize-scale")
    parser.add_argument("--out", help="where the JSON goes (default $OUT, else the work directory)")
    args = parser.parse_args(argv)
    if args.layers_per_block != "auto":
        args.layers_per_block = int(args.layers_per_block)
    if args.mode == "timeline":
        if not args.run_json:
            parser.error("timeline needs --run-json PATH (a JSON written by `run`)")
        path = Path(args.run_json)
        print(f"wrote {plot_timeline(json.loads(path.read_text()), path.with_suffix('.png'))}")
        return 0
    if args.mode == "run":
        args.gpus = int(args.gpus)
        result = measure_run(args)
        name = f"scale_run_{model_label(args.model)}_{args.gpus}gpu.json"
    else:
        if not args.from_run:
            parser.error("scaling needs --from-run RUN_DIR (a finished `run` of this script)")
        result = measure_scaling(args)
        name = f"scale_transfer_{Path(args.from_run).name}.json"
    result["device"] = device_name()
    result["command"] = "python -m pipeline.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out or os.environ.get("OUT") or args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    print(f"wrote {out / name}")
    if args.mode == "run":
        print(f"wrote {plot_timeline(result, (out / name).with_suffix('.png'))}")
    return 0 if all(r.get("exit_code", 0) == 0 for r in result.get("rows", [result])) else 1


if __name__ == "__main__":
    sys.exit(main())
