"""`benchmarks/evidence.py`: the paired bootstrap on cases checkable by hand, a validation split that never meets the
test or training problems, and the quick pipeline end to end (outputs of the required shape, resumable). The numbers
of the quick run mean nothing."""

import itertools
import json
import random
from pathlib import Path

import conftest
import numpy as np
import pytest

from tgpo_trl.demo import product_task, task

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "evidence.py"
REGIMES = {"large_gap", "small_gap"}
TUNED = {"grpo", "opd", "kdrl", "tgpo"}
FAMILIES = {"column_sum", "column_product"}


@pytest.fixture(scope="module")
def evidence():
    return conftest.load_script(SCRIPT)


# ---------------------------------------------------------------------------------------------------- the bootstrap


def test_identical_methods_differ_by_zero(evidence):
    scores = [[1, 0, 1, 1, 0], [0, 0, 1, 0, 1], [1, 1, 1, 0, 0]]
    assert evidence.paired_bootstrap(scores, scores) == (0.0, 0.0, 0.0)


def test_right_wherever_the_other_is_wrong_differs_by_one(evidence):
    assert evidence.paired_bootstrap(np.ones((5, 7)), np.zeros((5, 7))) == (1.0, 1.0, 1.0)


def test_mixed_case_mean_is_the_paired_mean_difference(evidence):
    method = [[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]]
    baseline = [[1, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1]]
    # per seed: (0 + 1 + 0 + 1) / 4, (1 + 0 + 0 + 0) / 4, (0 + 0 + 1 + 0) / 4; their mean: (0.5 + 0.25 + 0.25) / 3
    difference, low, high = evidence.paired_bootstrap(method, baseline)
    assert difference == pytest.approx(1 / 3)
    assert low < difference < high and -1 <= low and high <= 1
    assert evidence.paired_bootstrap(method, baseline) == (difference, low, high)  # a fixed RNG seed
    with pytest.raises(ValueError, match="one shape"):
        evidence.paired_bootstrap([[1, 0]], [[1, 0, 1]])


def test_wall_time_counts_overlapping_processes_once(evidence):
    assert evidence.union_seconds([[0, 10], [5, 20], [30, 40]]) == 30  # [0, 20] and [30, 40]
    assert evidence.union_seconds([[0, 10], [2, 3]]) == 10 and evidence.union_seconds([]) == 0


def test_a_claim_needs_the_whole_interval_on_one_side(evidence):
    assert evidence.verdict(0.01, 0.2) == "win" and evidence.verdict(-0.2, -0.01) == "loss"
    assert evidence.verdict(-0.01, 0.2) == evidence.verdict(-0.2, 0.0) == "no claim"


# ---------------------------------------------------------------------------------------------------- the splits


def questions(dataset) -> set[str]:
    return {prompt[0]["content"] for prompt in dataset["prompt"]}


def test_validation_and_test_are_disjoint_and_held_out_from_training(evidence):
    validation = questions(evidence.column_sum_dataset(300, 0, "validation"))
    test = questions(evidence.column_sum_dataset(300, 0, "test"))
    train = set().union(*(questions(evidence.column_sum_dataset(1000, 100 + seed, "train")) for seed in range(3)))
    assert len(validation) == len(test) == 300
    assert not validation & test and not validation & train and not test & train
    assert all(task.problem_split(q) == "test" for q in validation | test)  # task.py holds them out of training
    assert all(evidence.column_sum_split(q) == "validation" for q in validation)
    assert all(evidence.column_sum_split(q) == "test" for q in test)
    # Both halves of the held-out problems are populated (a CRC parity would put them all on one side)
    rng = random.Random(0)
    held_out = [q for q in ("+".join(str(rng.randint(10, 99)) for _ in range(3)) for _ in range(20000))
                if task.problem_split(q) == "test"]
    share = sum(evidence.column_sum_split(q) == "validation" for q in held_out) / len(held_out)
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="split"):
        evidence.column_sum_dataset(3, 0, "dev")


def test_the_product_family_s_splits_are_disjoint_too(evidence):
    dataset = evidence.FAMILIES["column_product"].dataset
    validation, test = questions(dataset(200, 0, "validation")), questions(dataset(500, 0, "test"))
    train = questions(dataset(3000, 100, "train"))
    assert len(validation) == 200 and len(test) == 500
    assert not validation & test and not (validation | test) & train
    assert all(product_task.problem_split(q) == "test" for q in validation | test)
    assert all(evidence.held_out_split(product_task, q) == "test" for q in test)


def test_the_tuning_budget_is_equal_and_at_most_six(evidence):
    evidence.check_grid(evidence.GRID)
    assert {len(evidence.configurations(evidence.GRID[m])) for m in TUNED} == {3}
    assert evidence.configurations({"learning_rate": (1, 2), "guidance_coef": (3,)}) == [
        {"learning_rate": 1, "guidance_coef": 3}, {"learning_rate": 2, "guidance_coef": 3}]
    with pytest.raises(ValueError, match="budget"):
        evidence.check_grid({**evidence.GRID, "grpo": {"learning_rate": (1e-5,)}})


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return conftest.run_benchmark_quick(SCRIPT, tmp_path_factory)


def test_evidence_json_has_the_required_shape(quick_run, evidence):
    _, out_dir, _ = quick_run
    result = json.loads((out_dir / "evidence.json").read_text())
    assert {"families", "initial", "intervals", "tuning"} <= set(result)
    n_seeds = len(evidence.QUICK["seeds"])
    assert set(result["families"]) == set(result["initial"]) == set(result["intervals"]) == FAMILIES
    for family, regimes in result["families"].items():
        assert set(regimes) == REGIMES
        for regime, rows in regimes.items():
            assert TUNED | {"tgpo_paper"} <= set(rows)
            for method, values in rows.items():
                assert len(values) == n_seeds and all(0.0 <= v <= 1.0 for v in values), (regime, method, values)
            assert 0.0 <= result["initial"][family][regime] <= 1.0
            found = result["intervals"][family][regime]
            assert set(found) == {"method", "baseline", "low", "high"}
            assert found["method"] == "tgpo" and found["baseline"] in {"grpo", "opd", "kdrl"}
            assert -1.0 <= found["low"] <= found["high"] <= 1.0
    assert set(result["tuning"]) == TUNED
    per_cell = {}
    for method, entries in result["tuning"].items():
        for entry in entries:
            assert set(entry) == {"family", "regime", "config", "validation_accuracy"}
            per_cell.setdefault((method, entry["family"], entry["regime"]), []).append(entry["config"])
    assert len(per_cell) == len(TUNED) * len(REGIMES) * len(FAMILIES)
    assert len({len(configs) for configs in per_cell.values()}) == 1  # an equal budget
    assert all(1 < len(configs) <= 6 for configs in per_cell.values())


def test_markdown_has_the_interval_lines_and_the_plots(quick_run):
    _, out_dir, _ = quick_run
    text = (out_dir / "evidence.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("Interval: tgpo − ")]
    assert len(lines) == len(REGIMES) * len(FAMILIES) and all(line.endswith(("**win**", "**loss**", "**no claim**")) for line in lines)
    assert "## Tuning" in text and "grpo_health.md" in text
    for family, regime in itertools.product(FAMILIES, REGIMES):
        png = out_dir / f"evidence_{family}_{regime}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png.name})" in text


def test_per_run_records_use_their_split_and_keep_problems(quick_run, evidence):
    results_dir, _, _ = quick_run
    s = evidence.QUICK
    for family, name in itertools.product(FAMILIES, ("lr0.0001", "lr0.0003")):
        record = json.loads((results_dir / "tune" / family / "small_gap" / "tgpo" / f"{name}.json").read_text())
        assert record["settings"]["eval_split"] == "validation" and record["seed"] == s["tune_seed"]
        assert len(record["final_problems"]) == s["validation_size"] and record["family"] == family
    best = json.loads((results_dir / "final" / "column_sum" / "small_gap" / "tgpo" / "seed0.json").read_text())
    paper = json.loads((results_dir / "final" / "column_sum" / "small_gap" / "tgpo_paper" / "seed1.json").read_text())
    for record in (best, paper):
        assert record["settings"]["eval_split"] == "test" and len(record["final_problems"]) == s["test_size"]
        assert record["evaluations"][-1]["step"] == s["steps"] and record["error"] is None
    assert paper["config"] == {"guidance": "tgpo", "guidance_coef": 0.002, "guidance_schedule": "linear",
                               "guidance_decay_steps": s["steps"]}
    assert paper["settings"]["learning_rate"] == best["settings"]["learning_rate"]  # tgpo's tuned learning rate


def test_the_per_problem_file_recomputes_every_reported_interval(quick_run, evidence):
    from benchmarks.problem_results import interval_from_file, read_problem_results

    _, out_dir, _ = quick_run
    result = json.loads((out_dir / "evidence.json").read_text())
    path = out_dir / evidence.PROBLEMS_FILE
    data = read_problem_results(path)
    n_final = len(evidence.ROWS) * len(REGIMES) * len(FAMILIES) * len(evidence.QUICK["seeds"])
    assert len(data["runs"]) == n_final and all(len(run["correct"]) == evidence.QUICK["test_size"]
                                                for run in data["runs"])
    for family, regimes in result["intervals"].items():
        for regime, found in regimes.items():
            cell = {"family": family, "regime": regime}
            recomputed = interval_from_file(path, {**cell, "row": "tgpo"}, {**cell, "row": found["baseline"]})
            assert recomputed == (result["verdicts"][family][regime]["difference"], found["low"], found["high"])


def test_a_second_run_resumes_without_training(quick_run, evidence):
    results_dir, out_dir, stdout = quick_run
    n_tune = len(TUNED) * len(REGIMES) * len(FAMILIES) * len(evidence.configurations(evidence.QUICK_GRID["tgpo"]))
    n_final = len(evidence.ROWS) * len(REGIMES) * len(FAMILIES) * len(evidence.QUICK["seeds"])
    assert f"tune: {n_tune} runs to do" in stdout and f"final: {n_final} runs to do" in stdout
    md = out_dir / "evidence.md"
    md.write_text(md.read_text() + "Hand-written interpretation.\n")
    again = conftest.run_script_quick(SCRIPT, out_dir, "--results-dir", results_dir, OMP_NUM_THREADS="1")
    assert "tune: 0 runs to do" in again and "final: 0 runs to do" in again
    assert md.read_text().endswith("Hand-written interpretation.\n")
    assert len(list((results_dir / "final").rglob("*.json"))) == n_final


# ---------------------------------------------------------------------------------------------------- the horizon pilot


def test_the_horizon_pilot_changes_only_the_steps_of_an_evidence_run(evidence):
    pilot = conftest.load_script(SCRIPT.parent / "pilots" / "evidence_horizon.py")
    tuned = json.loads((SCRIPT.parent.parent / "docs" / "benchmarks" / "evidence.json").read_text())["best_configs"]
    # The replica is the evidence's own final run of that cell, setting for setting (so it must give its accuracy)
    family, regime, row, _, _ = pilot.RUNS["replica_column_sum_large_gap_tgpo_seed0"]
    assert pilot.settings_of("replica_column_sum_large_gap_tgpo_seed0", tuned) == evidence.run_settings(
        evidence.FULL, tuned[family][regime][row], "test")
    for name, (family, regime, row, _, steps) in pilot.RUNS.items():
        settings = pilot.settings_of(name, tuned)
        expected = evidence.run_settings(evidence.FULL, tuned[family][regime][row], "test")
        assert {k for k in settings if settings[k] != expected[k]} <= {"steps", "eval_every"}, name
        assert settings["steps"] == (steps or pilot.HORIZON[family])
    # The longest horizon of each family fits its training split (a run draws steps x prompts distinct problems)
    for family, steps in pilot.HORIZON.items():
        n = steps * evidence.FULL["prompts_per_step"]
        assert len(evidence.FAMILIES[family].dataset(n, 100, "train")) == n
    with pytest.raises(ValueError, match="distinct"):  # 10 steps more would not (5,920 > 5,709 problems)
        evidence.FAMILIES["column_product"].dataset((pilot.HORIZON["column_product"] + 10) * 32, 100, "train")
