"""cluster/blocks.py: GPU block tasks run in a fresh worker process each (a reused worker keeps its CUDA memory)."""

import os

import pytest
import ray

from cluster.blocks import WorkerSpec, submit


@pytest.fixture(scope="module")
def ray_with_a_logical_gpu():
    # num_gpus=1 is only a scheduling resource here: the tasks never touch CUDA.
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_gpu_tasks_never_share_a_worker_process(ray_with_a_logical_gpu):
    spec = WorkerSpec(use_gpu=True, num_cpus=1, threads=1)
    worker_pid = lambda progress=None: os.getpid()  # noqa: E731 (a lambda is pickled by value for the workers)
    pids = [ray.get(submit(worker_pid, {}, spec, name=f"gpu-task-{i}")) for i in range(3)]
    assert len(set(pids)) == 3, f"GPU tasks reused a worker process: pids {pids}"
    assert os.getpid() not in pids
