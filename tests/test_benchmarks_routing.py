"""`benchmarks/routing.py`: the mixed data (each row names its family's teacher, test problems never trained on), the
student of both families, and the quick pipeline end to end: results of the required shape, the per-problem file that
recomputes the report's intervals, and the routed arm's rows scored by both teachers. The quick run's numbers mean
nothing."""

import json
import sys
from pathlib import Path

import conftest
import pytest

from tgpo_trl.demo import build, product_task, task
from tgpo_trl.demo.tokenizer import build_char_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks`
from benchmarks import problem_results

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "routing.py"
FAMILIES = ("column_sum", "column_product")
ARMS = {"sum_teacher", "product_teacher", "routed", "grpo"}


@pytest.fixture(scope="module")
def routing():
    return conftest.load_script(SCRIPT)


def questions(dataset) -> list[str]:
    return [prompt[0]["content"] for prompt in dataset["prompt"]]


# ---------------------------------------------------------------------------------------------------- the data


def test_every_row_names_its_family_s_teacher(routing):
    mix = routing.mix_dataset(40, 100, "train")
    assert len(mix) == 40 and mix.column_names == ["prompt", "answer", "teacher_id"]
    ids = mix["teacher_id"]
    assert ids == ["sum"] * 20 + ["product"] * 20
    for question, teacher_id in zip(questions(mix), ids, strict=True):
        assert ("*" in question) == (teacher_id == "product") and ("+" in question) == (teacher_id == "sum")
    assert len(routing.mix_dataset(7, 0, "test")) == 7  # an odd count: the extra row is a sum


def test_test_problems_are_the_evidence_test_split_and_never_trained_on(routing):
    test = routing.mix_dataset(2 * 50, 0, "test")
    evidence = routing.evidence
    assert questions(test)[:50] == questions(evidence.split_dataset(task, 50, 0, "test"))
    assert questions(test)[50:] == questions(evidence.split_dataset(product_task, 50, 0, "test"))
    train = set()
    for seed in (100, 101, 102):  # the runs' training streams (100 + seed)
        train |= set(questions(routing.mix_dataset(2 * 800, seed, "train")))
    assert not set(questions(test)) & train
    assert all(evidence.held_out_split(task, q) == "test" for q in questions(test)[:50])
    assert all(evidence.held_out_split(product_task, q) == "test" for q in questions(test)[50:])


def test_a_run_s_problems_split_by_family_in_the_test_set_s_order(routing):
    assert routing.per_family([1, 0, 0, 1, 1, 1], 3) == {"column_sum": [1, 0, 0], "column_product": [1, 1, 1]}
    with pytest.raises(ValueError, match="test problems"):
        routing.per_family([1, 0, 1], 2)


def test_routed_is_compared_with_each_teacher_on_its_own_family_and_on_the_other(routing):
    found = routing.comparisons(list(ARMS))
    assert ("routed", "sum_teacher", "column_sum") in found and ("routed", "sum_teacher", "column_product") in found
    assert ("routed", "product_teacher", "column_product") in found
    assert ("routed", "product_teacher", "column_sum") in found
    assert {c for c in found if c[1] == "grpo"} == {("routed", "grpo", f) for f in FAMILIES} and len(found) == 6
    assert routing.comparisons(["grpo", "sum_teacher"]) == []  # nothing to compare without the routed arm
    assert "teacher_id_column" in routing.run_settings(routing.FULL, "routed")["extra_config"]
    assert "extra_config" not in routing.run_settings(routing.FULL, "sum_teacher")
    assert routing.run_settings(routing.FULL, "grpo")["eval_size"] == 2 * routing.FULL["test_size"]


# ---------------------------------------------------------------------------------------------------- the student


def test_the_student_s_training_problems_follow_the_pattern_of_families():
    assert set(build.JOINT_PATTERN) == set(FAMILIES) == set(build.JOINT_TASKS)
    mixture = build.TaskMixture(("column_sum", "column_product", "column_product"))
    stream = mixture.iter_problems(2, "train")
    problems = [next(stream) for _ in range(300)]
    assert [p["task"] for p in problems[:6]] == ["column_sum", "column_product", "column_product"] * 2
    assert sum(p["task"] == "column_product" for p in problems) == 200
    assert all(task.problem_split(p["question"]) == "train" for p in problems if p["task"] == "column_sum")
    assert all(product_task.problem_split(p["question"]) == "train" for p in problems if p["task"] != "column_sum")
    products = [p["question"] for p in problems if p["task"] == "column_product"]
    assert len(set(products)) > 150  # one stream per task, not restarted at each turn
    product = next(p for p in problems if p["task"] == "column_product")
    assert mixture.solution_text(product, "teacher") == product_task.solution_text(product, "teacher")
    with pytest.raises(ValueError, match="Unknown tasks"):
        build.TaskMixture(("column_sum", "column_difference"))


def test_one_tokenizer_for_the_student_and_both_teachers_is_checked():
    build.same_tokenizer({"a": build_char_tokenizer(), "b": build_char_tokenizer()})
    with pytest.raises(ValueError, match="'a' and 'b' differ"):
        build.same_tokenizer({"a": build_char_tokenizer(), "b": build_char_tokenizer("0123456789+=*#")})


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return conftest.run_benchmark_quick(SCRIPT, tmp_path_factory)


def test_routing_json_has_the_required_shape(quick_run, routing):
    _, out_dir, _ = quick_run
    result = json.loads((out_dir / "routing.json").read_text())
    n_seeds = len(routing.QUICK["seeds"])
    assert set(result["accuracy"]) == ARMS and set(result["initial"]) == set(FAMILIES)
    for arm, by_family in result["accuracy"].items():
        assert set(by_family) == set(FAMILIES)
        assert all(len(v) == n_seeds and all(0.0 <= x <= 1.0 for x in v) for v in by_family.values()), arm
    assert result["meta"]["errors"] == {} and result["meta"]["initial_identical_across_runs"]
    assert set(result["meta"]["student_build"]["tasks"]) == set(FAMILIES)
    assert len(result["intervals"]) == 6
    for found in result["intervals"]:
        assert found["method"] == "routed" and found["paired_seeds"] == routing.QUICK["seeds"]
        assert -1.0 <= found["low"] <= found["difference"] <= found["high"] <= 1.0
        assert found["problems"] == routing.QUICK["test_size"]
        assert found["verdict"] in {"win", "loss", "no claim"}
    text = (out_dir / "routing.md").read_text()
    assert text.count("| **") == 6 and routing.methods.INTERPRETATION_MARKER in text


def test_the_per_problem_file_recomputes_the_report_s_intervals(quick_run, routing):
    _, out_dir, _ = quick_run
    result = json.loads((out_dir / "routing.json").read_text())
    path = out_dir / routing.PROBLEMS_FILE
    data = problem_results.read_problem_results(path)
    n_seeds, size = len(routing.QUICK["seeds"]), routing.QUICK["test_size"]
    assert len(data["runs"]) == (len(ARMS) + 1) * n_seeds * len(FAMILIES)  # + the initial student's, per seed
    assert all(len(run["correct"]) == size for run in data["runs"])
    assert [len(data["problem_sets"][f]) for f in FAMILIES] == [size, size]
    for found in result["intervals"]:
        recomputed = problem_results.interval_from_file(
            path, {"arm": "routed", "family": found["family"]}, {"arm": found["baseline"], "family": found["family"]})
        assert recomputed == pytest.approx((found["difference"], found["low"], found["high"]), abs=1e-12)
    for arm, by_family in result["accuracy"].items():  # the file's scores are the reported accuracies
        for family, values in by_family.items():
            runs = sorted((r["seed"], r["correct"]) for r in data["runs"] if r["arm"] == arm and r["family"] == family)
            assert [c.count("1") / size for _, c in runs] == values


def test_the_routed_arm_s_rows_are_scored_by_both_teachers_and_grpo_s_by_none(quick_run):
    results_dir, _, _ = quick_run
    routed = json.loads((results_dir / "routed" / "seed0.json").read_text())
    shares = [{k: v for k, v in entry.items() if k.startswith("teacher/token_share/")} for entry in routed["logs"]]
    assert set().union(*shares) == {"teacher/token_share/sum", "teacher/token_share/product"}
    assert all(sum(s.values()) == pytest.approx(1.0) for s in shares)  # every step's tokens, shared among the two
    for name in ("sum", "product"):  # each teacher scored some of the rows
        assert sum(s.get(f"teacher/token_share/{name}", 0.0) for s in shares) > 0
    assert any(k.startswith("gap/mismatch_ratio/") for k in routed["logs"][0])
    single = json.loads((results_dir / "sum_teacher" / "seed0.json").read_text())
    assert "gap/mismatch_ratio" in single["logs"][0]
    grpo = json.loads((results_dir / "grpo" / "seed0.json").read_text())
    assert not any(k.startswith(("gap/", "teacher/token_share")) for k in grpo["logs"][0])  # no teacher at all


def test_a_second_run_resumes_without_training(quick_run):
    results_dir, out_dir, stdout = quick_run
    assert "8 runs to do" in stdout
    md = out_dir / "routing.md"
    md.write_text(md.read_text() + "Hand-written interpretation.\n")
    again = conftest.run_script_quick(SCRIPT, out_dir, "--results-dir", results_dir, OMP_NUM_THREADS="1")
    assert "0 runs to do" in again and md.read_text().endswith("Hand-written interpretation.\n")
