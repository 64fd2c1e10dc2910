"""DeepSpeed worker groups get their share of the CPUs as torch threads: a rank builds its model partitions on
the CPU (random weights, one generator per torch thread), and a group left at one thread per rank took 215 s to
build Llama 3.1 70B on 4 x H200 (docs/results.md, section 8, session 6)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from cluster.deepspeed_worker import DeepSpeedWorkerGroup, cpu_share, rank_cpu_share  # noqa: E402


@pytest.mark.parametrize("world_size, use_gpu, cpus, gpus, free, expected", [
    (4, True, 64, 4, 64, 16),    # the 4 x H200 machine: a GPU's share
    (2, True, 64, 4, 64, 16),    # fewer ranks than GPUs: still one GPU's share, not half the host
    (8, True, 64, 4, 64, 8),     # more ranks than GPUs (several machines' worth of ranks): split by ranks
    (4, True, 64, 4, 20, 5),     # other work holds CPUs: the free ones decide, so the group can be placed
    (1, False, 2, 0, 2, 2),      # the CPU machine's single stage-2 worker: both cores
    (2, False, 2, 0, 1.5, 1),    # never below one
])
def test_cpu_share(world_size, use_gpu, cpus, gpus, free, expected):
    assert cpu_share(world_size, use_gpu, cpus, gpus, free) == expected


def test_group_ranks_run_with_their_share_of_threads(ray_local):
    import torch

    share = rank_cpu_share(1, use_gpu=False)
    assert share == 2  # the module's Ray instance has 2 CPUs and nothing else holds them
    group = DeepSpeedWorkerGroup(1)
    try:
        assert group.cpus_per_worker == share
        assert group.run(torch.get_num_threads) == [share]
    finally:
        group.shutdown()
    explicit = DeepSpeedWorkerGroup(1, cpus_per_worker=0.5)  # a fraction of a CPU still gets one thread
    try:
        assert explicit.run(torch.get_num_threads) == [1]
    finally:
        explicit.shutdown()
