"""Ray Jobs: `linearize submit CONFIG --address http://HEAD:8265`, `linearize status JOB`, `linearize logs JOB`.

`submit` validates and resolves the config on this machine, then submits the driver (pipeline/run.py) as a Ray
Job whose runtime environment's working_dir is this repository (uploaded by Ray, without .venv, .git, runs/
and caches), so the cluster runs exactly this code. The resolved config travels in the job's environment
(LINEARIZE_RUN_CONFIG), so the config file may live anywhere on this machine; the job's entrypoint is
`python -m pipeline.jobs RUN_DIR`, which joins the job's cluster (RAY_ADDRESS, set by Ray) and runs the
stages. The run directory must be reachable from the cluster: an fsspec URL (s3://...) or a path on storage
the nodes share; a relative path is made absolute here. A job that dies is continued with another submit of
the same config and run directory (or `linearize resume RUN` on the head).

Authentication: Ray 2.60 clusters use token authentication by default (the token is in ~/.ray/auth_token of
the machine that started the head, or $RAY_AUTH_TOKEN); the Jobs client needs RAY_AUTH_MODE=token, which this
module sets unless the environment says otherwise (reference/stack.md §5).

The CLI registers this module three times (cli.COMMANDS "submit", "status", "logs"); add_arguments tells them
apart by the parser's prog ("linearize submit", ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

from .config import ConfigError, load_run_config, parse_bytes, resolve_run_config, run_config_to_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = "LINEARIZE_RUN_CONFIG"
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", ".device", ".devstage", ".cache", ".pytest_cache",
                        "**/__pycache__", "*.egg-info", "build"]
AGENT_WAIT_S = 60.0
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _client(address: str | None):
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when the client is created
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS)


def submit(config_path: str | Path, address: str | None = None, *, run_dir: str | None = None,
           until: str | None = None, shard_size: str | None = None, python: str = "python",
           job_id: str | None = None, working_dir: str | Path = REPO_ROOT) -> str:
    """Submit the run of `config_path` as a Ray Job; returns the job's submission id."""
    from .run import default_run_dir

    config = load_run_config(config_path)  # bad configs fail here, not on the cluster
    if shard_size:
        parse_bytes(shard_size, "--shard-size")
    run_url = run_dir or default_run_dir(config, config_path)
    if "://" not in run_url:
        run_url = os.path.abspath(run_url)
    config = dataclasses.replace(config, run_dir=run_url)
    args = [python, "-m", "pipeline.jobs", run_url]
    if until:
        args += ["--until", until]
    if shard_size:
        args += ["--shard-size", shard_size]
    runtime_env = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES,
                   "env_vars": {**JOB_ENV, CONFIG_ENV: run_config_to_yaml(config)}}
    client = _client(address)
    # A head that has just started answers HTTP before its node agent can take jobs; Ray then says
    # "No available agent to submit job, please try again later". Do that, for up to AGENT_WAIT_S.
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=shlex.join(args), runtime_env=runtime_env, submission_id=job_id,
                                     metadata={"run_dir": run_url, "config": str(config_path)})
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def job_info(job_id: str, address: str | None = None):
    """ray.job_submission.JobDetails of a job (status, message, times, entrypoint, metadata)."""
    return _client(address).get_job_info(job_id)


def follow_logs(job_id: str, address: str | None = None, out=None, poll_s: float = 1.0,
                timeout_s: float | None = None) -> str:
    """Print the job's log as it grows until the job ends; returns its final status."""
    client = _client(address)
    out = out or sys.stdout
    printed = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL_STATUSES:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {status} after {timeout_s} s")
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------------
# The job's entrypoint (runs on the cluster)


def job_driver(argv: list[str]) -> int:
    """`python -m pipeline.jobs RUN_DIR [--until STAGE] [--shard-size SIZE]` inside a Ray Job."""
    from cluster.connect import disconnect

    from .run import run_pipeline

    parser = argparse.ArgumentParser(prog="python -m pipeline.jobs")
    parser.add_argument("run_dir")
    parser.add_argument("--until")
    parser.add_argument("--shard-size")
    args = parser.parse_args(argv)
    text = os.environ.get(CONFIG_ENV)
    if not text:
        print(f"error: {CONFIG_ENV} is not set; submit runs with `linearize submit`", file=sys.stderr)
        return 2
    for key, value in JOB_ENV.items():
        os.environ.setdefault(key, value)
    config = resolve_run_config(yaml.safe_load(text))
    shard_bytes = parse_bytes(args.shard_size, "--shard-size") if args.shard_size else None
    try:
        run_pipeline(config, args.run_dir, until=args.until, shard_bytes=shard_bytes)
    finally:
        disconnect()
    return 0


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    address_help = f"Ray dashboard address (default ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})"
    if command == "submit":
        parser.add_argument("config", help="run config YAML")
        parser.add_argument("--address", help=address_help)
        parser.add_argument("--run-dir", help="run directory reachable from the cluster (fsspec URL or shared path; "
                                              "default: the config's run_dir, else runs/<config name>, made absolute)")
        parser.add_argument("--until", help="stop after this stage")
        parser.add_argument("--shard-size", help="target size of one cache shard, e.g. 512MB")
        parser.add_argument("--python", default="python", help="Python executable on the cluster (default python)")
        parser.add_argument("--job-id", help="submission id (default: chosen by Ray)")
        parser.add_argument("--follow", action="store_true", help="stream the job's log until it ends; exit 0 only "
                                                                  "if it SUCCEEDED")
    else:
        parser.add_argument("job", help="job submission id (printed by `linearize submit`)")
        parser.add_argument("--address", help=address_help)
        if command == "logs":
            parser.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    parser.set_defaults(_command=command)


def main(args: argparse.Namespace) -> int:
    if args._command == "submit":
        try:
            job_id = submit(args.config, args.address, run_dir=args.run_dir, until=args.until,
                            shard_size=args.shard_size, python=args.python, job_id=args.job_id)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"submitted job {job_id}\n  status: linearize status {job_id}\n  logs:   linearize logs {job_id} "
              "--follow", flush=True)
        if not args.follow:
            return 0
        status = follow_logs(job_id, args.address)
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    if args._command == "status":
        info = job_info(args.job, args.address)
        print(f"job {args.job}: {info.status}" + (f" ({info.message})" if info.message else ""))
        if info.metadata:
            print(f"  run directory: {info.metadata.get('run_dir')}  config: {info.metadata.get('config')}")
        print(f"  entrypoint: {info.entrypoint}")
        return 0
    if args.follow:
        status = follow_logs(args.job, args.address)
        print(f"job {args.job}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    print(_client(args.address).get_job_logs(args.job), end="")
    return 0


if __name__ == "__main__":
    sys.exit(job_driver(sys.argv[1:]))
