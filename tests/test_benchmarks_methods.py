"""`benchmarks/methods.py`: its quick mode runs every method in both regimes and writes outputs of the right shape
(not the numbers), and resumes from the per-run results it finds."""

import json
import math
from pathlib import Path

import conftest
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "methods.py"
REGIMES = {"large_gap", "small_gap"}
METHODS = {"grpo", "opd", "kdrl", "tgpo", "tgpo_topk", "tgpo_sample"}


def load_script():
    return conftest.load_script(SCRIPT)


def run_quick(results_dir, out_dir, *extra):
    return conftest.run_script_quick(SCRIPT, out_dir, "--results-dir", results_dir, *extra, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("results")
    out_dir = tmp_path_factory.mktemp("benchmarks")
    stdout = run_quick(results_dir, out_dir)
    return results_dir, out_dir, stdout


def test_methods_json_has_one_final_accuracy_per_seed(quick_run):
    _, out_dir, _ = quick_run
    result = json.loads((out_dir / "methods.json").read_text())
    assert set(result) == REGIMES | {"meta"}
    seeds = result["meta"]["seeds"]
    assert len(seeds) >= 3
    for regime in REGIMES:
        assert set(result[regime]) == METHODS
        for method, values in result[regime].items():
            assert len(values) == len(seeds), (regime, method)
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values), (regime, method, values)


def test_meta_records_the_settings_and_the_step0_gap(quick_run):
    _, out_dir, _ = quick_run
    meta = json.loads((out_dir / "methods.json").read_text())["meta"]
    for key in ("steps", "prompts_per_step", "num_generations", "learning_rate", "guidance_coef", "loss_type"):
        assert key in meta["settings"], key
    assert meta["threads_per_run"] == 1
    assert meta["wall_seconds"] > 0
    assert meta["methods"]["opd"] == {"guidance": "opd", "guidance_coef": 1.0, "guidance_schedule": "constant",
                                      "use_task_reward": False}
    assert meta["methods"]["grpo"] == {"guidance": "none"}
    for method in ("kdrl", "tgpo", "tgpo_topk", "tgpo_sample"):  # one coefficient and schedule for every guided method
        assert meta["methods"][method]["guidance_coef"] == meta["settings"]["guidance_coef"]
        assert meta["methods"][method]["guidance_schedule"] == meta["settings"]["guidance_schedule"] == "constant"
    assert meta["demo_build"]["key"] and set(meta["demo_build"]["models"]) == {
        "teacher", "student_large_gap", "student_small_gap"}
    for regime in REGIMES:
        gap = meta["step0_gap"][regime]
        for key in ("gap/reverse_kl", "gap/mismatch_ratio"):
            assert math.isfinite(gap[key]["mean"]), (regime, key)
        assert 0.0 <= gap["gap/mismatch_ratio"]["mean"] <= 1.0
    assert not meta["errors"]


def test_table_and_plots_are_written(quick_run):
    _, out_dir, _ = quick_run
    text = (out_dir / "methods.md").read_text()
    for name in METHODS | REGIMES:
        assert name in text
    assert "mean ± std" in text and "min–max" in text and "gap/mismatch_ratio" in text
    for regime in REGIMES:
        png = out_dir / f"methods_{regime}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png.name})" in text


def test_per_run_records_hold_curves(quick_run):
    results_dir, _, _ = quick_run
    record = json.loads((results_dir / "large_gap" / "tgpo" / "seed0.json").read_text())
    assert record["evaluations"][0]["step"] == 0
    assert record["evaluations"][-1]["step"] == record["settings"]["steps"]
    assert len(record["logs"]) == record["settings"]["steps"]
    for key in ("completions/mean_length", "gap/reverse_kl", "gap/mismatch_ratio", "guidance/coef"):
        assert key in record["logs"][0], key


def test_a_second_run_resumes_and_keeps_the_interpretation(quick_run):
    results_dir, out_dir, _ = quick_run
    module = load_script()
    md = out_dir / "methods.md"
    md.write_text(md.read_text() + "Hand-written interpretation.\n")
    stdout = run_quick(results_dir, out_dir)
    assert "0 runs to do" in stdout  # every per-run JSON exists: nothing is trained again
    text = md.read_text()
    assert text.count(module.INTERPRETATION_MARKER) == 1
    assert text.endswith("Hand-written interpretation.\n")


def test_methods_share_settings_and_unknown_method_is_refused():
    module = load_script()
    settings = module.FULL
    assert module.method_config("tgpo", settings)["guidance_decay_steps"] == round(settings["steps"] * 2 / 3)
    with pytest.raises(ValueError, match="Unknown method"):
        module.method_config("sft", settings)


def test_cross_tokenizer_regime_runs_with_its_own_report(tmp_path):
    results_dir, out_dir = tmp_path / "results", tmp_path / "out"
    run_quick(results_dir, out_dir, "--regimes", "cross_tokenizer", "--methods", "grpo", "tgpo", "--seeds", "0",
              "--report-name", "methods_cross_tokenizer")
    assert not (out_dir / "methods.json").exists()  # the two-regime report is left alone
    result = json.loads((out_dir / "methods_cross_tokenizer.json").read_text())
    assert set(result) == {"cross_tokenizer", "meta"} and set(result["cross_tokenizer"]) == {"grpo", "tgpo"}
    gap = result["meta"]["step0_gap"]["cross_tokenizer"]
    assert 0 < gap["gap/aligned_ratio"]["mean"] < 1  # a BPE teacher against a character student: some positions
    record = json.loads((results_dir / "cross_tokenizer" / "tgpo" / "seed0.json").read_text())
    assert record["error"] is None and all(0 < row["gap/aligned_ratio"] < 1 for row in record["logs"])
    assert (out_dir / "methods_cross_tokenizer_cross_tokenizer.png").exists()
    assert "| cross_tokenizer |" in (out_dir / "methods_cross_tokenizer.md").read_text()
