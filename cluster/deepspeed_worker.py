"""DeepSpeed inside Ray: a group of actors, one per GPU (or CPU worker), that form one torch.distributed job.

Owns only the glue (cluster/connect.py connects to Ray): placing the actors, giving each the environment DeepSpeed reads
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, DS_ACCELERATOR), initializing the process group
once per actor (gloo on CPU, NCCL on GPU), running a caller's function on every rank, and turning the death
of any rank into one exception after killing the others (a rank blocked in a collective would otherwise
wait for the gloo/NCCL timeout). What the function does (training, checkpoints) is the caller's business.

A group keeps its actors, so several runs can share one set of processes (torch, transformers and
DeepSpeed are imported once per actor); its world size is fixed at creation.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

import ray

CPU_ENV = {"DS_ACCELERATOR": "cpu"}


class WorkerGroupError(RuntimeError):
    """A rank of the group died or raised; the whole group has been shut down."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class DeepSpeedWorker:
    """One rank. Created through DeepSpeedWorkerGroup (as a Ray actor), not directly."""

    def __init__(self, rank: int, world_size: int, use_gpu: bool, extra_env: dict[str, str] | None = None):
        self.rank, self.world_size, self.use_gpu = rank, world_size, use_gpu
        os.environ.update(extra_env or {})
        if not use_gpu:
            os.environ.update(CPU_ENV)
        # Ray gives each GPU actor exactly one visible device, so the local rank is always 0.
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)})
        self.initialized = False

    def address(self) -> tuple[str, int]:
        """(IP, free port) of this actor's node, for rank 0 to host the rendezvous."""
        return ray.util.get_node_ip_address(), _free_port()

    def pid(self) -> int:
        return os.getpid()

    def _init_distributed(self, master_addr: str, master_port: int) -> None:
        os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        import torch
        if not self.use_gpu:
            # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch must follow it or the ranks oversubscribe.
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
            # The shm all-reduce op is JIT-compiled (30-50 s) on first init and gloo training never uses it.
            # deepspeed.comm re-exports `torch`, so patch the module object through sys.modules.
            import deepspeed.comm.torch  # noqa: F401
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if self.use_gpu else "gloo", auto_mpi_discovery=False)
        self.initialized = True

    def run(self, master_addr: str, master_port: int, fn: Callable, args: tuple, kwargs: dict) -> Any:
        if not self.initialized:
            self._init_distributed(master_addr, master_port)
        return fn(*args, **kwargs)


class DeepSpeedWorkerGroup:
    """`world_size` Ray actors forming one DeepSpeed job; `run(fn, ...)` calls fn on every rank.

    Args:
        world_size: number of ranks (one GPU each when use_gpu).
        use_gpu: NCCL on one GPU per actor; otherwise gloo on CPU workers.
        cpus_per_worker: Ray CPUs reserved per actor (also its torch thread count on CPU).
        env: extra environment variables for the actors (e.g. PYTHONPATH so they import the caller's code).
    """

    def __init__(self, world_size: int, use_gpu: bool = False, cpus_per_worker: float = 1,
                 env: dict[str, str] | None = None, placement_timeout_s: float = 300):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected a positive number of workers, got {world_size!r}")
        if not ray.is_initialized():
            raise RuntimeError("Ray is not connected; call cluster.connect.connect() first")
        self.world_size, self.use_gpu, self.cpus_per_worker = world_size, use_gpu, cpus_per_worker
        self.env, self.placement_timeout_s = dict(env or {}), placement_timeout_s
        actor_cls = ray.remote(DeepSpeedWorker)
        options = {"num_gpus": 1 if use_gpu else 0, "num_cpus": cpus_per_worker, "max_restarts": 0,
                   "runtime_env": {"env_vars": self.env}}
        self.actors = [actor_cls.options(**options).remote(rank, world_size, use_gpu, self.env)
                       for rank in range(world_size)]
        self.alive = True
        # Every rank must be placed before any joins the rendezvous, or the placed ones wait for the
        # torch.distributed timeout (30 min) for a rank the cluster has no room for.
        try:
            ray.get([actor.pid.remote() for actor in self.actors], timeout=placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise WorkerGroupError(
                f"could not place {world_size} workers ({'1 GPU' if use_gpu else f'{cpus_per_worker} CPU'} each) "
                f"within {placement_timeout_s:.0f} s; the cluster has {ray.available_resources()} free: use fewer "
                "workers or free the resources") from None
        self.master_addr, self.master_port = ray.get(self.actors[0].address.remote())

    def respawn(self) -> "DeepSpeedWorkerGroup":
        """A new group with the same size and settings (after this one failed)."""
        return DeepSpeedWorkerGroup(self.world_size, self.use_gpu, self.cpus_per_worker, self.env,
                                    self.placement_timeout_s)

    def pids(self) -> list[int]:
        return ray.get([actor.pid.remote() for actor in self.actors])

    def run(self, fn: Callable, *args, **kwargs) -> list[Any]:
        """fn(*args, **kwargs) on every rank at once; the results by rank.

        If any rank dies or raises, every actor is killed and WorkerGroupError is raised (chained to the
        first failure); the group is then unusable and the caller makes a new one.
        """
        if not self.alive:
            raise WorkerGroupError("this worker group was shut down after a failure; create a new one")
        pending = {actor.run.remote(self.master_addr, self.master_port, fn, args, kwargs): rank
                   for rank, actor in enumerate(self.actors)}
        results: dict[int, Any] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except Exception as error:  # RayActorError (process died) or the function's own exception
                self.shutdown()
                # A RayTaskError's text is the remote traceback: keep its end, where the cause is.
                detail = "\n".join(str(error).strip().splitlines()[-12:])
                raise WorkerGroupError(f"rank {rank} of {self.world_size} failed: {type(error).__name__}: "
                                       f"{detail}") from error
        return [results[rank] for rank in range(self.world_size)]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.alive = False
