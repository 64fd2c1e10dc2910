"""`linearize run CONFIG [--run-dir URL]` and `linearize resume RUN`: the driver of a conversion run.

The driver owns the order of the stages (PIPELINE below, written down once) and RUN/state.json; the stages
own their outputs (pipeline/stages.py, and the later stages' own modules). Everything a stage needs is in the
run directory, so the driver can be killed at any moment and `linearize resume RUN` continues: stages marked
done are skipped, and an unfinished stage resumes from its own files (completed cache shards and blocks are
not redone).

    plan      the cost model (pipeline/planner.py) picks k unless transfer.layers_per_block is a number;
              writes plan.json (blocks, shards, predicted memory, disk and times) and run.yaml with k resolved
    collect   boundary states into the cache, one Ray task per boundary, chained (boundary b needs b-1)
    transfer  one Ray task per block, submitted as soon as its boundary is complete, so transfers overlap
              the rest of collection; collect and transfer are therefore one step of the driver, which marks
              each stage done when its last task finishes
    stitch    all blocks' φ, γ into stitched/, and the per-layer MSE plot into eval/
    ...       later stages (finetune, export, eval) join PIPELINE when their modules provide their entry
              point: see LATER_STAGES

A corrupt or truncated cache shard found by any task is reported back to the driver, which drops it from the
index and reruns the task that writes it (and then the task that found it); a worker that dies is retried by
Ray (cluster/blocks.py) and resumes from the block's checkpoint.

The CLI registers this module twice (cli.COMMANDS "run" and "resume"); add_arguments tells them apart by the
parser's prog ("linearize run" / "linearize resume").
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from .cache import BoundaryCache, CacheError
from .config import ConfigError, RunConfig, load_run_config, parse_bytes, run_config_to_yaml
from .rundir import RunDir
from .stages import (FAULT_ENV, RESULT, SPLITS, STITCHED_META, STITCHED_WEIGHTS, TRANSFER_MSE_JSON,
                     TRANSFER_MSE_PNG, collect_boundary, load_context, parse_faults, read_run_config, split_rows,
                     stitch, transfer_block, warm_up_kernels, write_tokens)

DEFAULT_RUNS_DIR = "runs"
STAGE_TIMES_JSON = "stage_times.json"
MAX_REGENERATIONS = 3
"""A shard that fails verification again after this many rewrites stops the run (the storage is failing)."""


class RunError(RuntimeError):
    """The run cannot continue as asked (wrong directory, unfinished prerequisites); the message says why."""


def log(message: str) -> None:
    print(f"[linearize {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# plan


def plan_run(config: RunConfig, shard_bytes: int | None = None) -> dict:
    """The planner for this run: its JSON (pipeline.planner.plan_to_dict) with k chosen by the cost model when
    transfer.layers_per_block is 'auto' (else the configured k and its candidate's numbers), plus 'k_source',
    'hardware_preset' and 'splits' ({split: {rows, shards}})."""
    from .planner import format_plan, hardware_names, load_hardware, lora_plan, plan, plan_to_dict, run_inputs

    transfer, cluster = config.transfer, config.cluster
    # The same inputs `linearize plan --check` re-plans a finished run with (kernel, accumulation, evaluations).
    workload, limits = run_inputs(config)
    if shard_bytes is not None:
        workload = dataclasses.replace(workload, shard_bytes=shard_bytes)
    # Time constants: a hardware preset named like the cluster if there is one (e.g. after
    # `linearize plan --calibrate --name local`), else the GPU machine's measured H100 values.
    preset = cluster.name if cluster.name in hardware_names() else "h100"
    hardware = load_hardware(preset)
    result = plan(config.model, workload, limits, hardware)
    # Stage 2 runs an hour later: say now if its ranks will not fit the GPUs as configured.
    stage2 = lora_plan(config.model, limits, hardware, config.data.seq_len, config.finetune.micro_batch_size)
    if not stage2["fits"]:
        log(f"warning: stage 2 is planned at {sum(stage2['memory'].values()) / 1e9:.1f} GB per rank even with "
            "gradient checkpointing, more than a GPU holds: use more GPUs or a shorter micro-batch")
    elif stage2["gradient_checkpointing"] and not config.finetune.gradient_checkpointing:
        log(f"warning: finetune.gradient_checkpointing is false, and stage 2 is planned at "
            f"{stage2['without_bytes'] / 1e9:.1f} GB per rank without it, more than a GPU holds: set "
            "finetune.gradient_checkpointing: true")
    k = transfer.layers_per_block
    if k == "auto":
        if result.chosen is None:
            raise RunError("the planner found no feasible k for this run:\n" + format_plan(result))
        source = "planner"
    else:
        candidate = result.candidates[k - 1]
        if candidate.status == "rejected":
            log(f"warning: transfer.layers_per_block={k} breaks the planner's limits: {'; '.join(candidate.reasons)}")
        result = dataclasses.replace(result, chosen=candidate)
        source = "config"
    out = plan_to_dict(result)
    rows_per_shard = out["shard_rows"]
    out["splits"] = {split: {"rows": rows, "shards": math.ceil(rows / rows_per_shard)}
                     for split, rows in split_rows(config).items()}
    out["k_source"] = source
    out["hardware_preset"] = preset
    return out


# --------------------------------------------------------------------------------------------------
# The driver


@dataclasses.dataclass
class Driver:
    run: RunDir
    config: RunConfig
    until: str | None = None
    shard_bytes: int | None = None
    faults: str | None = None
    timings: dict = dataclasses.field(default_factory=dict)

    # ---- plan -----------------------------------------------------------------------------------
    def plan(self) -> None:
        plan = plan_run(self.config, self.shard_bytes)
        self.run.write_json(RunDir.plan_json, plan)
        resolved = dataclasses.replace(self.config, transfer=dataclasses.replace(
            self.config.transfer, layers_per_block=plan["k"]))
        self.run.write_text(RunDir.run_yaml, run_config_to_yaml(resolved))
        self.config = resolved
        times = plan["predicted_times_s"]
        log(f"plan: k={plan['k']} ({plan['k_source']}), {plan['num_blocks']} block(s) {plan['blocks']}, "
            f"{plan['splits']['train']['rows']} train + {plan['splits']['validation']['rows']} validation rows in "
            f"shards of {plan['shard_rows']}; cache {plan['cache_bytes'] / 1e9:.3f} GB; predicted with "
            f"{plan['hardware_preset']} constants: collect {times['collect_s']:.1f} s, one block "
            f"{times['block_s']:.1f} s, wall {times['wall_s']:.1f} s")

    # ---- collect + transfer ---------------------------------------------------------------------
    def blocks(self) -> None:
        from cluster import blocks as ray_blocks
        from cluster.connect import cluster_resources, connect

        run, config = self.run, self.config
        ctx = load_context(run)
        num_blocks = len(ctx.blocks)
        caches = {split: BoundaryCache(run, split) for split in SPLITS}
        with_transfer = self.until != "collect"

        def complete(b: int) -> bool:
            return all(caches[split].is_complete(ctx.boundary_layer(b)) for split in SPLITS)

        def trained(b: int) -> bool:
            return run.exists(f"{run.block_dir(b)}/{RESULT}")

        if not complete(0):
            write_tokens(run, config)
        connect(config.cluster.address, num_cpus=config.cluster.num_cpus)
        spec = ray_blocks.worker_spec(max_parallel=num_blocks)
        log(f"workers: {'1 GPU' if spec.use_gpu else f'{spec.num_cpus} CPU(s)'} per task, {spec.threads} torch "
            f"thread(s), device {spec.device}")
        common = {"run_url": run.url, "device": spec.device, "threads": spec.threads, "faults": self.faults}
        running: dict = {}  # ObjectRef -> ("collect" | "transfer", index)
        regenerations: Counter = Counter()
        summary = {"collect": [], "transfer": []}
        started = time.perf_counter()
        collect_s = transfer_started = None
        if needs_kernel_warm_up(cluster_resources()["gpus"] if spec.use_gpu else 0, with_transfer,
                                [complete(b) for b in range(num_blocks)], [trained(b) for b in range(num_blocks)]):
            # Compile the kernels once into the node's cache while collect works, so blocks do not each compile
            # them side by side (warm_up_kernels says what that cost); blocks are submitted after it.
            running[ray_blocks.submit(warm_up_kernels, common, spec, name="warm-up", max_retries=0)] = ("warm_up", -1)
        try:
            while True:
                ready = [complete(b) for b in range(num_blocks)]
                busy = {(kind, b) for kind, b in running.values()}
                warming = ("warm_up", -1) in busy
                if all(ready) and not run.is_done("collect"):
                    collect_s = time.perf_counter() - started
                    run.mark("collect", "done")
                elif not all(ready) and run.is_done("collect"):
                    run.mark("collect", "running")  # a shard was found corrupt after collection had finished
                for b in range(num_blocks):
                    if not ready[b] and ("collect", b) not in busy and (b == 0 or ready[b - 1]):
                        ref = ray_blocks.submit(collect_boundary, {**common, "boundary": b}, spec,
                                                name=f"collect-L{ctx.boundary_layer(b):03d}")
                        running[ref] = ("collect", b)
                for b in range(num_blocks):
                    if with_transfer and ready[b] and ("transfer", b) not in busy and not trained(b) and not warming:
                        ref = ray_blocks.submit(transfer_block, {**common, "block": b}, spec, name=f"transfer-B{b:03d}")
                        running[ref] = ("transfer", b)
                        if transfer_started is None:
                            transfer_started = time.perf_counter()
                            run.mark("transfer", "running")
                if not running:
                    break
                for ref in ray_blocks.wait_any(list(running)):
                    kind, _ = running.pop(ref)
                    if kind == "warm_up":
                        summary["warm_up"] = self._warm_up_result(ref)
                        continue
                    out = ray_blocks.result(ref)
                    if out["status"] == "corrupt":
                        self._regenerate(out, caches, regenerations)
                        continue
                    summary[kind].append(out)
                    self._report(kind, out)
        except BaseException:
            ray_blocks.cancel(list(running))
            raise
        if not all(complete(b) for b in range(num_blocks)):
            raise RunError("collect finished its tasks but some boundaries are incomplete; resume the run")
        if with_transfer:
            unfinished = [b for b in range(num_blocks) if not trained(b)]
            if unfinished:
                raise RunError(f"blocks {unfinished} have no result.json after their tasks ended; resume the run")
            run.mark("transfer", "done")
        summary.update({"wall_s": time.perf_counter() - started, "collect_wall_s": collect_s,
                        "transfer_wall_s": (time.perf_counter() - transfer_started) if transfer_started else None,
                        "worker": dataclasses.asdict(spec)})
        self.timings["blocks"] = summary
        run.write_json("blocks/summary.json", summary)

    def _regenerate(self, out: dict, caches: dict, regenerations: Counter) -> None:
        split, layer, shard = out["split"], out["layer"], out["shard"]
        key = (split, layer, shard)
        regenerations[key] += 1
        if regenerations[key] > MAX_REGENERATIONS:
            raise CacheError(f"{out['reason']}; it was rewritten {MAX_REGENERATIONS} times and fails again: "
                             "check the storage of the run directory")
        if layer < 0:  # the token rows themselves
            log(f"token rows of split {split} are corrupt ({out['reason']}); rewriting them")
            write_tokens(self.run, self.config)
            return
        log(f"corrupt cache shard {shard} of layer {layer} ({split}): {out['reason']}; regenerating it")
        caches[split].invalidate(layer, [shard])

    @staticmethod
    def _warm_up_result(ref) -> dict:
        """The warm-up's result; its failure costs only the speed it was for, so it is logged, not raised."""
        from cluster import blocks as ray_blocks

        try:
            out = ray_blocks.result(ref)
        except Exception as error:  # RayTaskError or a crashed worker: the blocks compile for themselves
            log(f"kernel warm-up failed ({type(error).__name__}: {str(error).strip().splitlines()[-1]}); "
                "each block compiles its own kernels")
            return {"status": "failed", "error": f"{type(error).__name__}"}
        log(f"kernel warm-up (layer {out['layer']}, batch {out['batch_shapes']}): {out['seconds']:.1f} s, "
            f"{out['build_s']:.1f} s of it building the layer")
        return out

    @staticmethod
    def _report(kind: str, out: dict) -> None:
        if kind == "collect":
            rate = out["bytes_written"] / out["write_s"] / 1e9 if out["write_s"] else 0.0
            log(f"collect boundary {out['boundary']} (layer {out['layer']}): {out['shards_written']} shard(s) "
                f"written, {out['shards_skipped']} already there, {out['tokens']:,} tokens in {out['seconds']:.1f} s "
                f"(compute {out['compute_s']:.1f} s, write {rate:.2f} GB/s)")
            return
        if out.get("skipped"):
            log(f"transfer block {out['block']}: already done")
            return
        if not out["converted_layers"]:
            log(f"transfer block {out['block']}: no converted layers in {out['layers']}, nothing to train")
            return
        attempt = out["attempt"]
        speed = f"{attempt['tokens_per_s']:,.0f} tokens/s" if attempt["tokens_per_s"] else "no new steps"
        resumed = (f", resumed from micro-step {attempt['resumed_from_micro_step']}"
                   if attempt["resumed_from_micro_step"] else "")
        log(f"transfer block {out['block']} (layers {out['layers'][0]}-{out['layers'][1] - 1}): validation loss "
            f"{out['val_loss_before']:.4g} -> {out['best_val_loss']:.4g} (best at step {out['best_optimizer_step']} "
            f"of {out['optimizer_steps']}{', stopped early' if out['stopped_early'] else ''}), {speed}{resumed}")

    # ---- stitch ---------------------------------------------------------------------------------
    def stitch(self) -> None:
        meta = stitch(self.run)
        mse = self.run.read_json(TRANSFER_MSE_JSON)
        log(f"stitch: {len(meta['converted_layers'])} layers -> {self.run.url_of(STITCHED_WEIGHTS)}; per-layer MSE "
            f"{self.run.url_of(TRANSFER_MSE_PNG)}")
        for layer, before, after in zip(mse["layers"], mse["mse_before"], mse["mse_after"]):
            log(f"  layer {layer:3d}: MSE {before:.3e} -> {after:.3e}")


# --------------------------------------------------------------------------------------------------
# The order of the stages, written down once.

PIPELINE: list[tuple[str, Callable[[Driver], None]]] = [
    ("plan", Driver.plan),
    ("collect", Driver.blocks),   # also runs transfer: a block starts as soon as its boundary is complete
    ("transfer", Driver.blocks),  # skipped when the step above finished every block
    ("stitch", Driver.stitch),
]

# Later stages, each (stage, module, function taking the run directory URL). An entry joins the pipeline when
# its module exists and defines the function; until then `linearize run` ends after the stages above.
LATER_STAGES: list[tuple[str, str, str]] = [
    ("finetune", "pipeline.finetune", "run_finetune"),
    ("export", "pipeline.export", "export_run"),
    ("eval", "pipeline.evaluate", "evaluate_run"),
]


def needs_kernel_warm_up(gpus: int, with_transfer: bool, ready: list[bool], trained: list[bool]) -> bool:
    """Whether stage 1 first compiles its kernels in one task: on two or more GPUs (Triton JIT; the CPU path
    compiles nothing, and on one GPU the blocks run one after another, so only the first compiles), with at least
    two blocks left to train, and only while collect still has boundaries to make, so the warm-up overlaps work
    the blocks wait for anyway. A run resumed after collect (all its blocks ready at once) skips it: there it
    would only delay the blocks."""
    return gpus >= 2 and with_transfer and not all(ready) and sum(not done for done in trained) >= 2


def pipeline_stages() -> list[tuple[str, Callable[[Driver], None]]]:
    """PIPELINE plus the later stages whose modules are present."""
    stages = list(PIPELINE)
    for stage, module_name, function_name in LATER_STAGES:
        if importlib.util.find_spec(module_name) is None:
            continue
        function = getattr(importlib.import_module(module_name), function_name, None)
        if function is None:
            continue
        stages.append((stage, lambda driver, function=function: function(driver.run.url)))
    return stages


def execute(driver: Driver) -> RunDir:
    """Run the stages in order, skipping those state.json marks done; stop after `driver.until`."""
    run = driver.run
    stages = pipeline_stages()
    names = [name for name, _ in stages]
    if driver.until is not None and driver.until not in names:
        raise RunError(f"until: {driver.until!r} is not a stage of this pipeline; choose from {names}")
    log(f"run directory {run.url}: stages {' -> '.join(names)}")
    done_before = {name for name in names if run.is_done(name)}
    for name, step in stages:
        if run.is_done(name):  # by an earlier attempt, or just now by a stage that does its work too (collect)
            log(f"{name}: done already" if name in done_before else f"{name}: done by the stage before it")
        else:
            run.mark(name, "running")
            started = time.perf_counter()
            step(driver)
            run.mark(name, "done")
            driver.timings[f"{name}_s"] = time.perf_counter() - started
            # Wall seconds of the attempt that finished each stage (a resumed stage counts its last attempt).
            stage_times = run.read_json(STAGE_TIMES_JSON, default={})
            run.write_json(STAGE_TIMES_JSON, {**stage_times, name: round(driver.timings[f"{name}_s"], 3)})
        if name == driver.until:
            break
    return run


def _with_block_size_of(config: RunConfig, existing: RunConfig) -> RunConfig:
    """`config` with k 'auto' replaced by the k the plan of `existing` chose (a number stays as it is)."""
    if config.transfer.layers_per_block != "auto":
        return config
    return dataclasses.replace(config, transfer=dataclasses.replace(
        config.transfer, layers_per_block=existing.transfer.layers_per_block))


def _same_run(existing: RunConfig, new: RunConfig) -> bool:
    """Whether a config describes the run already in a directory (k 'auto' matches the k the plan chose)."""
    new = _with_block_size_of(new, existing)
    return dataclasses.replace(existing, run_dir=None).to_dict() == dataclasses.replace(new, run_dir=None).to_dict()


STAGE1_FIELDS = ("model", "attention", "data", "transfer", "seed")
"""What decides the stitched stage-1 state: a run may start from another's when these are equal."""
STAGE1_FILES = (RunDir.plan_json, STITCHED_WEIGHTS, STITCHED_META, TRANSFER_MSE_JSON, TRANSFER_MSE_PNG)
STAGE1_SOURCE_JSON = "stage1_source.json"


def start_from_stage1_of(run: RunDir, config: RunConfig, source_url: str) -> RunConfig:
    """Begin a new run in `run` at stage 2, with the stitched stage-1 state of the run in `source_url`: an A/B of
    stage 2 (objective, budget, LoRA) without training stage 1 again. The two configs must agree on everything
    stage 1 depends on (STAGE1_FIELDS; the cluster, finetune, export and eval sections may differ). Copies the
    plan and stitched/ files, marks plan to stitch done, and records the source in stage1_source.json.
    Returns `config` with the source's resolved block size."""
    source = RunDir(source_url)
    if not source.exists(RunDir.run_yaml) or not source.is_done("stitch"):
        raise RunError(f"--stage1-from {source.url}: not a run whose stitch stage is done; run it with "
                       f"`linearize run CONFIG --run-dir {source.url} --until stitch` first")
    theirs = read_run_config(source)
    config = _with_block_size_of(config, theirs)
    ours_dict, theirs_dict = config.to_dict(), theirs.to_dict()
    differing = [key for key in STAGE1_FIELDS if ours_dict[key] != theirs_dict[key]]
    if differing:
        raise RunError(f"--stage1-from {source.url}: its {', '.join(differing)} differ from this config's, so its "
                       f"stage 1 is not this run's; make them equal (only cluster, finetune, export and eval may "
                       f"differ) or run stage 1 here")
    run.makedirs()
    for rel in STAGE1_FILES:
        if source.exists(rel):
            run.write_bytes(rel, source.read_bytes(rel))
    run.write_text(RunDir.run_yaml, run_config_to_yaml(config))
    run.write_json(STAGE1_SOURCE_JSON, {"source": source.url, "files": [r for r in STAGE1_FILES if run.exists(r)]})
    for stage in ("plan", "collect", "transfer", "stitch"):
        run.mark(stage, "done")
    log(f"stage 1 from {source.url}: plan and stitched state copied; continuing at stage 2")
    return config


def default_run_dir(config: RunConfig, config_path: str | Path | None = None) -> str:
    if config.run_dir:
        return config.run_dir
    name = Path(config_path).stem if config_path else config.model.name
    return os.path.join(DEFAULT_RUNS_DIR, name)


def run_pipeline(config: RunConfig | str | Path, run_dir: str | None = None, *, until: str | None = None,
                 shard_bytes: int | None = None, faults: str | None = None, stage1_from: str | None = None) -> RunDir:
    """Start (or continue) a run of `config` (a RunConfig or a YAML path) in `run_dir` (default: the config's
    run_dir, else runs/<config name>). A directory holding another run's run.yaml is refused. A new run with
    `stage1_from` (a run directory) starts at stage 2 from that run's stitched state (start_from_stage1_of).
    `faults` (tests only) defaults to $LINEARIZE_FAULT."""
    config_path = None
    if not isinstance(config, RunConfig):
        config_path, config = config, load_run_config(config)
    run = RunDir(run_dir or default_run_dir(config, config_path))
    config = dataclasses.replace(config, run_dir=run.url)
    if run.exists(RunDir.run_yaml):
        existing = read_run_config(run)
        if not _same_run(existing, config):
            raise RunError(f"{run.url} already holds a different run (its run.yaml differs from this config); "
                           f"continue it with `linearize resume {run.url}` or choose another --run-dir")
        config = existing
        log(f"{run.url} holds this run already: continuing it")
    elif stage1_from is not None:
        config = start_from_stage1_of(run, config, stage1_from)
    else:
        run.makedirs()
        run.write_text(RunDir.run_yaml, run_config_to_yaml(config))
    parse_faults(faults if faults is not None else os.environ.get(FAULT_ENV))  # reject a bad spec early
    driver = Driver(run, config, until=until, shard_bytes=shard_bytes,
                    faults=faults if faults is not None else os.environ.get(FAULT_ENV))
    return execute(driver)


def resume(run_dir: str, *, until: str | None = None, faults: str | None = None) -> RunDir:
    """Continue the run in `run_dir` from whatever it holds."""
    run = RunDir(run_dir)
    if not run.exists(RunDir.run_yaml):
        raise RunError(f"{run.url_of(RunDir.run_yaml)} does not exist: nothing to resume; start a run with "
                       f"`linearize run CONFIG --run-dir {run.url}`")
    config = read_run_config(run)
    faults = faults if faults is not None else os.environ.get(FAULT_ENV)
    parse_faults(faults)
    return execute(Driver(run, config, until=until, faults=faults))


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    stages = [name for name, _ in PIPELINE] + [stage for stage, _, _ in LATER_STAGES]
    if command == "resume":
        parser.add_argument("run", help="run directory (path or fsspec URL) holding run.yaml")
    else:
        parser.add_argument("config", help="run config YAML (e.g. configs/runs/smollm2-smoke.yaml)")
        parser.add_argument("--run-dir", help="run directory, a path or fsspec URL (default: the config's run_dir, "
                                              f"else {DEFAULT_RUNS_DIR}/<config name>)")
        parser.add_argument("--shard-size", help="target size of one cache shard, e.g. 512MB (default: the "
                                                 "planner's 512MB)")
        parser.add_argument("--stage1-from", metavar="RUN", help="start a new run at stage 2 from RUN's stitched "
                                                                 "stage-1 state (same model, attention, data, "
                                                                 "transfer and seed; e.g. to compare stage-2 recipes)")
    parser.add_argument("--until", choices=stages, help="stop after this stage")
    parser.set_defaults(_command=command)


def main(args: argparse.Namespace) -> int:
    from cluster.connect import disconnect

    started = time.perf_counter()
    try:
        if args._command == "resume":
            run = resume(args.run, until=args.until)
        else:
            shard_bytes = parse_bytes(args.shard_size, "--shard-size") if args.shard_size else None
            run = run_pipeline(args.config, args.run_dir, until=args.until, shard_bytes=shard_bytes,
                               stage1_from=args.stage1_from)
    except (ConfigError, RunError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        disconnect()
    state = run.state()
    done = [name for name, status in state.items() if status == "done"]
    log(f"finished in {time.perf_counter() - started:.1f} s; done: {', '.join(done)}; results in {run.url}")
    if run.exists(STITCHED_META):
        log(f"stitched model: {run.url_of(STITCHED_WEIGHTS)} (+ stitched.json)")
    return 0


if __name__ == "__main__":
    # `python -m pipeline.run run CONFIG ...` / `python -m pipeline.run resume RUN ...`: the same as the
    # `linearize run|resume` commands, with the environment pipeline/cli.py sets.
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "resume"):
        sys.exit("usage: python -m pipeline.run {run CONFIG [--run-dir URL] | resume RUN} [--until STAGE]")
    for _key, _value in (("HF_HUB_OFFLINE", "1"), ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
                         ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(_key, _value)
    _parser = argparse.ArgumentParser(prog=f"linearize {sys.argv[1]}")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args(sys.argv[2:])))
