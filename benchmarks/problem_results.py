"""Per-problem results: the paired bootstrap of the benchmarks and the compressed file that lets anyone recompute one
of their intervals without rerunning training.

A benchmark that reports an interval (`evidence.py`, `routing.py`) commits, beside its report, the 0/1 correctness of
every run on every test problem: all the bootstrap reads. Recompute an interval from the file (numpy only; run from
the repository root):

    from benchmarks.problem_results import interval_from_file
    interval_from_file("docs/benchmarks/routing_problems.json.gz",
                       method={"arm": "routed", "family": "column_product"},
                       baseline={"arm": "sum_teacher", "family": "column_product"})
    # -> (mean difference, low, high): paired by seed, B = 2000, the report's RNG seed

The file is gzip-compressed JSON:

    {"benchmark": "routing", "description": "...",
     "problem_sets": {"column_sum": ["12+34+56", ...], ...},          # the test problems, in order
     "runs": [{"arm": "routed", "family": "column_sum", "seed": 0,   # the fields that name the run
               "problem_set": "column_sum", "correct": "0110..."},   # character i: problem i of its set
              ...]}

`method` and `baseline` select runs by their fields (every field given must match); the runs of each are paired by
`seed`, and both must be scored on one problem set.
"""

import gzip
import json
import os
from collections.abc import Iterable

import numpy as np

RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def paired_bootstrap(method, baseline, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean difference, low, high) of `method` minus `baseline`: two (seeds x problems) arrays of 0/1, row k of both
    from the same seed and column i from the same problem. A percentile interval over `resamples` draws of seeds with
    replacement and, within each drawn seed, problems with replacement (the same ones for both methods): it carries
    the seed-to-seed spread and the finite test set, which a t-interval over 5 seed means would not."""
    method, baseline = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if method.shape != baseline.shape or method.ndim != 2 or method.size == 0:
        raise ValueError(f"expected two (seeds, problems) arrays of one shape, got {method.shape} and {baseline.shape}")
    difference = method - baseline
    n_seeds, n_problems = difference.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, (resamples, n_seeds))
    problems = rng.integers(0, n_problems, (resamples, n_seeds, n_problems))
    draws = difference[seeds[:, :, None], problems].mean(axis=(1, 2))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(difference.mean()), float(low), float(high)


# ---------------------------------------------------------------------------------------------------- the file


def correct_string(scores: Iterable) -> str:
    """0/1 scores as a string of '0' and '1' (what the file stores per run: compact once compressed)."""
    scores = list(scores)
    if any(score not in (0, 1) for score in scores):  # 0.0, 1.0 and booleans compare equal to 0 and 1
        raise ValueError(f"per-problem scores must be 0 or 1, got {sorted(set(scores) - {0, 1})}")
    return "".join("1" if score else "0" for score in scores)


def write_problem_results(path: str | os.PathLike, benchmark: str, description: str, problem_sets: dict[str, list],
                          runs: list[dict]) -> dict:
    """Write the file (gzip at mtime 0: the same results give the same bytes, so a regenerated report leaves it
    unchanged) and return its content. `runs`: dicts of the fields that name a run, `seed`, `problem_set` (a key of
    `problem_sets`) and `correct` (the 0/1 scores, in the set's order, as a list or as `correct_string`'s text)."""
    rows = []
    for run in runs:
        size = len(problem_sets[run["problem_set"]])
        row = {**run, "correct": run["correct"] if isinstance(run["correct"], str) else correct_string(run["correct"])}
        if len(row["correct"]) != size or set(row["correct"]) - {"0", "1"}:
            raise ValueError(f"run {_name(run)}: {len(row['correct'])} scores for {size} problems of "
                             f"{run['problem_set']!r}, or scores other than 0/1")
        rows.append(row)
    data = {"benchmark": benchmark, "description": description, "problem_sets": problem_sets, "runs": rows}
    with open(path, "wb") as handle:
        handle.write(gzip.compress(json.dumps(data, separators=(",", ":")).encode(), mtime=0))
    return data


def read_problem_results(path: str | os.PathLike) -> dict:
    with gzip.open(path, "rt") as handle:
        return json.load(handle)


def _name(run: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in run.items() if k != "correct")


def select(data: dict, **fields) -> tuple[list, np.ndarray, str]:
    """(seeds, a (seeds x problems) 0/1 array, the problem set) of the runs whose fields all equal `fields`, one per
    seed, in seed order; a `ValueError` when none match, when a seed has two runs (a selection too loose) or when the
    runs are scored on different problem sets."""
    runs = [run for run in data["runs"] if all(run.get(key) == value for key, value in fields.items())]
    if not runs:
        raise ValueError(f"no run has {fields}")
    seeds = sorted(run["seed"] for run in runs)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"several runs per seed have {fields}: name more fields")
    sets = {run["problem_set"] for run in runs}
    if len(sets) != 1:
        raise ValueError(f"the runs with {fields} are scored on several problem sets: {sorted(sets)}")
    by_seed = {run["seed"]: run for run in runs}
    matrix = np.array([[int(c) for c in by_seed[seed]["correct"]] for seed in seeds], dtype=float)
    return seeds, matrix, sets.pop()


def paired(data: dict, method: dict, baseline: dict) -> tuple[list, np.ndarray, np.ndarray]:
    """(seeds, method's array, baseline's array) over the seeds both have: the bootstrap's inputs."""
    method_seeds, method_scores, method_set = select(data, **method)
    baseline_seeds, baseline_scores, baseline_set = select(data, **baseline)
    if method_set != baseline_set:
        raise ValueError(f"{method} is scored on {method_set!r}, {baseline} on {baseline_set!r}: not paired problems")
    seeds = [seed for seed in method_seeds if seed in baseline_seeds]
    if not seeds:
        raise ValueError(f"{method} and {baseline} have no seed in common")
    return (seeds, method_scores[[method_seeds.index(s) for s in seeds]],
            baseline_scores[[baseline_seeds.index(s) for s in seeds]])


def interval_from_file(path_or_data, method: dict, baseline: dict, **bootstrap) -> tuple[float, float, float]:
    """`paired_bootstrap` of the `method` runs minus the `baseline` runs of a per-problem results file (a path, or its
    content as `read_problem_results` returns it); `bootstrap`: its `resamples`, `seed`, `level`."""
    data = path_or_data if isinstance(path_or_data, dict) else read_problem_results(path_or_data)
    _, method_scores, baseline_scores = paired(data, method, baseline)
    return paired_bootstrap(method_scores, baseline_scores, **bootstrap)
