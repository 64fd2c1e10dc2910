"""Connecting the driver to Ray: a private local instance, a cluster address, or the cluster of a Ray Job.

Rules (reference/stack.md §5):
* Already connected (a test fixture, or the finetune stage's glue did it): keep that connection.
* Inside a Ray Job, or whenever RAY_ADDRESS is set, join that cluster whatever the config says: the job's
  driver must use the cluster it was submitted to, never start a second one beside it.
* address 'local': start a private instance with this machine's CPUs (and GPUs), always with
  address="local" so that a stale cluster recorded in Ray's temp directory is never joined.
* anything else ('auto', 'ray://head:10001', '10.0.0.1:6379'): join it.
Ray must bind to loopback on a machine without a cluster network, so RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is
set before ray starts (without it Ray advertises the machine's external IP even for a local instance).
"""

from __future__ import annotations

import os

import ray

_started_here = False


def connect(address: str = "local", num_cpus: int | None = None, num_gpus: int | None = None,
            log_to_driver: bool = True) -> bool:
    """Connect this process to Ray; returns True if this call connected (False if it already was)."""
    global _started_here
    if ray.is_initialized():
        return False
    if not isinstance(address, str) or not address:
        raise ValueError(f"address: expected 'local', 'auto' or a Ray address such as 'ray://head:10001', "
                         f"got {address!r}")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)  # the Ray Job's (or the user's) cluster
    elif address == "local":
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=log_to_driver)
    else:
        ray.init(address=address, log_to_driver=log_to_driver)
    _started_here = True
    return True


def disconnect() -> None:
    """Shut down the connection made by connect() (and the local instance it started); no-op otherwise."""
    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def cluster_resources() -> dict:
    """{'cpus': total CPUs, 'gpus': total GPUs, 'nodes': alive nodes} of the connected cluster."""
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"cpus": int(resources.get("CPU", 0)), "gpus": int(resources.get("GPU", 0)), "nodes": len(nodes)}
