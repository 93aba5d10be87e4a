"""`benchmarks/speed.py`: its quick mode runs and writes results of the right shape (not the numbers)."""

import json
from pathlib import Path

import conftest
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"
TIMED = {"grpo", "tgpo", "tgpo_topk", "tgpo_none", "distillation", "teacher_forward", "teacher_forward_topk"}
METHODS = {"grpo", "tgpo", "tgpo_topk", "distillation"}
CHECKS = {"tgpo_overhead", "tgpo_vs_distillation", "tgpo_topk_overhead", "tgpo_topk_vs_distillation"}
MEMORY_CHECKS = {"tgpo_memory", "tgpo_topk_memory"}


def load_script():
    return conftest.load_script(SCRIPT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("benchmarks")
    return out_dir, conftest.run_script_quick(SCRIPT, out_dir)


def test_quick_run_writes_json_of_the_right_shape(quick_run):
    out_dir, _ = quick_run
    result = json.loads((out_dir / "speed.json").read_text())
    assert result["quick"] is True
    settings = result["settings"]
    assert settings["rounds"] >= 1 and settings["threads"] >= 1
    assert result["environment"]["torch_threads"] == settings["threads"]
    assert result["environment"]["device"] == "cpu"

    times = result["time_per_step_s"]
    assert set(times) == TIMED
    for name, summary in times.items():
        assert summary["n"] == settings["rounds"] == len(summary["samples"]), name
        assert 0 < summary["min"] <= summary["median"] <= summary["max"], name

    memory = result["memory"]
    assert (memory is None) == (not load_script().memory_supported())  # skipped only where it cannot be measured
    expected_checks = CHECKS
    if memory is not None:  # None only where /proc/self/clear_refs cannot be written
        expected_checks = CHECKS | MEMORY_CHECKS
        assert set(memory) == METHODS
        for name, figures in memory.items():
            assert figures["peak_bytes"] >= figures["rss_before_step_bytes"] > 0, name
            assert len(figures["peak_samples_bytes"]) == settings["memory_steps"], name
        assert memory["grpo"]["teacher_weight_bytes"] == 0 < memory["tgpo"]["teacher_weight_bytes"]
    assert set(result["same_head_ratios"]) == {"tgpo", "tgpo_topk"}
    assert all(isinstance(ratio["value"], float) for ratio in result["same_head_ratios"].values())
    checks = result["checks"]
    assert set(checks) == expected_checks
    for name, check in checks.items():
        assert isinstance(check["pass"], bool) and isinstance(check["value"], float), name
        assert check["pass"] == (check["value"] <= check["target"]), name


def test_quick_run_writes_markdown_and_prints_the_ratios(quick_run):
    out_dir, stdout = quick_run
    text = (out_dir / "speed.md").read_text()
    assert text.startswith("# Speed and memory")
    assert "[gpu.md](gpu.md)" in text
    assert "| Check | Measured | Target | Result |" in text
    assert "### Time per optimizer step" in text
    assert "Ratios:" in stdout
    for name in CHECKS:
        assert f"{name}: " in stdout


def test_checks_compare_medians_with_the_targets():
    bench = load_script()
    settings = bench.Settings(batch=2, completion_length=4, vocab=1000)

    def summary(*values):
        return bench.common.summary(list(values))

    times = {
        "grpo": summary(1.0, 1.0), "tgpo": summary(1.5, 1.5), "tgpo_topk": summary(2.0, 2.0),
        "distillation": summary(1.8, 1.8), "teacher_forward": summary(0.5, 0.5),
        "teacher_forward_topk": summary(0.5, 0.5),
    }
    base = {"rss_before_step_bytes": 0, "step_growth_bytes": 0, "peak_samples_bytes": [], "teacher_weight_bytes": 0}
    memory = {
        "grpo": {**base, "peak_bytes": 10_000},
        # budget: teacher 100 + 0.25 x (2 x 4 x 1,000) x 4 bytes = 8,100
        "tgpo": {**base, "peak_bytes": 10_000 + 8_100, "teacher_weight_bytes": 100},
        "tgpo_topk": {**base, "peak_bytes": 10_000 + 8_101, "teacher_weight_bytes": 100},
        "distillation": {**base, "peak_bytes": 10_000},
    }
    checks = bench.analyse(settings, times, memory)
    assert checks["tgpo_overhead"]["value"] == pytest.approx(1.0) and checks["tgpo_overhead"]["pass"]
    assert checks["tgpo_topk_overhead"]["value"] == pytest.approx(2.0) and not checks["tgpo_topk_overhead"]["pass"]
    assert checks["tgpo_vs_distillation"]["pass"] and not checks["tgpo_topk_vs_distillation"]["pass"]
    assert checks["tgpo_memory"]["budget_bytes"] == 8_100
    assert checks["tgpo_memory"]["pass"] and not checks["tgpo_topk_memory"]["pass"]
