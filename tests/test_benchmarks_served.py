"""`benchmarks/served_teacher.py`: its quick mode starts the stand-in server in its own process, runs both trainers and
writes results of the right shape (not the numbers)."""

import json
from pathlib import Path

import conftest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "served_teacher.py"


def test_quick_run_writes_step_times_and_the_hidden_fraction(tmp_path):
    conftest.run_script_quick(SCRIPT, tmp_path)
    result = json.loads((tmp_path / "served_teacher.json").read_text())
    assert result["quick"] is True
    steps = result["settings"]["steps"]
    assert set(result["results"]) == {"beta=0", "beta=0.04"}
    for row in result["results"].values():
        assert set(row["step_s"]) == {"in_process", "served"}
        for summary in (*row["step_s"].values(), row["served_request_s"], row["served_wait_s"],
                        row["teacher_forward_s"]):
            assert summary["n"] == steps and 0 < summary["min"] <= summary["median"] <= summary["max"]
        # the trainer never waits longer than the requests took (plus copying the answers into tensors)
        assert all(0 <= wait <= request + 0.05 for wait, request in zip(
            row["served_wait_s"]["samples"], row["served_request_s"]["samples"], strict=True))
        assert 0 <= row["hidden_fraction"]["median"] <= 1
    markdown = (tmp_path / "served_teacher.md").read_text()
    assert "| beta=0.04 |" in markdown and "stand-in" in markdown
