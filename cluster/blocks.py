"""Ray glue for the block-wise stages (collect, transfer): one Ray task per unit of work, on one GPU when the
cluster has GPUs and on CPU workers otherwise, retried when its worker dies.

What a task does is the caller's business (pipeline/stages.py: plain functions that read and write the run
directory and resume from it); this module only places and runs them:

* resources: `worker_spec(max_parallel)` looks at the connected cluster: with GPUs every task takes
  num_gpus=1 (Ray sets CUDA_VISIBLE_DEVICES, so the task uses "cuda"); without, each task takes an equal
  share of the CPUs for at most `max_parallel` tasks at once, and uses that many torch threads. The
  share depends only on the cluster's size and the plan, so a resumed run computes with the same
  thread count (CPU results are bitwise reproducible only at a fixed thread count).
* placement: GPU tasks are spread over nodes (each streams its own boundary from storage, so spreading
  spreads host RAM and network load); CPU tasks use Ray's default placement.
* retries: a task whose worker process dies (OOM kill, node loss, os._exit) is retried up to max_retries
  times by Ray, and the stage function resumes from what the run directory holds. A Python exception is
  not retried: it is a bug or bad input, and the driver reports it.
* progress: the task's `progress` argument is Ray's tqdm (ray.experimental.tqdm_ray), whose bars the
  driver draws, one per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import ray

from .connect import cluster_resources

DEFAULT_MAX_RETRIES = 3


@dataclass(frozen=True)
class WorkerSpec:
    """Resources of one block task."""

    use_gpu: bool
    num_cpus: int
    threads: int
    """torch threads inside the task (CPU work: the task's CPU share)."""

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"


def worker_spec(max_parallel: int) -> WorkerSpec:
    """Resources per task for at most `max_parallel` tasks at once on the connected cluster."""
    if not isinstance(max_parallel, int) or max_parallel < 1:
        raise ValueError(f"max_parallel: expected a positive number of tasks, got {max_parallel!r}")
    resources = cluster_resources()
    cpus, gpus = max(resources["cpus"], 1), resources["gpus"]
    if gpus > 0:
        return WorkerSpec(use_gpu=True, num_cpus=1, threads=max(1, min(8, cpus // gpus)))
    share = max(1, cpus // min(max_parallel, cpus))
    return WorkerSpec(use_gpu=False, num_cpus=share, threads=share)


def _block_work(fn: Callable[..., Any], kwargs: dict) -> Any:
    from ray.experimental.tqdm_ray import tqdm

    return fn(**kwargs, progress=tqdm)


_run_block_work = ray.remote(_block_work)
# GPU tasks get a fresh worker process each: a reused worker keeps its CUDA context and torch's cached blocks
# (48 GB per GPU after a 70B block), which stage 2 then runs out of memory beside. Ray makes GPU functions
# single-use only when the decorator names num_gpus, not when .options() does, so say it here.
_run_block_work_gpu = ray.remote(max_calls=1)(_block_work)


def submit(fn: Callable[..., Any], kwargs: dict, spec: WorkerSpec, name: str,
           max_retries: int = DEFAULT_MAX_RETRIES) -> ray.ObjectRef:
    """Run fn(**kwargs, progress=<Ray tqdm>) as a Ray task with `spec`'s resources; returns its ObjectRef.
    `fn` must be importable by the workers (a module-level function of an installed package)."""
    options: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": 1 if spec.use_gpu else 0,
                               "max_retries": max_retries, "retry_exceptions": False, "name": name}
    if spec.use_gpu:
        options["scheduling_strategy"] = "SPREAD"
    remote = _run_block_work_gpu if spec.use_gpu else _run_block_work
    return remote.options(**options).remote(fn, kwargs)


def wait_any(refs: list[ray.ObjectRef], timeout: float | None = None) -> list[ray.ObjectRef]:
    """The refs of `refs` that have finished (at least one, unless `timeout` seconds pass first)."""
    if not refs:
        return []
    ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
    return ready


def result(ref: ray.ObjectRef) -> Any:
    """The task's return value; raises the task's exception (ray.exceptions.RayTaskError, WorkerCrashedError
    after the retries are spent)."""
    return ray.get(ref)


def cancel(refs: list[ray.ObjectRef]) -> None:
    """Stop tasks that are no longer wanted (after another task failed)."""
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # already finished or already gone: nothing to stop
            pass
