"""Several teachers, each prompt routed to its own: a miniature of what routing is for (GitHub issue 22).

    python benchmarks/routing.py               # build (cached), train, aggregate: docs/benchmarks/routing.*
    python benchmarks/routing.py --quick       # quick models, 2 steps, 8 problems per family: checks the pipeline
    python benchmarks/routing.py --aggregate   # only rebuild routing.json, routing.md and routing_problems.json.gz
    python benchmarks/routing.py --help        # every flag (--arms, --seeds, --steps, --jobs, ...)

Models (`tgpo_trl.demo.build.build_joint_student`, cached in `$TGPO_DEMO_CACHE` like the demo's): one student of the
demo's size pretrained on both task families, `column_sum` and `column_product`, in turn, written the way both
families' teachers write (a small gap to each), and the two families' teachers, reused from their own demo builds
(the build checks that all three share the demo's character tokenizer). Each teacher has only seen its own family.

Data: every step's prompts are half `column_sum` and half `column_product` problems of the training split, each row
naming its family's teacher in the `teacher_id` column (`sum` or `product`). The test problems are each family's test
split of `benchmarks/evidence.py` (`split_dataset`: held out of training, and apart from its validation split).

Arms, with the same student, data, steps, learning rate, rollouts and seeds:
- `sum_teacher`: TGPO with the column_sum teacher for every prompt (the `teacher_id` column is there, unused);
- `product_teacher`: TGPO with the column_product teacher for every prompt;
- `routed`: TGPO with both, `teacher_model={"sum": ..., "product": ...}`, each row scored by the teacher its
  `teacher_id` names;
- `grpo`: `guidance="none"` and no teacher at all.

Reported: greedy test accuracy per family (mean over seeds, and per seed), and the evidence benchmark's paired
bootstrap (`benchmarks.problem_results.paired_bootstrap`: seeds, and test problems within each seed, resampled; B =
2000) of `routed` minus each single teacher on that teacher's own family and on the other, and of `routed` minus
`grpo`. A win only where the interval's low end is above 0, a loss only where its high end is below 0.

Each run is `benchmarks.methods.run_one` (a fresh process at one torch thread, `--jobs` at once; `--quick`: in this
process) and writes `<results-dir>/<arm>/seed<k>.json`; a run whose JSON exists is skipped, so an interrupted benchmark
resumes. `routing.json`, `routing.md` and `routing_problems.json.gz` (every run's 0/1 per test problem, from which
`benchmarks.problem_results.interval_from_file` recomputes any interval without training) go to `--out-dir`.

Settings (`FULL`): the evidence benchmark's small-gap ones, not tuned here: 32 prompts x 8 rollouts per step at
temperature 0.3, the `exact_match` reward, lr 3e-5 and a constant lambda = 1 (the configuration its tuning chose for
TGPO in both small-gap cells; 3e-5 is also GRPO's chosen learning rate in every cell).

Budget: about 20-25 minutes of wall time for the 12 runs at `--jobs 2` on 2 cores. A measured 10-step run of two arms
side by side took ~0.9 s per step with a teacher and ~0.5 s for GRPO, ~2 s for the evaluations (1,000 test problems,
greedy) and ~10 s to start a process: 200 steps are ~12 x 200 x 0.8 s / 2 jobs + start-up ~ 18 min, and give 6,400
training prompts per run (3,200 per family, within the product family's 5,709 training problems). Evaluations every
50 steps. The whole benchmark took 21 min on this machine (routing.md).
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: every run trains at one thread
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks`, `tgpo_trl`
# first: it sets the offline environment before transformers and TRL load
from benchmarks import common, evidence, methods  # noqa: I001  (before the imports below: see the line above)
from benchmarks.problem_results import RESAMPLES, paired, paired_bootstrap, write_problem_results

from datasets import Dataset, concatenate_datasets

from tgpo_trl.demo import product_task, task
from tgpo_trl.rewards import exact_match_reward

FAMILIES = ("column_sum", product_task.NAME)
TASK_MODULES = {"column_sum": task, product_task.NAME: product_task}
TEACHER_IDS = {"column_sum": "sum", product_task.NAME: "product"}  # the `teacher_id` of each family's rows
TEACHER_ID_COLUMN = "teacher_id"
# arm: (the `methods.method_config` method, the families whose teachers it uses: one for every prompt, or both routed)
ARMS = {
    "sum_teacher": ("tgpo", ("column_sum",)),
    "product_teacher": ("tgpo", (product_task.NAME,)),
    "routed": ("tgpo", FAMILIES),
    "grpo": ("grpo", ()),
}
SINGLE = ("sum_teacher", "product_teacher")
OWN_FAMILY = {"sum_teacher": "column_sum", "product_teacher": product_task.NAME}
PROBLEMS_FILE = "routing_problems.json.gz"
SIGNAL_STEPS = 5  # the first and last steps averaged for the training signals' "first" and "last"

FULL = {
    **{k: v for k, v in evidence.FULL.items() if k not in evidence.EVIDENCE_ONLY},
    "learning_rate": 3e-5,
    "guidance_coef": 1.0,
    "guidance_schedule": "constant",
    "steps": 200,
    "eval_every": 50,
    "eval_split": "test",
    "record_problems": True,
    "test_size": 500,  # per family
    "seeds": [0, 1, 2],
}
QUICK = {**FULL, "steps": 2, "eval_every": 1, "demo_size": "quick", "prompts_per_step": 4, "num_generations": 2,
         "max_completion_length": 16, "test_size": 8, "seeds": [0, 1]}
ROUTING_ONLY = ("test_size", "seeds")  # settings of the benchmark, not of one run


# ---------------------------------------------------------------------------------------------------- the mix


def mix_dataset(n: int, seed: int, split: str) -> Dataset:
    """`n` problems, the first half `column_sum` and the second `column_product` (`evidence.split_dataset`: the test
    split never meets training), each row with its family's teacher in `teacher_id`."""
    half = n // 2
    parts = []
    for family, size in zip(FAMILIES, (n - half, half), strict=True):
        part = evidence.split_dataset(TASK_MODULES[family], size, seed, split)
        parts.append(part.add_column(TEACHER_ID_COLUMN, [TEACHER_IDS[family]] * len(part)))
    return concatenate_datasets(parts)


def arm_models(size: str) -> dict:
    """{arm: (student, teacher)}: the teacher is a path, {teacher id: path} (routed) or None (GRPO without one)."""
    from tgpo_trl.demo.build import build_joint_student

    built = build_joint_student(size=size, progress=False)
    out = {}
    for arm, (_, families) in ARMS.items():
        teachers = {TEACHER_IDS[f]: str(built.teachers[f]) for f in families}
        teacher = None if not teachers else next(iter(teachers.values())) if len(teachers) == 1 else teachers
        out[arm] = (str(built.student), teacher)
    return out


def joint_tokenizer(size: str) -> str:
    from tgpo_trl.demo.build import build_joint_student

    return str(build_joint_student(size=size, progress=False).tokenizer)


MIX = evidence.Family(
    name="+".join(FAMILIES),
    description="half column_sum, half column_product prompts; one student of both, each family's teacher",
    models=arm_models,
    tokenizer=joint_tokenizer,
    dataset=mix_dataset,
    correct=exact_match_reward,
)


# ---------------------------------------------------------------------------------------------------- runs


def run_settings(settings: dict, arm: str) -> dict:
    """One run's settings: the shared ones, both families' test problems, and the routing column for `routed`."""
    run = {k: v for k, v in settings.items() if k not in ROUTING_ONLY}
    run["eval_size"] = len(FAMILIES) * settings["test_size"]
    if len(ARMS[arm][1]) > 1:
        run["extra_config"] = {"teacher_id_column": TEACHER_ID_COLUMN}
    return run


def run_job(job) -> dict:
    """Worker: one `methods.run_one` of `arm` on the mix."""
    arm, seed, settings, path = job
    return methods.run_one(arm, ARMS[arm][0], seed, settings, path, family=MIX)


def report(done: dict) -> None:
    error = f" ERROR {done['error']}" if done["error"] else ""
    print(f"{done['regime']:16s} seed {done['seed']}: accuracy {done['final_accuracy']:.3f} ({done['seconds']:.0f} s)"
          f"{error}", flush=True)


def jobs_to_do(results_dir: Path, arms, settings: dict) -> list:
    jobs = []
    for seed in settings["seeds"]:  # seed-major: a partial benchmark already covers every arm
        for arm in arms:
            path = results_dir / arm / f"seed{seed}.json"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                jobs.append((arm, seed, run_settings(settings, arm), str(path)))
    return jobs


def execute(jobs: list, n_jobs: int) -> None:
    """`jobs` in this process (`n_jobs` 0) or in a spawn pool, one fresh process per run."""
    print(f"{len(jobs)} runs to do at --jobs {n_jobs}", flush=True)
    if jobs and n_jobs == 0:
        for job in jobs:
            report(run_job(job))
    elif jobs:
        with multiprocessing.get_context("spawn").Pool(n_jobs, maxtasksperchild=1) as pool:
            for done in pool.imap_unordered(run_job, jobs):
                report(done)


# ---------------------------------------------------------------------------------------------------- aggregation


def load_records(results_dir: Path, arms, seeds) -> dict:
    """{(arm, seed): record} of the runs that exist."""
    return {(arm, seed): json.loads((results_dir / arm / f"seed{seed}.json").read_text())
            for arm in arms for seed in seeds if (results_dir / arm / f"seed{seed}.json").exists()}


def per_family(problems: list, test_size: int) -> dict:
    """A run's 0/1 list over the mixed test set, split into {family: its test_size problems} (`mix_dataset`'s
    order)."""
    if len(problems) != len(FAMILIES) * test_size:
        raise ValueError(f"{len(problems)} scores for {len(FAMILIES)} x {test_size} test problems")
    return {family: problems[i * test_size:(i + 1) * test_size] for i, family in enumerate(FAMILIES)}


def problem_runs(records: dict, test_size: int) -> list:
    """The per-problem file's runs: every (arm, seed, family), and the initial student's evaluation, as recorded by each
    seed's first run (greedy decoding of one student: the same in every run of a seed)."""
    runs = []
    for (arm, seed), record in records.items():
        for family, correct in per_family(record["final_problems"], test_size).items():
            runs.append({"arm": arm, "seed": seed, "family": family, "problem_set": family, "correct": correct})
    for seed in sorted({seed for _, seed in records}):
        first = next(records[(arm, seed)] for arm in ARMS if (arm, seed) in records)
        for family, correct in per_family(first["initial_problems"], test_size).items():
            runs.append({"arm": "initial", "seed": seed, "family": family, "problem_set": family, "correct": correct})
    return runs


def comparisons(arms) -> list[tuple[str, str, str]]:
    """(method arm, baseline arm, family) of every interval: routed minus each single teacher on its own family and on
    the other, then routed minus GRPO on each family."""
    out = [("routed", single, family) for single in SINGLE if single in arms
           for family in (OWN_FAMILY[single], *[f for f in FAMILIES if f != OWN_FAMILY[single]])]
    out += [("routed", "grpo", family) for family in FAMILIES if "grpo" in arms]
    return out if "routed" in arms else []


def intervals(data: dict, arms) -> list[dict]:
    """Each comparison's paired bootstrap, computed from the per-problem file's content (what a reader of the file
    recomputes)."""
    out = []
    for method, baseline, family in comparisons(arms):
        try:
            seeds, method_scores, baseline_scores = paired(data, {"arm": method, "family": family},
                                                           {"arm": baseline, "family": family})
        except ValueError:  # an arm without runs yet
            continue
        difference, low, high = paired_bootstrap(method_scores, baseline_scores)
        out.append({"method": method, "baseline": baseline, "family": family,
                    "teacher_family": OWN_FAMILY.get(baseline), "difference": difference, "low": low, "high": high,
                    "verdict": evidence.verdict(low, high), "paired_seeds": seeds,
                    "problems": int(method_scores.shape[1])})
    return out


def signals(records: dict, arm: str, seeds, steps: int) -> dict:
    """{metric: {"first", "last"}}: the mean of the first and of the last `steps` logged values of each guidance, gap,
    teacher-share and reward metric, averaged over seeds."""
    out = {}
    runs = [records[(arm, s)]["logs"] for s in seeds if (arm, s) in records and records[(arm, s)]["logs"]]
    keys = sorted({k for logs in runs for entry in logs for k in entry
                   if k.startswith(("guidance/loss", "gap/", "teacher/token_share")) or k == "reward"})
    for key in keys:
        values = [[entry[key] for entry in logs if key in entry] for logs in runs]
        values = [v for v in values if v]
        if values:
            out[key] = {"first": statistics.fmean(statistics.fmean(v[:steps]) for v in values),
                        "last": statistics.fmean(statistics.fmean(v[-steps:]) for v in values)}
    return out


def curve(records: dict, arm: str, seeds) -> dict:
    """{step: test accuracy over both families, mean over the seeds evaluated at that step}."""
    per_step = {}
    for seed in seeds:
        for entry in records.get((arm, seed), {}).get("evaluations", []):
            per_step.setdefault(entry["step"], []).append(entry["accuracy"])
    return {step: statistics.fmean(values) for step, values in sorted(per_step.items())}


def aggregate(results_dir: Path, arms, settings: dict, out_dir: Path, wall_seconds, jobs: int) -> dict:
    from tgpo_trl.demo.build import build_demo_models, build_joint_student

    seeds, test_size = settings["seeds"], settings["test_size"]
    records = load_records(results_dir, arms, seeds)
    problem_sets = {family: [prompt[0]["content"] for prompt in
                             evidence.split_dataset(TASK_MODULES[family], test_size, 0, "test")["prompt"]]
                    for family in FAMILIES}
    runs = problem_runs(records, test_size)
    description = ("Routing miniature (issue 22): each run's greedy 0/1 correctness per test problem of each family; "
                   "arm 'initial' is the student before training. Intervals: routed minus another arm on one family, "
                   "paired by seed (benchmarks/problem_results.py).")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = write_problem_results(out_dir / PROBLEMS_FILE, "routing", description, problem_sets, runs)

    def accuracy(arm, seed, family):
        correct = next(r["correct"] for r in data["runs"]
                       if r["arm"] == arm and r["seed"] == seed and r["family"] == family)
        return correct.count("1") / len(correct)

    accuracies = {arm: {family: [accuracy(arm, s, family) for s in seeds if (arm, s) in records]
                        for family in FAMILIES} for arm in arms}
    initial = {family: [accuracy("initial", s, family) for s in seeds if any((a, s) in records for a in arms)]
               for family in FAMILIES}
    initial_agree = all(records[k]["initial_problems"] == records[k2]["initial_problems"]
                        for k in records for k2 in records if k[1] == k2[1])
    built = build_joint_student(size=settings["demo_size"], progress=False)
    teachers = {family: build_demo_models(size=settings["demo_size"], progress=False, task=family).report
                for family in FAMILIES}
    run_seconds = [r["seconds"] for r in records.values()]
    result = {
        "accuracy": accuracies,
        "initial": initial,
        "intervals": intervals(data, arms),
        "curves": {arm: curve(records, arm, seeds) for arm in arms},
        "signals": {arm: signals(records, arm, seeds, SIGNAL_STEPS if settings["steps"] > 2 * SIGNAL_STEPS else 1)
                    for arm in arms},
        "settings": settings,
        "meta": {
            "arms": {arm: {"config": methods.method_config(method, settings),
                           "teachers": [TEACHER_IDS[f] for f in families]} for arm, (method, families) in ARMS.items()
                     if arm in arms},
            "teacher_ids": TEACHER_IDS,
            "student_build": {"key": built.report["key"], "settings": built.report["settings"],
                              "tasks": built.report["tasks"], "seconds": built.report["seconds"]},
            "teacher_builds": {family: {"key": report["key"], "teacher": report["models"]["teacher"],
                                        "teacher_spec": report["settings"]["teacher"]}
                               for family, report in teachers.items()},
            "initial_identical_across_runs": initial_agree,
            "resamples": RESAMPLES,
            "bootstrap_seed": evidence.BOOTSTRAP_SEED,
            "threads_per_run": 1,
            "parallel_runs": jobs,
            "runs": len(records),
            "errors": {f"{arm}/seed{seed}": r["error"] for (arm, seed), r in records.items() if r["error"]},
            "run_seconds": common.mean_std(run_seconds),
            "step_seconds": {arm: statistics.fmean(statistics.median(e["step_time"] for e in records[(arm, s)]["logs"])
                                                   for s in seeds if (arm, s) in records)
                             for arm in arms if any((arm, s) in records for s in seeds)},
            "run_seconds_total": round(sum(run_seconds), 1),
            "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
            "environment": common.cpu_environment(),
        },
    }
    common.write_json(out_dir / "routing.json", result)
    md_path = out_dir / "routing.md"
    kept = md_path.read_text().partition(methods.INTERPRETATION_MARKER)[2] if md_path.exists() else ""
    md_path.write_text(render_markdown(result, arms) + kept.lstrip("\n"))
    return result


# ---------------------------------------------------------------------------------------------------- the report


def _pct(x) -> str:
    return methods._pct(float("nan") if x is None else x)


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def render_markdown(result: dict, arms) -> str:
    s, meta = result["settings"], result["meta"]
    student = meta["student_build"]
    spec = student["settings"]["student"]
    lines = [
        "# Several teachers, each prompt routed to its own: a miniature (issue 22)",
        "",
        ("Generated by `python benchmarks/routing.py` (do not edit the generated sections by hand; the interpretation "
         "is appended below them)."),
        "",
        "## Setup",
        "",
        (f"- Student: one Qwen2 of {spec['hidden_size']} hidden x {spec['num_layers']} layers, pretrained "
         f"{spec['steps']} steps (batch {student['settings']['batch_size']}, peak lr {spec['learning_rate']}) on "
         f"training problems of both families in the pattern {', '.join(student['settings']['pattern'])} (repeated), "
         "written the teachers' way (`tgpo_trl.demo.build.build_joint_student`, build "
         f"`{student['key']}`)."),
        ("- Teachers, each trained on its own family only (the families' demo builds, reused: one character tokenizer "
         "for all three models): ")
        + "; ".join(f"`{TEACHER_IDS[f]}` = the {f} teacher ({t['teacher_spec']['hidden_size']} x "
                    f"{t['teacher_spec']['num_layers']}, {t['teacher_spec']['steps']} steps, "
                    f"{_pct(t['teacher']['accuracy'])}% on its build's 500 held-out problems)"
                    for f, t in meta["teacher_builds"].items()) + ".",
        (f"- Data: each step {s['prompts_per_step']} prompts x {s['num_generations']} rollouts drawn from a training "
         f"set half `column_sum` and half `column_product` (a different stream per seed), each row's `teacher_id` "
         f"naming its family's teacher ({', '.join(f'`{v}`' for v in TEACHER_IDS.values())}). Test: "
         f"{s['test_size']} problems per family, the evidence benchmark's test split (held out of training and of "
         "its validation split), greedy decoding, exact match."),
        (f"- Training: {s['steps']} steps, lr {s['learning_rate']} (constant), loss `{s['loss_type']}`, temperature "
         f"{s['temperature']}, reward `{s['reward']}` (1 right, 0 wrong, -1 unparseable); TGPO arms lambda = "
         f"{s['guidance_coef']} ({s['guidance_schedule']}); seeds {s['seeds']}."),
        ("- Arms: `sum_teacher` (the sum teacher scores every prompt), `product_teacher` (the product teacher scores "
         "every prompt), `routed` (`teacher_model={\"sum\": ..., \"product\": ...}`, each row scored by its "
         "`teacher_id`'s teacher), `grpo` (`guidance=\"none\"`, no teacher)."),
        (f"- Intervals: paired by seed, percentile bootstrap 95% over seeds and, within each, test problems (B = "
         f"{meta['resamples']}, the evidence benchmark's `paired_bootstrap`); a win only where low > 0, a loss only "
         "where high < 0."),
        (f"- {meta['runs']} runs, 1 torch thread each, {meta['parallel_runs']} in parallel; wall time "
         f"{meta['wall_seconds']} s; a run {meta['run_seconds']['mean']:.0f} s on average (training and its "
         "evaluations); seconds per optimizer step (median over steps, mean over seeds): "
         + ", ".join(f"{arm} {seconds:.2f}" for arm, seconds in meta["step_seconds"].items()) + "."),
        "",
        "## Which teacher knows which family",
        "",
        ("The initial student's greedy accuracy and each teacher's mismatch ratio on its completions (teacher forcing: "
         "the share of tokens where the teacher would have written another; the student's build, its 500 held-out "
         "problems per family):"),
        "",
        "| student's completions on | accuracy | " + " | ".join(f"`{TEACHER_IDS[f]}` teacher's mismatch"
                                                        for f in FAMILIES) + " |",
        "|---|---|" + "---|" * len(FAMILIES),
    ]
    for family, figures in student["tasks"].items():
        lines.append(f"| {family} | {_pct(figures['accuracy'])}% | "
                     + " | ".join(f"{figures['teacher_mismatch_ratio'][f]:.3f}" for f in FAMILIES) + " |")
    lines += ["", "## Test accuracy per family (%)", "",
              "| arm | " + " | ".join(f"{f} mean ± std | {f} per seed" for f in FAMILIES) + " |",
              "|---|" + "---|---|" * len(FAMILIES)]
    rows = [("initial student", result["initial"])] + [(arm, result["accuracy"][arm]) for arm in arms]
    for name, by_family in rows:
        cells = []
        for family in FAMILIES:
            st = common.mean_std(by_family[family])
            cells += [f"{_pct(st['mean'])} ± {_pct(st['std'])}", ", ".join(_pct(v) for v in by_family[family])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    steps = sorted({int(step) for arm in arms for step in result["curves"][arm]})
    if steps:
        lines += ["", "Test accuracy during training, both families together (%, mean over seeds):", "",
                  "| arm | " + " | ".join(f"step {step}" for step in steps) + " |", "|---|" + "---|" * len(steps)]
        for arm in arms:
            by_step = {int(k): v for k, v in result["curves"][arm].items()}
            lines.append(f"| {arm} | " + " | ".join(_pct(by_step.get(step)) for step in steps) + " |")
    lines += ["", "## Intervals", "",
              "| routed minus | on | the baseline teacher's family? | difference (points) | 95% interval | verdict |",
              "|---|---|---|---|---|---|"]
    for found in result["intervals"]:
        own = "—" if found["teacher_family"] is None else "own" if found["teacher_family"] == found["family"] else "other"
        lines.append(f"| {found['baseline']} | {found['family']} | {own} | {_points(found['difference'])} | "
                     f"[{_points(found['low'])}, {_points(found['high'])}] | **{found['verdict']}** |")
    if not result["intervals"]:
        lines.append("| — | — | — | — | — | no paired runs yet |")
    lines += ["", (f"Training signals (mean over seeds of the first → last {SIGNAL_STEPS} logged steps; per-teacher "
                   "metrics `<metric>/<teacher id>` are logged by the routed arm):"), "",
              "| arm | metric | first | last |", "|---|---|---|---|"]
    for arm in arms:  # the JSON also has gap/reverse_kl and gap/aligned_ratio
        for key, value in result["signals"][arm].items():
            if key.startswith(("gap/reverse_kl", "gap/aligned_ratio")):
                continue
            lines.append(f"| {arm} | `{key}` | {value['first']:.3g} | {value['last']:.3g} |")
    lines += ["", "## Per-problem results", "",
              (f"[{PROBLEMS_FILE}]({PROBLEMS_FILE}) holds every run's 0/1 per test problem (and the initial student's, "
               "arm `initial`), with the problems themselves; any interval above can be recomputed from it without "
               "training, from the repository root (numpy only):"), "",
              "```python",
              "from benchmarks.problem_results import interval_from_file",
              f"interval_from_file(\"docs/benchmarks/{PROBLEMS_FILE}\",",
              "                   method={\"arm\": \"routed\", \"family\": \"column_product\"},",
              "                   baseline={\"arm\": \"sum_teacher\", \"family\": \"column_product\"})",
              "# -> (difference, low, high), as in the table",
              "```"]
    if meta["errors"]:
        lines += ["", "Runs that stopped with an error (their last evaluation counts):", ""]
        lines += [f"- {k}: {v}" for k, v in meta["errors"].items()]
    lines += ["", methods.INTERPRETATION_MARKER, ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = common.argument_parser(__doc__, argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="quick demo models, 2 steps, 8 problems per family (tests)")
    p.add_argument("--aggregate", action="store_true", help="only rebuild the outputs from existing per-run results")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2; --quick 0 1")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None,
                   help="training processes at once, 1 torch thread each (default 2; --quick: 0 = in this process)")
    p.add_argument("--results-dir", default=None, help="per-run JSON (default outputs/routing[-quick])")
    p.add_argument("--out-dir", default=None, help="routing.json, routing.md, routing_problems.json.gz "
                   "(default docs/benchmarks)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    settings = dict(QUICK if a.quick else FULL)
    for key in ("seeds", "steps", "eval_every"):
        if getattr(a, key) is not None:
            settings[key] = getattr(a, key)
    results_dir = Path(a.results_dir or common.REPO / ("outputs/routing-quick" if a.quick else "outputs/routing"))
    out_dir = Path(a.out_dir or common.DOCS)
    arms = [arm for arm in ARMS if arm in a.arms]

    # Settings are part of a run's identity: a results dir holding runs made with others is refused
    results_dir.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps({k: v for k, v in settings.items() if k != "seeds"}))
    settings_file = results_dir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != identity:
        raise SystemExit(f"{results_dir} holds runs made with other settings ({settings_file}); choose another "
                         "--results-dir or delete it.")
    settings_file.write_text(json.dumps(identity, indent=2))

    n_jobs = a.jobs if a.jobs is not None else (0 if a.quick else 2)  # 0: in this process
    started_at = time.time()
    timing_file = results_dir / "wall_seconds.json"
    spans = json.loads(timing_file.read_text()).get("spans", []) if timing_file.exists() else []
    if not a.aggregate:
        MIX.models(settings["demo_size"])  # build once, before the workers
        execute(jobs_to_do(results_dir, arms, settings), n_jobs)
        spans.append([started_at, time.time()])
        timing_file.write_text(json.dumps({"spans": spans, "wall_seconds": evidence.union_seconds(spans)}))
    result = aggregate(results_dir, arms, settings, out_dir, evidence.union_seconds(spans), max(n_jobs, 1))
    for arm in arms:
        means = {f: round(statistics.fmean(v), 3) for f, v in result["accuracy"][arm].items() if v}
        print(f"{arm}: {means}", flush=True)
    for found in result["intervals"]:
        print(f"routed - {found['baseline']} on {found['family']}: {found['difference']:+.3f} "
              f"[{found['low']:+.3f}, {found['high']:+.3f}] {found['verdict']}", flush=True)
    return result


if __name__ == "__main__":
    main()

