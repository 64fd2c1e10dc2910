"""RunDir: layout, atomic writes, state.json, on a local path and on memory://."""

import json
import uuid

import pytest

from pipeline.rundir import STAGES, TEMP_MARKER, RunDir


@pytest.fixture(params=["local", "memory"])
def run(request, tmp_path):
    if request.param == "local":
        return RunDir(str(tmp_path / "run"))
    return RunDir(f"memory://rundir-{uuid.uuid4().hex}/run")


def test_layout_paths(run):
    assert RunDir.block_dir(3) == "blocks/B003"
    assert run.path(RunDir.block_dir(12), "final") == f"{run.root}/blocks/B012/final"
    assert run.url_of(RunDir.plan_json) == f"{run.url}/plan.json"
    assert (RunDir.run_yaml, RunDir.state_json, RunDir.cache_dir) == ("run.yaml", "state.json", "cache")
    assert (RunDir.stitched_dir, RunDir.finetune_dir, RunDir.export_dir, RunDir.eval_dir) == (
        "stitched", "finetune", "export", "eval")
    with pytest.raises(ValueError, match="block"):
        RunDir.block_dir(-1)


def test_bytes_text_json_round_trip(run):
    assert not run.exists("plan.json")
    assert run.read_json("plan.json", default=None) is None
    run.write_json("plan.json", {"k": 9, "blocks": [[0, 9]]})
    run.write_text("run.yaml", "model: x\n")
    run.write_bytes("blocks/B000/ckpt.bin", b"\x00\x01\x02")
    assert run.read_json("plan.json") == {"k": 9, "blocks": [[0, 9]]}
    assert run.read_text("run.yaml") == "model: x\n"
    assert run.read_bytes("blocks/B000/ckpt.bin") == b"\x00\x01\x02"
    assert run.listdir("blocks") == ["B000"]
    assert run.listdir("nothing-here") == []
    with pytest.raises(FileNotFoundError):
        run.read_json("missing.json")


def test_overwrite_is_whole_and_leaves_no_temp_files(run):
    run.write_bytes("state.bin", b"a" * 1000)
    run.write_bytes("state.bin", b"b" * 10)
    assert run.read_bytes("state.bin") == b"b" * 10
    run.write_bytes("pieces.bin", [b"head", memoryview(bytearray(b"-body-")), bytearray(b"tail")])
    assert run.read_bytes("pieces.bin") == b"head-body-tail"
    assert not [name for name in run.listdir("") if TEMP_MARKER in name]


def test_state_defaults_mark_and_reopen(run):
    assert run.state() == {stage: "pending" for stage in STAGES}
    run.mark("collect", "running")
    run.mark("plan", "done")
    run.mark("transfer/B003", "done")  # sub-stages are allowed
    reopened = RunDir(run.url)
    assert reopened.status("collect") == "running"
    assert reopened.is_done("plan") and not reopened.is_done("collect")
    assert reopened.status("transfer/B003") == "done"
    assert json.loads(reopened.read_bytes("state.json"))["stages"]["collect"] == "running"
    with pytest.raises(ValueError, match="status"):
        run.mark("collect", "finished")
    with pytest.raises(ValueError, match="stage"):
        run.mark("", "done")


def test_remove_and_bad_url(run):
    run.write_bytes("eval/results.json", b"{}")
    run.remove("eval", recursive=True)
    assert not run.exists("eval/results.json")
    with pytest.raises(ValueError, match="run directory"):
        RunDir("")
