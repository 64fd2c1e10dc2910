"""Faults injected on CPU end with the same stitched model, bitwise, as an undisturbed run, without redoing work
already done: workers killed mid-collect and mid-transfer (Ray retries them), the driver SIGKILLed after the
first block checkpoint (then `resume`), and a corrupt cache shard (detected, regenerated)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load as load_safetensors_bytes

from pipeline.cache import BoundaryCache
from pipeline.rundir import RunDir
from pipeline.run import resume, run_pipeline
from pipeline.stages import STITCHED_WEIGHTS

REPO = Path(__file__).resolve().parents[2]
from tests.conftest import TINY_RUN as TINY  # noqa: E402

SHARD_BYTES = 32 * 1024  # 8 rows per shard: 6 train shards + 1 validation shard per boundary



@pytest.fixture(scope="module")
def reference(ray_local, tiny_config, tmp_path_factory):
    return run_pipeline(tiny_config, str(tmp_path_factory.mktemp("runs") / "reference"), until="stitch",
                        shard_bytes=SHARD_BYTES, faults="")


def assert_same_result(run: RunDir, reference: RunDir) -> None:
    """Bitwise the same stitched φ, γ (the safetensors bytes), and the same metric lines (they hold no timings)."""
    want = load_safetensors_bytes(reference.read_bytes(STITCHED_WEIGHTS))
    assert sorted(load_safetensors_bytes(run.read_bytes(STITCHED_WEIGHTS))) == sorted(want) and len(want) == 12
    assert run.read_bytes(STITCHED_WEIGHTS) == reference.read_bytes(STITCHED_WEIGHTS)
    for block in (0, 1):
        metrics = f"blocks/B{block:03d}/metrics.jsonl"
        assert run.read_text(metrics) == reference.read_text(metrics), metrics


def shard_stats(run: RunDir) -> dict:
    """(inode, mtime) of every cache shard: unchanged means not rewritten."""
    out = {}
    for split in ("train", "validation"):
        cache = BoundaryCache(run, split)
        for layer in cache.layers():
            for key in cache.index(layer)["shards"]:
                path = cache.shard_path(layer, int(key))
                stat = os.stat(path)
                out[path] = (stat.st_ino, stat.st_mtime_ns)
    return out


def test_killed_workers_are_retried_and_resume(reference, tiny_config, tmp_path):
    """Collect of boundary 1 dies after its 3rd shard; transfer of block 0 dies after micro-step 7 (its last
    checkpoint is at micro-step 4). Ray retries both; they continue from what is on disk."""
    faults = "collect:block=1:exit_after=3;transfer:block=0:exit_after=7"
    run = run_pipeline(tiny_config, str(tmp_path / "run"), until="stitch", shard_bytes=SHARD_BYTES, faults=faults)
    assert run.exists("faults/collect-B001-3.fired") and run.exists("faults/transfer-B000-7.fired")
    summary = run.read_json("blocks/summary.json")
    collect = {c["boundary"]: c for c in summary["collect"]}
    assert (collect[1]["shards_skipped"], collect[1]["shards_written"]) == (3, 4)
    transfer = {t["block"]: t for t in summary["transfer"]}
    assert transfer[0]["attempt"]["resumed_from_micro_step"] == 4
    assert transfer[1]["attempt"]["resumed_from_micro_step"] == 0
    assert_same_result(run, reference)


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: session id
                pids.append(int(entry))
    return pids


def test_driver_killed_then_resumed(reference, tiny_config, tmp_path):
    """`linearize run` as a process (with its own Ray instance), SIGKILLed with everything it started while a
    block is between its first checkpoint and its end; `resume` then finishes from that checkpoint without
    rewriting any cache shard."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "LINEARIZE_FAULT": "transfer:delay=0.2"}  # slow steps: the kill lands mid-transfer
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", "run", str(tiny_config), "--run-dir",
                               str(run_dir), "--shard-size", f"{SHARD_BYTES}B", "--until", "stitch"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)

    def mid_transfer() -> list[int]:
        return [b for b in (0, 1) if (run_dir / f"blocks/B{b:03d}/checkpoint.pt").exists()
                and not (run_dir / f"blocks/B{b:03d}/result.json").exists()]

    deadline = time.monotonic() + 120
    try:
        while not mid_transfer():
            assert driver.poll() is None, "the driver ended before it was killed"
            assert time.monotonic() < deadline, "no block checkpoint within 120 s"
            time.sleep(0.02)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while _session_pids(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert _session_pids(driver.pid) == [], "processes of the killed driver's Ray instance survived"
    interrupted = mid_transfer()
    assert interrupted
    run = RunDir(str(run_dir))
    assert run.status("transfer") == "running" and not run.exists(STITCHED_WEIGHTS)
    before = shard_stats(run)
    resume(str(run_dir), until="stitch", faults="")
    after = shard_stats(run)
    assert {path: after[path] for path in before} == before  # no completed shard was rewritten
    assert_same_result(run, reference)
    transfer = {t["block"]: t for t in run.read_json("blocks/summary.json")["transfer"]}
    for block in interrupted:  # continued from its checkpoint, not from the start
        assert transfer[block]["attempt"]["resumed_from_micro_step"] > 0


def test_corrupt_shard_is_detected_and_regenerated(reference, tmp_path, capsys):
    """A flipped byte in a finished boundary: block 1's transfer finds it, the driver rewrites that shard from
    boundary 0 and reruns the block; same result."""
    run = RunDir(str(tmp_path / "run"))
    shutil.copytree(reference.root, run.root)
    shard = BoundaryCache(run, "train").shard_path(2, 3)
    data = bytearray(Path(shard).read_bytes())
    data[-10] ^= 0x01
    Path(shard).write_bytes(bytes(data))
    for rel in ("blocks/B001", "stitched", "eval"):
        run.remove(rel, recursive=True)
    for stage in ("transfer", "stitch"):
        run.mark(stage, "pending")
    resume(run.url, until="stitch", faults="")
    assert "corrupt cache shard 3 of layer 2 (train)" in capsys.readouterr().out
    assert Path(shard).read_bytes() == Path(BoundaryCache(reference, "train").shard_path(2, 3)).read_bytes()
    assert_same_result(run, reference)
