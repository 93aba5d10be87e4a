"""`benchmarks/served_teacher.py`: its quick mode starts the stand-in server in its own process, runs both trainers and
writes results of the right shape (not the numbers). Real vLLM's rows need its environment and a minute to start: the
full run measures them (docs/benchmarks/served_teacher.md)."""

import json
from pathlib import Path

import conftest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "served_teacher.py"


def test_quick_run_writes_step_times_and_the_hidden_fraction(tmp_path):
    conftest.run_script_quick(SCRIPT, tmp_path, "--servers", "standin")
    result = json.loads((tmp_path / "served_teacher.json").read_text())
    assert result["quick"] is True and result["servers"] == ["standin"]
    assert result["server_start_s"]["standin"] > 0
    steps = result["settings"]["steps"]
    assert set(result["results"]) == {"beta=0", "beta=0.04"}
    for row in result["results"].values():
        assert set(row["step_s"]) == {"in_process", "standin"} and set(row["served"]) == {"standin"}
        served = row["served"]["standin"]
        for summary in (*row["step_s"].values(), served["request_s"], served["wait_s"], row["teacher_forward_s"]):
            assert summary["n"] == steps and 0 < summary["min"] <= summary["median"] <= summary["max"]
        # the trainer never waits longer than the requests took (plus copying the answers into tensors)
        assert all(0 <= wait <= request + 0.05 for wait, request in zip(
            served["wait_s"]["samples"], served["request_s"]["samples"], strict=True))
        assert 0 <= served["hidden_fraction"]["median"] <= 1
    markdown = (tmp_path / "served_teacher.md").read_text()
    assert "| beta=0.04 | stand-in |" in markdown and "| beta=0 | in process |" in markdown
