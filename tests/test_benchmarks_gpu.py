"""`benchmarks/gpu.py`: its quick mode runs on the CPU and writes results of the right shape (not the numbers)."""

import json
from pathlib import Path

import conftest
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
METHODS = {"grpo", "tgpo", "tgpo_topk", "distillation"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu")
    return out_dir, conftest.run_script_quick(SCRIPT, out_dir, CUDA_VISIBLE_DEVICES="")


def test_quick_run_writes_json_of_the_right_shape(quick_run):
    out_dir, _ = quick_run
    result = json.loads((out_dir / "gpu.json").read_text())
    assert result["quick"] is True and result["environment"]["device"] == "cpu"
    measured = result["measured"]
    assert measured["errors"] == {}
    assert set(measured["methods"]) == METHODS
    settings = result["settings"]
    tokens = settings["batch"] * (settings["prompt_length"] + settings["completion_length"])
    for method, entry in measured["methods"].items():
        assert len(entry["samples"]) == settings["steps"], method
        assert 0 < entry["min"] <= entry["median"] <= entry["max"], method
        assert entry["tokens_per_second"] == pytest.approx(tokens / entry["median"]), method
    assert set(measured["probes"]) == {"teacher_forward", "teacher_forward_topk"}
    assert measured["teacher_weight_bytes"] > measured["student_weight_bytes"] > 0
    # no CUDA: no memory figures, so no memory checks
    assert set(result["checks"]) == {"tgpo_overhead", "tgpo_vs_distillation", "tgpo_topk_overhead",
                                     "tgpo_topk_vs_distillation"}
    for name, check in result["checks"].items():
        assert check["pass"] == (check["value"] <= check["target"]), name


def test_quick_run_writes_markdown(quick_run):
    out_dir, stdout = quick_run
    text = (out_dir / "gpu.md").read_text()
    assert text.startswith("# GPU figures")
    assert "Quick mode" in text and "| Check" in text
    assert "Wrote" in stdout


def test_render_rewrites_the_report_from_stored_measurements(quick_run, tmp_path):
    out_dir, _ = quick_run
    stored = json.loads((out_dir / "gpu.json").read_text())
    stored["measured"]["methods"]["tgpo"]["median"] = 1e3  # a slower TGPO step must fail its checks
    (tmp_path / "in.json").write_text(json.dumps(stored))
    result = conftest.load_script(SCRIPT).main(["--render", str(tmp_path / "in.json"), "--out-dir", str(tmp_path)])
    assert result["checks"]["tgpo_overhead"]["pass"] is False
    assert result["checks"]["tgpo_vs_distillation"]["pass"] is False
    assert json.loads((tmp_path / "gpu.json").read_text())["checks"] == result["checks"]


def test_the_real_shapes_are_the_public_qwen_configurations_and_a_full_run_needs_cuda(monkeypatch):
    module = conftest.load_script(SCRIPT)
    assert module.SHAPES["qwen2.5-1.5b"]["hidden_size"] == 1536 and module.SHAPES["qwen2.5-7b"]["hidden_size"] == 3584
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        module.main(["--out-dir", "unused"])
    with pytest.raises(SystemExit):
        module.main(["--quick", "--student", "qwen3-1.7b"])
