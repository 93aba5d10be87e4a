"""`benchmarks/problem_results.py`: the per-problem results file round-trips to the interval computed in memory, for a
hand-made file and for the evidence benchmark's, and a selection that cannot be paired is refused."""

import gzip
import json
import sys
from pathlib import Path

import conftest
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks`
from benchmarks import problem_results

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "evidence.py"


def random_scores(seed: int, shape, p: float) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) < p).astype(int)


@pytest.fixture
def results(tmp_path):
    """Two arms x 3 seeds on 40 problems of one set, a third arm on another set, and the arrays they came from."""
    a, b = random_scores(0, (3, 40), 0.6), random_scores(1, (3, 40), 0.4)
    other = random_scores(2, (3, 10), 0.5)
    problem_sets = {"sums": [f"{i}+{i}" for i in range(40)], "products": [f"{i}*2" for i in range(10)]}
    runs = [{"arm": arm, "seed": seed, "problem_set": "sums", "correct": scores[seed].tolist()}
            for arm, scores in (("a", a), ("b", b)) for seed in range(3)]
    runs += [{"arm": "c", "seed": seed, "problem_set": "products", "correct": other[seed].tolist()} for seed in range(3)]
    path = tmp_path / "results.json.gz"
    problem_results.write_problem_results(path, "test", "a hand-made file", problem_sets, runs)
    return path, a, b


def test_the_file_gives_the_interval_computed_in_memory(results):
    path, a, b = results
    in_memory = problem_results.paired_bootstrap(a, b)
    assert problem_results.interval_from_file(path, {"arm": "a"}, {"arm": "b"}) == in_memory
    assert in_memory[0] == pytest.approx(a.mean() - b.mean()) and in_memory[1] < in_memory[0] < in_memory[2]
    data = json.loads(gzip.decompress(path.read_bytes()))  # plain gzip JSON, readable without this module
    assert data["runs"][0]["correct"] == "".join(map(str, a[0])) and len(data["problem_sets"]["sums"]) == 40
    # Other bootstrap settings pass through
    assert problem_results.interval_from_file(path, {"arm": "a"}, {"arm": "b"}, resamples=50, seed=3) == \
        problem_results.paired_bootstrap(a, b, resamples=50, seed=3)


def test_the_same_results_give_the_same_bytes(results, tmp_path):
    path, _, _ = results
    data = problem_results.read_problem_results(path)
    again = tmp_path / "again.json.gz"
    problem_results.write_problem_results(again, data["benchmark"], data["description"], data["problem_sets"],
                                          data["runs"])
    assert again.read_bytes() == path.read_bytes()  # gzip at mtime 0: a regenerated report leaves the file as it was


def test_runs_are_paired_over_the_seeds_both_have(results):
    path, a, b = results
    data = problem_results.read_problem_results(path)
    data["runs"] = [run for run in data["runs"] if not (run["arm"] == "b" and run["seed"] == 1)]
    seeds, method, baseline = problem_results.paired(data, {"arm": "a"}, {"arm": "b"})
    assert seeds == [0, 2] and (method == a[[0, 2]]).all() and (baseline == b[[0, 2]]).all()
    assert problem_results.interval_from_file(data, {"arm": "a"}, {"arm": "b"}) == \
        problem_results.paired_bootstrap(a[[0, 2]], b[[0, 2]])


def test_a_selection_that_cannot_be_paired_is_refused(results):
    path, _, _ = results
    with pytest.raises(ValueError, match="no run has"):
        problem_results.interval_from_file(path, {"arm": "z"}, {"arm": "b"})
    with pytest.raises(ValueError, match="several runs per seed"):
        problem_results.interval_from_file(path, {}, {"arm": "b"})
    with pytest.raises(ValueError, match="not paired problems"):
        problem_results.interval_from_file(path, {"arm": "c"}, {"arm": "b"})


def test_scores_that_do_not_fit_their_problems_are_refused(tmp_path):
    sets = {"s": ["1+1", "2+2"]}
    with pytest.raises(ValueError, match="3 scores for 2 problems"):
        problem_results.write_problem_results(tmp_path / "x.gz", "t", "", sets,
                                              [{"seed": 0, "problem_set": "s", "correct": [1, 0, 1]}])
    with pytest.raises(ValueError, match="0 or 1"):
        problem_results.write_problem_results(tmp_path / "x.gz", "t", "", sets,
                                              [{"seed": 0, "problem_set": "s", "correct": [1, 0.5]}])


def test_the_evidence_file_gives_the_evidence_interval(tmp_path):
    """`evidence.write_problems_file` from run records (as `--part aggregate` reads them) and `interval_from_file` on
    it give the interval `evidence.interval` computes from the same records in memory."""
    evidence = conftest.load_script(SCRIPT)
    settings, seeds, n = {"test_size": 12}, [0, 1, 2], 12
    records = {}
    for family_index, family in enumerate(("column_sum", "column_product")):
        for row_index, row in enumerate(evidence.ROWS):
            for seed in seeds:
                scores = random_scores(100 * family_index + 10 * row_index + seed, n, 0.2 + 0.1 * row_index)
                records[(family, "small_gap", row, seed)] = {"final_problems": scores.tolist(),
                                                             "final_accuracy": float(scores.mean())}
    path = tmp_path / evidence.PROBLEMS_FILE
    data = evidence.write_problems_file(records, ["column_sum", "column_product"], settings, path)
    assert len(data["runs"]) == len(records) and data["benchmark"] == "evidence"
    test_questions = [p[0]["content"] for p in evidence.FAMILIES["column_sum"].dataset(n, 0, "test")["prompt"]]
    assert data["problem_sets"]["column_sum"] == test_questions  # the problems the runs were scored on, in order
    for family in ("column_sum", "column_product"):
        summary = {row: [records[(family, "small_gap", row, s)]["final_accuracy"] for s in seeds]
                   for row in evidence.ROWS}
        entry, detail = evidence.interval(records, family, "small_gap", seeds, summary)
        method = {"family": family, "regime": "small_gap", "row": "tgpo"}
        baseline = {"family": family, "regime": "small_gap", "row": entry["baseline"]}
        assert problem_results.interval_from_file(path, method, baseline) == (detail["difference"], entry["low"],
                                                                              entry["high"])
