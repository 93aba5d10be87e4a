"""Evidence for TGPO: tuned baselines, a validation split apart from the test split, seeds, two task families and a
bootstrap interval over seeds and problems (GitHub issue 14).

    python benchmarks/evidence.py                   # tune, final, aggregate in order: docs/benchmarks/evidence.*
    python benchmarks/evidence.py --part tune       # only the tuning runs (validation split, one seed)
    python benchmarks/evidence.py --part final      # the best configurations with every seed (test split)
    python benchmarks/evidence.py --part aggregate  # only rebuild evidence.json, evidence.md and the PNGs
    python benchmarks/evidence.py --quick           # quick demo models, 2 steps, 8-problem splits: checks the pipeline
    python benchmarks/evidence.py --help            # every flag (--families, --regimes, --seeds, --steps, --jobs, ...)

Protocol:
- Families (`FAMILIES`): a task with its own models, data and answer checker, in the regimes `large_gap` and
  `small_gap`. `column_sum` is the demo task (`tgpo_trl.demo.task`): the sum of three two-digit numbers.
  `column_product` (`tgpo_trl.demo.product_task`): a three-digit number times a one-digit one, the times table digit
  by digit with the carry. In both, the teacher writes the worked solution one way, the small-gap student writes it
  the same way, and the large-gap student, of the same skill, writes the same steps in other separators: the gap is
  made the same way in both families (`tgpo_trl.demo.build.TASKS`).
- Splits: training problems are the task's `train` split; its held-out problems are divided by a second hash of the
  question into `validation` (tuning, 200 problems) and `test` (reported, 500), so the selection never sees what it
  is judged on.
- Methods: `grpo`, `opd`, `kdrl`, `tgpo` (`benchmarks.methods.method_config`), and `tgpo_paper`: the paper's recipe,
  lambda_0 = 0.002 decayed linearly to 0 over the run, at `tgpo`'s tuned learning rate, not tuned itself.
- Equal tuning budget: every tuned method gets the same number of configurations (`GRID`, at most `MAX_CONFIGS`) at
  one seed, scored by the final greedy accuracy on the validation split: the learning rate {1e-5, 3e-5} with each
  method's coefficient at 1 (`opd_coef` for opd, lambda_0 for kdrl and tgpo, constant), and the coefficient 0.1 at
  1e-5 (GRPO, which has none: the rollout temperature 0.5 at 1e-5). The best configuration per
  family x regime x method (the first in grid order on ties) is then trained with every seed (default 0-4) and
  evaluated on the test split, its per-problem correctness kept.
- Interval: per family x regime, `tgpo` minus the best baseline (the one of grpo/opd/kdrl with the highest mean test
  accuracy), paired by seed; a percentile bootstrap 95% interval that resamples seeds and, within each resampled
  seed, test problems (the same problems for both methods), B = 2000, fixed RNG seed
  (`benchmarks.problem_results.paired_bootstrap`). A win is
  claimed only where the interval's low end is above 0, a loss only where its high end is below 0; else no claim.

Each run is `benchmarks.methods.run_one` (a fresh process at one torch thread, `--jobs` at once; `--quick`: in this
process) and writes `<results-dir>/<part>/<family>/<regime>/<method>/<config-or-seed>.json`
(`tune/column_sum/small_gap/tgpo/lr1e-05.json`, `final/column_sum/small_gap/tgpo/seed0.json`): its record, with
`final_problems` (0/1 per problem of the split); a `tgpo_paper` record names the trainer method, `tgpo`. A run whose
JSON exists is skipped, so an interrupted benchmark resumes. `evidence.json`, `evidence.md` and
`evidence_<family>_<regime>.png` (held-out accuracy, completion length and the gap metrics over steps: where OPD and
KDRL derail, if they do) go to `--out-dir`, with `evidence_problems.json.gz`: every final run's 0/1 per test
problem, from which `benchmarks.problem_results.interval_from_file` recomputes an interval without training (`--part
aggregate` rewrites it from the run JSONs).

Shared setup (`FULL`): the rollouts of the setting where GRPO improves its initial students
(docs/benchmarks/grpo_health.md): 32 prompts x 8 rollouts per step at temperature 0.3, the `exact_match` reward. At
the methods benchmark's 8 prompts per step no GRPO setting improved the students, so a comparison there says little.

Cost, and the budget it sets: a step of 256 rollouts takes ~1.3 s at one thread on this machine with a teacher
forward (~0.7 s without: GRPO), so the grpo_health setting's 300 steps are ~6.5 min a run, and 98 runs per family
(2 regimes x (4 tuned methods x 6 configurations + 5 methods x 5 seeds)) ~5 h of wall time per family at `--jobs 2`.
To fit the issue's two hours for both families on 2 cores, a run is 60 steps and the grid 3 configurations per
method: 74 runs per family, ~55 min of wall time per family at `--jobs 2`. The script prints its estimate before
each part.
"""

import argparse
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: every run trains at one thread
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks`, `tgpo_trl`
# first: it sets the offline environment before transformers and TRL load
from benchmarks import common, methods  # noqa: I001  (before the imports below: see the line above)
from benchmarks.problem_results import BOOTSTRAP_SEED, RESAMPLES, paired_bootstrap, write_problem_results

from datasets import Dataset

from tgpo_trl.demo import product_task, task
from tgpo_trl.rewards import exact_match_reward, get_reward_funcs

REGIMES = ("large_gap", "small_gap")
ROWS = ("grpo", "opd", "kdrl", "tgpo", "tgpo_paper")  # the methods reported
TUNED = ("grpo", "opd", "kdrl", "tgpo")
BASELINES = ("grpo", "opd", "kdrl")
TRAINER_METHOD = {"tgpo_paper": "tgpo"}  # the `methods.method_config` method of a row that is not one itself
# The paper's recipe: lambda_0 = 0.002, linear to 0 at the last step (D = steps)
PAPER = {"guidance_coef": 0.002, "guidance_schedule": "linear", "decay_fraction": 1.0}
MAX_CONFIGS = 6
# The budget that fits the issue's two hours on 2 cores (see Cost): three configurations per method, the learning
# rate {1e-5, 3e-5} at a coefficient of 1 (`opd_coef`, lambda_0; constant), and the coefficient 0.1 at 1e-5. GRPO has
# no coefficient: its third is the rollout temperature 0.5 (grpo_health.md's other healthy-looking setting). A list of
# configurations, or {setting: values} for their product. The paper's small, decaying lambda_0 is the `tgpo_paper` row.
LEARNING_RATES = (1e-5, 3e-5)


def _grid(coefficient: str, third_value: float = 0.1) -> list[dict]:
    return [{"learning_rate": lr} for lr in LEARNING_RATES] + [{"learning_rate": 1e-5, coefficient: third_value}]


GRID = {"grpo": _grid("temperature", 0.5), "opd": _grid("opd_coef"), "kdrl": _grid("guidance_coef"),
        "tgpo": _grid("guidance_coef")}
QUICK_GRID = {method: {"learning_rate": (1e-4, 3e-4)} for method in GRID}  # 2 configurations each
SHORT = {"learning_rate": "lr", "temperature": "t", "opd_coef": "coef", "guidance_coef": "coef"}
# For the printed estimate only: a step of 256 rollouts with a teacher forward takes ~1.3 s at one thread (GRPO's
# ~0.7 s), a fresh process ~10 s to start and the evaluations ~15 s
SECONDS_PER_ROLLOUT_STEP, START_SECONDS = 1.3 / 256, 25

# The shared settings (lr, and a method's coefficient or GRPO's temperature, are set by the grid), with the evaluation
# split into validation and test: the methods benchmark's, with the rollouts per step, temperature, reward and steps
# at which GRPO improves its students (grpo_health.md, `batch32_lr1e-5_t0.3_300*`)
FULL = {
    **{k: v for k, v in methods.FULL.items() if k not in ("eval_size", "seeds")},
    "prompts_per_step": 32,
    "temperature": 0.3,
    "reward": "exact_match",
    "steps": 60,
    "eval_every": 15,
    "seeds": [0, 1, 2, 3, 4],
    "tune_seed": 0,
    "validation_size": 200,
    "test_size": 500,
}
QUICK = {**FULL, "steps": 2, "eval_every": 1, "demo_size": "quick", "prompts_per_step": 2, "num_generations": 2,
         "max_completion_length": 16, "seeds": [0, 1], "validation_size": 8, "test_size": 8}
EVIDENCE_ONLY = ("seeds", "tune_seed", "validation_size", "test_size")  # not settings of one run


# ---------------------------------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """A task with its own models: what `methods.run_one(family=...)` needs to train and score a student.

    `models(size)` -> {regime: (student path, teacher path)} (building them if needed); `tokenizer(size)` -> path;
    `dataset(n, seed, split)` -> `n` distinct problems (`prompt`, `answer`) of "train", "validation" or "test";
    `correct(texts, answers)` -> 1/0 per completion; `reward_funcs(name)` -> the training rewards.
    """

    name: str
    description: str
    models: Callable[[str], dict]
    tokenizer: Callable[[str], str]
    dataset: Callable[[int, int, str], Dataset]
    correct: Callable[[list, list], list]
    reward_funcs: Callable[[str], list] = get_reward_funcs


def demo_models(task_name: str, size: str) -> dict:
    """{regime: (student, teacher)} of one demo task (`tgpo_trl.demo.build.TASKS`), built if needed."""
    from tgpo_trl.demo.build import build_demo_models

    models = build_demo_models(size=size, progress=False, task=task_name)
    return {"large_gap": (str(models.student_large_gap), str(models.teacher)),
            "small_gap": (str(models.student_small_gap), str(models.teacher))}


def demo_tokenizer(task_name: str, size: str) -> str:
    from tgpo_trl.demo.build import build_demo_models

    return str(build_demo_models(size=size, progress=False, task=task_name).tokenizer)


def held_out_split(task_module, question: str) -> str:
    """"train", "validation" or "test": the task's own split, then its held-out problems halved by a second hash.

    SHA-256, not CRC-32: CRC is affine over GF(2), so `crc32("validation:" + q) % 2` is fixed by `crc32(q) % 2` for
    questions of one length, and every held-out column sum (crc32 % 10 == 0, hence even) would fall on one side.
    """
    if task_module.problem_split(question) == "train":
        return "train"
    return "validation" if hashlib.sha256(("validation:" + question).encode()).digest()[0] % 2 == 0 else "test"


def split_dataset(task_module, n: int, seed: int, split: str) -> Dataset:
    """`n` distinct problems of `split`, as the task's `build_dataset` (whose `train` split it is)."""
    if split == "train":
        return task_module.build_dataset(n, seed, "train")
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    held_out = task_module.iter_problems(seed, "test")
    return task.problems_dataset(n, (p for p in held_out if held_out_split(task_module, p["question"]) == split), split)


column_sum_split = functools.partial(held_out_split, task)
column_sum_dataset = functools.partial(split_dataset, task)


def demo_family(task_name: str, task_module, description: str) -> Family:
    return Family(
        name=task_name,
        description=description,
        models=functools.partial(demo_models, task_name),
        tokenizer=functools.partial(demo_tokenizer, task_name),
        dataset=functools.partial(split_dataset, task_module),
        correct=exact_match_reward,  # 1.0 / 0.0 per (text, answer), the reward's own check (both use `####`)
    )


FAMILIES = {
    "column_sum": demo_family("column_sum", task, "sum of three two-digit numbers (tgpo_trl.demo.task), the demo's "
                              "students and teacher"),
    product_task.NAME: demo_family(product_task.NAME, product_task, "a three-digit number times a one-digit number "
                                   "(tgpo_trl.demo.product_task), students and teacher built the demo's way"),
}


# ---------------------------------------------------------------------------------------------------- the bootstrap
# `paired_bootstrap` (and its `RESAMPLES`, `BOOTSTRAP_SEED`) lives in `benchmarks.problem_results`, beside the file of
# per-problem results it reads (`evidence_problems.json.gz`), so that an interval can be recomputed with numpy alone.


# ---------------------------------------------------------------------------------------------------- runs


def configurations(entry: dict | list) -> list[dict]:
    """The grid's configurations of one method, in grid order (the order that breaks ties): `entry` itself when it is
    a list of them, else the product of its {setting: values}."""
    if isinstance(entry, list):
        return [dict(config) for config in entry]
    return [dict(zip(entry, values, strict=True)) for values in itertools.product(*entry.values())]


def config_name(config: dict) -> str:
    return "_".join(f"{SHORT.get(key, key)}{value:g}" for key, value in config.items())


def check_grid(grid: dict) -> None:
    """The equal tuning budget: every tuned method has the same number of configurations, at most `MAX_CONFIGS`."""
    sizes = {method: len(configurations(grid[method])) for method in TUNED}
    if len(set(sizes.values())) != 1 or max(sizes.values()) > MAX_CONFIGS:
        raise ValueError(f"unequal or too large tuning budget: {sizes}")


def run_settings(settings: dict, config: dict, split: str) -> dict:
    """One run's settings: the shared ones, the configuration's, and the evaluation split."""
    shared = {k: v for k, v in settings.items() if k not in EVIDENCE_ONLY}
    return {**shared, **config, "eval_split": split, "eval_size": settings[f"{split}_size"], "record_problems": True}


def run_path(results_dir: Path, part: str, family: str, regime: str, method: str, name: str) -> Path:
    return results_dir / part / family / regime / method / f"{name}.json"


def run_job(job) -> dict:
    """Worker: one `methods.run_one` with the family resolved here (jobs hold names and settings only)."""
    family, regime, row, seed, settings, path = job
    done = methods.run_one(regime, TRAINER_METHOD.get(row, row), seed, settings, path, family=FAMILIES[family])
    return {**done, "family": family, "method": row, "name": Path(path).stem}


def report(done: dict, part: str) -> None:
    error = f" ERROR {done['error']}" if done["error"] else ""
    print(f"{part} {done['family']} {done['regime']:9s} {done['method']:10s} {done['name']}: accuracy "
          f"{done['final_accuracy']:.3f} ({done['seconds']:.0f} s){error}", flush=True)


def execute(jobs: list, n_jobs: int, part: str, results_dir: Path) -> None:
    """Run `jobs` (`methods.main`'s way: in this process for `n_jobs` 0, else a spawn pool, one process per run)."""
    seconds = sum(job[4]["steps"] * job[4]["prompts_per_step"] * job[4]["num_generations"] * SECONDS_PER_ROLLOUT_STEP
                  + (START_SECONDS if n_jobs else 0) for job in jobs)
    print(f"{part}: {len(jobs)} runs to do ({results_dir / part}; ~{seconds / max(n_jobs, 1) / 60:.0f} min at "
          f"--jobs {n_jobs})", flush=True)
    if jobs and n_jobs == 0:  # one after the other, no process start-up: the quick mode
        for job in jobs:
            report(run_job(job), part)
    elif jobs:
        with multiprocessing.get_context("spawn").Pool(n_jobs, maxtasksperchild=1) as pool:
            for done in pool.imap_unordered(run_job, jobs):
                report(done, part)


def tune_jobs(results_dir, families, regimes, settings, grid) -> list:
    jobs = []
    for family, regime, method in itertools.product(families, regimes, TUNED):
        for config in configurations(grid[method]):
            path = run_path(results_dir, "tune", family, regime, method, config_name(config))
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                run = run_settings(settings, config, "validation")
                jobs.append((family, regime, method, settings["tune_seed"], run, str(path)))
    return jobs


def load_tuning(results_dir, families, regimes, grid) -> dict:
    """{(family, regime, method): [(config, validation accuracy or None when not run yet)]}, in grid order."""
    out = {}
    for family, regime, method in itertools.product(families, regimes, TUNED):
        entries = []
        for config in configurations(grid[method]):
            path = run_path(results_dir, "tune", family, regime, method, config_name(config))
            entries.append((config, json.loads(path.read_text())["final_accuracy"] if path.exists() else None))
        out[(family, regime, method)] = entries
    return out


def best_config(entries: list) -> dict | None:
    """The configuration of the highest validation accuracy (the first on ties, a NaN lowest); None while the grid is
    not done."""
    if not entries or any(accuracy is None for _, accuracy in entries):
        return None
    return max(entries, key=lambda entry: -1.0 if math.isnan(entry[1]) else entry[1])[0]


def final_configs(tuning: dict, family: str, regime: str) -> dict | None:
    """{row: the settings it overrides} for the final runs; None while the tuning of this family x regime is open."""
    best = {method: best_config(tuning[(family, regime, method)]) for method in TUNED}
    if any(config is None for config in best.values()):
        return None
    return {**best, "tgpo_paper": {"learning_rate": best["tgpo"]["learning_rate"], **PAPER}}


def final_jobs(results_dir, families, regimes, settings, tuning) -> list:
    jobs = []
    for family, regime in itertools.product(families, regimes):
        rows = final_configs(tuning, family, regime)
        if rows is None:
            raise SystemExit(f"{family}/{regime}: the tuning is not complete; run --part tune first")
        for seed, row in itertools.product(settings["seeds"], ROWS):  # seed-major: a partial run covers every row
            path = run_path(results_dir, "final", family, regime, row, f"seed{seed}")
            run = run_settings(settings, rows[row], "test")
            if path.exists():
                if json.loads(path.read_text())["settings"] != json.loads(json.dumps(run)):
                    raise SystemExit(f"{path} was run with another configuration (did the tuning change?); delete it")
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((family, regime, row, seed, run, str(path)))
    return jobs


# ---------------------------------------------------------------------------------------------------- aggregation


def load_final(results_dir, families, regimes, seeds) -> dict:
    """{(family, regime, row, seed): record} of the final runs that exist."""
    records = {}
    for family, regime, row, seed in itertools.product(families, regimes, ROWS, seeds):
        path = run_path(results_dir, "final", family, regime, row, f"seed{seed}")
        if path.exists():
            records[(family, regime, row, seed)] = json.loads(path.read_text())
    return records


def family_records(records: dict, family: str) -> dict:
    """One family's records keyed as `benchmarks.methods` keys them, (regime, method, seed), for `methods._curve`."""
    return {(regime, row, seed): r for (fam, regime, row, seed), r in records.items() if fam == family}


def verdict(low: float, high: float) -> str:
    """"win" where the whole interval is above 0, "loss" where it is below, else "no claim"."""
    return "win" if low > 0 else "loss" if high < 0 else "no claim"


def interval(records, family, regime, seeds, summary) -> tuple[dict, dict] | None:
    """`tgpo` minus the best baseline: the `intervals` entry and its details; None without paired runs."""
    means = {m: statistics.fmean(summary[m]) for m in BASELINES if summary.get(m)}
    if not means or not summary.get("tgpo"):
        return None
    baseline = max(means, key=means.get)
    paired = [s for s in seeds if all("final_problems" in records.get((family, regime, m, s), {})
                                      for m in ("tgpo", baseline))]
    if not paired:
        return None
    scores = {m: [records[(family, regime, m, s)]["final_problems"] for s in paired] for m in ("tgpo", baseline)}
    difference, low, high = paired_bootstrap(scores["tgpo"], scores[baseline])
    entry = {"method": "tgpo", "baseline": baseline, "low": low, "high": high}
    detail = {"difference": difference, "verdict": verdict(low, high), "paired_seeds": paired,
              "problems": len(scores["tgpo"][0]), "resamples": RESAMPLES, "baseline_means": means}
    return entry, detail


PROBLEMS_FILE = "evidence_problems.json.gz"


def write_problems_file(records: dict, families, settings: dict, path: Path) -> dict:
    """The per-problem results of the final runs (`benchmarks.problem_results`): one run per (family, regime, row,
    seed) record with `final_problems`, scored on its family's test problems (named by their question, in order).
    Written from the run records, so it can be regenerated from a results dir without training."""
    problem_sets = {family: [prompt[0]["content"] for prompt in
                             FAMILIES[family].dataset(settings["test_size"], 0, "test")["prompt"]]
                    for family in families}
    runs = [{"family": family, "regime": regime, "row": row, "seed": seed, "problem_set": family,
             "correct": record["final_problems"]}
            for (family, regime, row, seed), record in sorted(records.items()) if "final_problems" in record]
    description = ("Evidence (issue 14): the final runs' greedy 0/1 correctness per test problem. Intervals: tgpo "
                   "minus a baseline row of one family and regime, paired by seed (benchmarks/problem_results.py).")
    return write_problem_results(path, "evidence", description, problem_sets, runs)


SHAPE_KEYS = ("accuracy", "completions/mean_length", "gap/reverse_kl", "gap/mismatch_ratio")


def failure_shape(records: dict, regime: str, row: str, seeds) -> dict:
    """First, lowest, highest and last value (mean over seeds) of each plotted curve: where a method derails."""
    out = {}
    for key in SHAPE_KEYS:
        _, values = methods._curve(records, regime, row, seeds, key)
        if values:
            out[key] = {"first": values[0], "min": min(values), "max": max(values), "last": values[-1]}
    return out


# The methods benchmark's curves with the held-out split named (the gap/aligned_ratio panel is for cross-tokenizer
# teachers, which no family has yet)
PANELS = [("accuracy", "held-out (test) greedy accuracy", 1), *methods.PANELS[1:4]]


def plot(records: dict, family: str, regimes, seeds, out_dir: Path) -> list[str]:
    """Per regime: held-out accuracy, completion length and the gap metrics over steps per method (the paper's
    failure shape), as the methods benchmark draws them."""
    return methods.plot(records, regimes, ROWS, seeds, out_dir, name=f"evidence_{family}", panels=PANELS,
                        title=f"{family} / {{regime}}: best configuration per method, mean over seeds {{seeds}}")


def aggregate(results_dir, families, regimes, settings, grid, out_dir: Path, wall_seconds, jobs: int,
              do_plot: bool = True) -> dict:
    seeds = settings["seeds"]
    records = load_final(results_dir, families, regimes, seeds)
    tuning = load_tuning(results_dir, families, regimes, grid)
    result = {"families": {}, "initial": {}, "intervals": {}, "tuning": {m: [] for m in TUNED}, "verdicts": {},
              "best_configs": {}, "failure_shape": {}}
    for family in families:
        fam = family_records(records, family)
        for key in ("families", "initial", "intervals", "verdicts", "best_configs", "failure_shape"):
            result[key][family] = {}
        for regime in regimes:
            summary = {row: [fam[(regime, row, s)]["final_accuracy"] for s in seeds if (regime, row, s) in fam]
                       for row in ROWS}
            result["families"][family][regime] = summary
            initial = [r["initial_accuracy"] for (reg, _, _), r in fam.items() if reg == regime]
            result["initial"][family][regime] = statistics.fmean(initial) if initial else float("nan")
            found = interval(records, family, regime, seeds, summary)
            if found:
                result["intervals"][family][regime], result["verdicts"][family][regime] = found
            result["best_configs"][family][regime] = final_configs(tuning, family, regime)
            result["failure_shape"][family][regime] = {row: failure_shape(fam, regime, row, seeds) for row in ROWS}
            for method in TUNED:
                result["tuning"][method] += [
                    {"family": family, "regime": regime, "config": config, "validation_accuracy": accuracy}
                    for config, accuracy in tuning[(family, regime, method)] if accuracy is not None]
    run_seconds = [r["seconds"] for r in records.values()]
    result["settings"] = settings
    result["meta"] = {
        "families": {f: FAMILIES[f].description for f in families},
        "grid": grid,
        "paper": PAPER,
        "resamples": RESAMPLES,
        "bootstrap_seed": BOOTSTRAP_SEED,
        "threads_per_run": 1,
        "parallel_runs": jobs,
        "final_runs": len(records),
        "tuning_runs": sum(len(v) for v in result["tuning"].values()),
        "errors": {f"{k[0]}/{k[1]}/{k[2]}/seed{k[3]}": r["error"] for k, r in records.items() if r["error"]},
        "final_run_seconds_total": round(sum(run_seconds), 1),
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "evidence.json", result)
    write_problems_file(records, families, settings, out_dir / PROBLEMS_FILE)
    pngs = {f: plot(family_records(records, f), f, regimes, seeds, out_dir) if do_plot and records else []
            for f in families}
    md_path = out_dir / "evidence.md"
    kept = md_path.read_text().partition(methods.INTERPRETATION_MARKER)[2] if md_path.exists() else ""
    md_path.write_text(render_markdown(result, families, regimes, pngs) + kept.lstrip("\n"))
    return result


def _pct(x) -> str:
    return methods._pct(float("nan") if x is None else x)


def _config_text(config: dict | None) -> str:
    return "—" if not config else ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in config.items())


def render_markdown(result: dict, families, regimes, pngs: dict) -> str:
    s, meta = result["settings"], result["meta"]
    n_configs = len(configurations(meta["grid"]["tgpo"]))
    grid = "; ".join(f"`{method}` " + " / ".join(f"({_config_text(c)})" for c in configurations(entry))
                     for method, entry in meta["grid"].items())
    lines = [
        "# Evidence: TGPO against tuned baselines (issue 14)",
        "",
        ("Generated by `python benchmarks/evidence.py` (do not edit the generated sections by hand; the interpretation "
         "is appended below them)."),
        "",
        ("The shared setup takes the rollouts of the setting where GRPO improves its initial students "
         f"([grpo_health.md](grpo_health.md)): {s['prompts_per_step']} prompts x {s['num_generations']} rollouts per "
         f"step at temperature {s['temperature']}, for {s['steps']} steps (the budget: see `benchmarks/evidence.py`); "
         "the learning rates and coefficients are tuned per method."),
        "",
        "## Protocol",
        "",
        *[f"- Family `{f}`: {meta['families'][f]}; regimes {', '.join(f'`{r}`' for r in regimes)}." for f in families],
        (f"- Splits: training problems never held out; held-out problems halved by a second hash into validation "
         f"({s['validation_size']} problems, tuning) and test ({s['test_size']} problems, reported)."),
        (f"- Tuning: {n_configs} configurations per method (equal budget), seed {s['tune_seed']}, final greedy "
         f"validation accuracy; grid: {grid}."),
        (f"- Final: the best configuration with seeds {s['seeds']}, test split; {s['steps']} steps, "
         f"{s['prompts_per_step']} prompts x {s['num_generations']} rollouts, loss `{s['loss_type']}`, reward "
         f"`{s['reward']}`, constant lr and guidance schedule."),
        (f"- `tgpo_paper`: lambda_0 = {PAPER['guidance_coef']}, linear to 0 over the {s['steps']} steps, at `tgpo`'s "
         "tuned learning rate (not tuned)."),
        (f"- Interval: `tgpo` minus the best baseline (highest mean test accuracy among {', '.join(BASELINES)}), "
         "paired by seed; percentile bootstrap 95% over seeds and, within each, test problems "
         f"(B = {meta['resamples']}); a win only where low > 0, a loss only where high < 0."),
        (f"- Per-problem results: [{PROBLEMS_FILE}]({PROBLEMS_FILE}), every final run's 0/1 per test problem; "
         "recompute an interval without training (from the repository root, numpy only): `from "
         "benchmarks.problem_results import interval_from_file; interval_from_file('docs/benchmarks/"
         f"{PROBLEMS_FILE}', method={{'family': 'column_sum', 'regime': 'small_gap', 'row': 'tgpo'}}, "
         "baseline={'family': 'column_sum', 'regime': 'small_gap', 'row': 'kdrl'})` gives (difference, low, high)."),
        (f"- {meta['final_runs']} final and {meta['tuning_runs']} tuning runs, 1 torch thread each, "
         f"{meta['parallel_runs']} in parallel; wall time {meta['wall_seconds']} s."),
        "",
    ]
    for family in families:
        for regime in regimes:
            summary = result["families"][family][regime]
            best = result["best_configs"][family][regime] or {}
            lines += [f"## {family} / {regime}", "",
                      f"Initial test accuracy (before RL): {_pct(result['initial'][family][regime])}%.", "",
                      "| method | configuration | test accuracy mean ± std (%) | per seed (%) |", "|---|---|---|---|"]
            for row in ROWS:
                st = common.mean_std(summary[row])
                lines.append(f"| {row} | {_config_text(best.get(row))} | {_pct(st['mean'])} ± {_pct(st['std'])} | "
                             + ", ".join(_pct(v) for v in summary[row]) + " |")
            found = result["intervals"][family].get(regime)
            if found:
                d = result["verdicts"][family][regime]
                lines += ["", (f"Interval: tgpo − {found['baseline']} (best baseline) = {100 * d['difference']:+.1f} "
                               f"points, 95% [{100 * found['low']:+.1f}, {100 * found['high']:+.1f}] over "
                               f"{len(d['paired_seeds'])} seeds x {d['problems']} problems: **{d['verdict']}**")]
            else:
                lines += ["", "Interval: no paired tgpo and baseline runs yet: **no claim**"]
            lines += ["", "Failure shape (mean over seeds; first → lowest / highest → last):", "",
                      "| method | test accuracy (%) | completion length | gap/reverse_kl | gap/mismatch_ratio |",
                      "|---|---|---|---|---|"]
            for row in ROWS:
                shape = result["failure_shape"][family][regime][row]
                cells = []
                for key in SHAPE_KEYS:
                    v = shape.get(key)
                    if v is None:
                        cells.append("—")
                    elif key == "accuracy":
                        cells.append(f"{_pct(v['first'])} → min {_pct(v['min'])} → {_pct(v['last'])}")
                    else:
                        cells.append(f"{v['first']:.3g} → max {v['max']:.3g} → {v['last']:.3g}")
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
            png = f"evidence_{family}_{regime}.png"
            if png in pngs.get(family, []):
                lines += ["", f"![{png}]({png})"]
            lines.append("")
    lines += [f"## Tuning (validation accuracy, seed {s['tune_seed']})", "",
              "| family | regime | method | configuration | validation accuracy (%) | chosen |",
              "|---|---|---|---|---|---|"]
    for method in TUNED:
        for e in result["tuning"][method]:
            chosen = (result["best_configs"][e["family"]][e["regime"]] or {}).get(method) == e["config"]
            lines.append(f"| {e['family']} | {e['regime']} | {method} | {_config_text(e['config'])} | "
                         f"{_pct(e['validation_accuracy'])} | {'yes' if chosen else ''} |")
    if meta["errors"]:
        lines += ["", "Final runs that stopped with an error (their last evaluation counts):", ""]
        lines += [f"- {k}: {v}" for k, v in meta["errors"].items()]
    lines += ["", methods.INTERPRETATION_MARKER, ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def union_seconds(spans: list) -> float:
    """The length of the union of [start, end] intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def parse_args(argv=None):
    p = common.argument_parser(__doc__, argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="quick demo models, 2 steps, tiny splits, 2 seeds (tests)")
    p.add_argument("--part", default="all", choices=["tune", "final", "aggregate", "all"],
                   help="tune, final or aggregate only (default: all three in order)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="final seeds (default 0-4; --quick 0 1)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None,
                   help="training processes at once, 1 torch thread each (default 2; --quick: 0 = in this process)")
    p.add_argument("--results-dir", default=None, help="per-run JSON (default outputs/evidence[-quick])")
    p.add_argument("--out-dir", default=None, help="evidence.json, evidence.md, PNGs (default docs/benchmarks)")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    settings = dict(QUICK if a.quick else FULL)
    grid = QUICK_GRID if a.quick else GRID
    check_grid(grid)
    if a.seeds is not None:
        settings["seeds"] = a.seeds
    if a.steps is not None:
        settings["steps"] = a.steps
    results_dir = Path(a.results_dir or common.REPO / ("outputs/evidence-quick" if a.quick else "outputs/evidence"))
    out_dir = Path(a.out_dir or common.DOCS)

    # Settings and grid are part of a run's identity: a results dir holding runs made with others is refused
    results_dir.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps({"settings": {k: v for k, v in settings.items() if k != "seeds"}, "grid": grid,
                                      "paper": PAPER}))
    settings_file = results_dir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != identity:
        raise SystemExit(f"{results_dir} holds runs made with other settings ({settings_file}); choose another "
                         "--results-dir or delete it.")
    settings_file.write_text(json.dumps(identity, indent=2))

    parts = ["tune", "final", "aggregate"] if a.part == "all" else [a.part]
    n_jobs = a.jobs if a.jobs is not None else (0 if a.quick else 2)  # 0: in this process
    started_at = time.time()
    if parts != ["aggregate"]:
        for family in a.families:
            FAMILIES[family].models(settings["demo_size"])  # build once, before the workers
    if "tune" in parts:
        execute(tune_jobs(results_dir, a.families, a.regimes, settings, grid), n_jobs, "tune", results_dir)
    if "final" in parts:
        tuning = load_tuning(results_dir, a.families, a.regimes, grid)
        execute(final_jobs(results_dir, a.families, a.regimes, settings, tuning), n_jobs, "final", results_dir)
    # Wall time: the union of every process's [start, end] (two processes running side by side count once)
    timing_file = results_dir / "wall_seconds.json"
    spans = json.loads(timing_file.read_text()).get("spans", []) if timing_file.exists() else []
    if parts != ["aggregate"]:
        spans.append([started_at, time.time()])
        timing_file.write_text(json.dumps({"spans": spans, "wall_seconds": union_seconds(spans)}))
    if "aggregate" not in parts:
        return {}
    result = aggregate(results_dir, a.families, a.regimes, settings, grid, out_dir, union_seconds(spans),
                       max(n_jobs, 1), do_plot=not a.no_plots)
    for family in a.families:
        for regime in a.regimes:
            means = {row: round(statistics.fmean(v), 3) for row, v in result["families"][family][regime].items() if v}
            found, detail = result["intervals"][family].get(regime), result["verdicts"][family].get(regime)
            line = (f"tgpo - {found['baseline']}: {detail['difference']:+.3f} [{found['low']:+.3f}, "
                    f"{found['high']:+.3f}] {detail['verdict']}" if found else "no interval")
            print(f"{family} {regime}: {means}; {line}", flush=True)
    return result


if __name__ == "__main__":
    main()
