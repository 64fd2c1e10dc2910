"""`linearize submit / status / logs` against a real Ray head on 127.0.0.1: the tiny block-wise run is submitted
as a Ray Job (working_dir = this repository), followed to SUCCEEDED, and its run directory checked. The head
runs in its own process group and is stopped by killing that group (never `ray stop`, which kills every Ray
process on the machine)."""

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from pipeline import jobs
from pipeline.rundir import RunDir
from tests.conftest import TINY_RUN

pytestmark = pytest.mark.slow  # ~40-70 s on the 2-core CI machine; part of the default run all the same

REPO = Path(__file__).resolve().parents[2]
# Fewer training rows than the pipeline tests: the job only has to finish.
TINY = {**TINY_RUN, "transfer": {**TINY_RUN["transfer"], "train_tokens": 16 * 32}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(command: str, argv: list[str]) -> tuple[int, str]:
    """Run `linearize COMMAND ARGV` in this process (the parser is built as pipeline/cli.py builds it)."""
    parser = argparse.ArgumentParser(prog=f"linearize {command}")
    jobs.add_arguments(parser)
    out = io.StringIO()
    with redirect_stdout(out):
        code = jobs.main(parser.parse_args(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on loopback as a child in its own session; yields the dashboard address."""
    port, dashboard = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         "--disable-usage-stats", "--num-cpus=2", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert head.poll() is None, f"ray start exited with {head.returncode}; see {log.name}"
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # it answers (401 without the auth token): it is up
                break
            except OSError:
                assert time.monotonic() < deadline, f"the head's job server did not answer within 90 s; see {log.name}"
                time.sleep(0.5)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        log.close()
        deadline = time.monotonic() + 30
        while session_pids(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert session_pids(head.pid) == [], "processes of the Ray head survived the kill of its process group"


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is `sid` (the head's children: gcs, raylet, dashboard, workers)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def test_submit_follow_status_and_logs(ray_head, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / "run"
    code, out = cli("submit", [str(config), "--address", ray_head, "--run-dir", str(run_dir), "--until", "stitch",
                               "--shard-size", "32KiB", "--python", sys.executable, "--job-id", "linearize-test-1"])
    assert code == 0 and "submitted job linearize-test-1" in out, out
    code, out = cli("logs", ["linearize-test-1", "--address", ray_head, "--follow"])
    assert code == 0 and "job linearize-test-1: SUCCEEDED" in out and "stitch: 4 layers" in out, out
    code, out = cli("status", ["linearize-test-1", "--address", ray_head])
    assert code == 0 and "SUCCEEDED" in out and str(run_dir) in out
    run = RunDir(str(run_dir))
    assert run.is_done("stitch") and run.exists("stitched/hybrid.safetensors")
    assert run.read_json("plan.json")["blocks"] == [[0, 2], [2, 4]]
    assert [run.read_json(f"blocks/B{b:03d}/result.json")["optimizer_steps"] for b in (0, 1)] == [4, 4]


def test_submit_rejects_a_bad_config_before_submitting(ray_head, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY, "transfer": {**TINY["transfer"], "lr": -1}}))
    parser = argparse.ArgumentParser(prog="linearize submit")
    jobs.add_arguments(parser)
    assert jobs.main(parser.parse_args([str(config), "--address", ray_head])) == 2
