"""TGPO against its baselines on the offline demo task, in two regimes (GitHub issue 5, part 1).

    python benchmarks/methods.py              # the full benchmark (~40 minutes on 2 CPU cores): docs/benchmarks/methods.*
    python benchmarks/methods.py --quick      # a reduced run (~1-2 minutes) that checks the script, not the numbers
    python benchmarks/methods.py --aggregate  # rebuild the JSON, table and plots from the per-run results only
    python benchmarks/methods.py --help       # every setting

Regimes (models from `tgpo_trl.demo.build`, task: the sum of three two-digit numbers):
- `large_gap`: the small-gap student's twin (same size, seed and steps) that solves the problems the teacher's way
  (column by column) but writes its solutions in other separators, another "family", with 10% of its examples in
  the teacher's writing: the teacher gives its tokens almost no probability (it has learned to read them);
- `small_gap`: the same student trained on the teacher's own writing (its family, only weaker);
- `cross_tokenizer` (not run by default: `--regimes cross_tokenizer --report-name methods_cross_tokenizer`): the
  small-gap student with the demo teacher rebuilt as another model family, a Llama with a byte-level BPE that merges
  digits and separators into tokens of their own (`tgpo_trl.demo.build.build_cross_tokenizer_teacher`): the
  teacher's guidance reaches the character-level student through cross-tokenizer scoring, at the positions where both
  tokenizations start a token.

Methods, with the same steps, batch, learning rate, rollouts and seeds:
- `grpo`: `guidance="none"` (the teacher is only scored, for the `gap/*` metrics);
- `opd`: reverse-KL on-policy distillation, per-token advantage `log p_T - log p_old`, coefficient 1 (constant), no
  task reward;
- `kdrl`, `tgpo`, `tgpo_topk`, `tgpo_sample`: GRPO plus the guidance term, one shared `lambda_0` and schedule
  (constant by default: see docs/benchmarks/methods.md for the pilot that chose it).

Each run trains in its own process at one torch thread (`--jobs` processes at once) and writes
`<results-dir>/<regime>/<method>/seed<k>.json` (settings, per-step logs, held-out greedy accuracy every
`--eval-every` steps); a run whose JSON exists is skipped, so an interrupted benchmark resumes where it stopped. The
aggregated `<report-name>.json`, `<report-name>.md` and PNG curves go to `--out-dir`.
"""

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: every run trains at one thread
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks`, `tgpo_trl`
# first: it sets the offline environment before transformers and TRL load
from benchmarks import common

REGIMES = ("large_gap", "small_gap", "cross_tokenizer")
DEFAULT_REGIMES = ("large_gap", "small_gap")
# The student and the teacher of each regime (`DemoModels` attributes; `teacher_bpe`: the cross-tokenizer teacher)
REGIME_MODELS = {"large_gap": ("student_large_gap", "teacher"), "small_gap": ("student_small_gap", "teacher"),
                 "cross_tokenizer": ("student_small_gap", "teacher_bpe")}
METHODS = ("grpo", "opd", "kdrl", "tgpo", "tgpo_topk", "tgpo_sample")
GUIDED = ("kdrl", "tgpo", "tgpo_topk", "tgpo_sample")
INTERPRETATION_MARKER = "<!-- interpretation (kept when the sections above are regenerated) -->"

# Shared settings, chosen by single-seed pilots (docs/benchmarks/methods.md): lr 1e-4, rollouts at temperature 0.7 and
# a constant lambda = 1. At lr 3e-4 every method, GRPO included, lost held-out accuracy; 1e-3 collapsed GRPO and TGPO
# alike; at 3e-5 little moved in 150 steps. At temperature 1.0 the students' samples are rarely right (mean reward
# below 0), so GRPO has almost no signal. A linear decay of lambda lost part of TGPO's small-gap gain.
FULL = {
    "steps": 150,
    "prompts_per_step": 8,
    "num_generations": 8,
    "learning_rate": 1e-4,
    "loss_type": "dapo",
    "temperature": 0.7,
    "max_completion_length": 40,
    "guidance_coef": 1.0,
    "guidance_schedule": "constant",
    "decay_fraction": 2 / 3,
    "opd_coef": 1.0,
    "guidance_top_k": 20,
    "cross_tokenizer_targets": "sync",
    "reward": "format",
    "eval_every": 50,
    "eval_size": 200,
    "seeds": [0, 1, 2],
    "demo_size": "full",
}
QUICK = {**FULL, "steps": 2, "eval_every": 1, "eval_size": 8, "demo_size": "quick",
         "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 16}


# ---------------------------------------------------------------------------------------------------- one run


def decay_steps(settings: dict) -> int:
    """D of the linear schedule: `decay_fraction` of the steps."""
    return max(1, round(settings["steps"] * settings["decay_fraction"]))


def method_config(method: str, settings: dict) -> dict:
    """The `TGPOConfig` fields that make `method`."""
    decay = decay_steps(settings)
    if method == "grpo":
        return {"guidance": "none"}
    if method == "opd":
        return {"guidance": "opd", "guidance_coef": settings["opd_coef"], "guidance_schedule": "constant",
                "use_task_reward": False}
    if method in GUIDED:
        return {"guidance": method, "guidance_coef": settings["guidance_coef"],
                "guidance_schedule": settings["guidance_schedule"], "guidance_decay_steps": decay}
    raise ValueError(f"Unknown method {method!r}; valid: {', '.join(METHODS)}")


def run_one(regime: str, method: str, seed: int, settings: dict, path: str, family=None) -> dict:
    """Train one student with one method and seed; write and return its record (runs in a fresh process).

    For `benchmarks/evidence.py`, which tunes on one held-out split and reports on another, over task families:
    `family` (its `Family`) gives the models, tokenizer, data, reward and answer checker instead of the demo's
    `REGIME_MODELS`; `settings["eval_split"]` names the split the evaluations use (default "test");
    `settings["record_problems"]` keeps the final evaluation's per-problem 0/1 correctness (`final_problems`, and the
    first evaluation's, `initial_problems`), for a bootstrap over problems. Without them the run and its record are
    the methods benchmark's. A family's teacher may also be None (no teacher: `grpo` alone) or a mapping from teacher
    id to path (several teachers, each dataset row routed to the one its `teacher_id` column names;
    `benchmarks/routing.py`).
    """
    import torch

    torch.set_num_threads(1)
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        PrinterCallback,
        TrainerCallback,
    )
    from transformers.utils import logging as hf_logging

    from tgpo_trl import TGPOConfig, TGPOTrainer
    from tgpo_trl.demo.build import build_cross_tokenizer_teacher, build_demo_models
    from tgpo_trl.demo.evaluate import greedy_completions
    from tgpo_trl.demo.task import build_dataset
    from tgpo_trl.rewards import exact_match_reward, get_reward_funcs

    hf_logging.set_verbosity_error()
    if family is None:
        models = build_demo_models(size=settings["demo_size"], progress=False)
        tokenizer = AutoTokenizer.from_pretrained(models.tokenizer)
        student_name, teacher_name = REGIME_MODELS[regime]
        student_path = getattr(models, student_name)
        if teacher_name == "teacher_bpe":
            teacher_path = build_cross_tokenizer_teacher(size=settings["demo_size"], progress=False)
        else:
            teacher_path = getattr(models, teacher_name)
        dataset, reward_funcs, correct = build_dataset, get_reward_funcs, exact_match_reward
    else:
        tokenizer = AutoTokenizer.from_pretrained(family.tokenizer(settings["demo_size"]))
        student_path, teacher_path = family.models(settings["demo_size"])[regime]
        dataset, reward_funcs, correct = family.dataset, family.reward_funcs, family.correct
    # pilots may train another student (`student_path`); the regime's teacher stays
    student = AutoModelForCausalLM.from_pretrained(settings.get("student_path") or student_path)
    teacher, teacher_tokenizer = load_teachers(teacher_path)
    test_set = dataset(settings["eval_size"], 0, settings.get("eval_split", "test"))
    # Distinct training problems, a different stream per seed (the build pretrained on seed 0..2 streams of `train`)
    train_set = dataset(settings["steps"] * settings["prompts_per_step"], 100 + seed, "train")
    if settings.get("fixed_problems"):  # pilots: the same few problems every step (can RL fit them at all?)
        from datasets import concatenate_datasets

        few = train_set.select(range(settings["fixed_problems"]))
        train_set = concatenate_datasets([few] * (len(train_set) // len(few)))

    evaluations, initial_problems, final_problems = [], [], []

    def evaluate(model, step):
        # `greedy_evaluation`'s accuracy and length, with the per-problem scores it sums kept
        was_training = model.training
        completions = greedy_completions(model, tokenizer, test_set["prompt"], settings["max_completion_length"])
        scores = correct(tokenizer.batch_decode(completions, skip_special_tokens=True), list(test_set["answer"]))
        final_problems[:] = [int(score) for score in scores]
        if not evaluations:
            initial_problems[:] = final_problems
        evaluations.append({"step": step, "accuracy": sum(scores) / len(scores),
                            "mean_length": sum(map(len, completions)) / len(completions)})
        model.train(was_training)

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings["eval_every"] == 0 or state.global_step == state.max_steps:
                evaluate(model, state.global_step)

    config = dict(
        output_dir=tempfile.mkdtemp(prefix="tgpo-benchmark-"),  # nothing is saved there
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["prompts_per_step"] * settings["num_generations"],
        num_generations=settings["num_generations"],
        max_completion_length=settings["max_completion_length"],
        temperature=settings["temperature"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        loss_type=settings["loss_type"],
        guidance_top_k=settings["guidance_top_k"],
        cross_tokenizer_targets=settings.get("cross_tokenizer_targets", "sync"),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=False,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        **method_config(method, settings),
        **settings.get("extra_config", {}),  # pilots: other TGPOConfig fields (optimizer, beta, ...)
    )
    args = TGPOConfig(**config)
    if settings.get("trl_grpo"):  # pilots: TRL's own GRPOTrainer, the same fields without TGPO's and no teacher
        import dataclasses

        from trl import GRPOConfig, GRPOTrainer

        grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
        grpo_args = GRPOConfig(**{k: v for k, v in config.items() if k in grpo_fields})
        trainer = GRPOTrainer(model=student, reward_funcs=reward_funcs(settings["reward"]), args=grpo_args,
                              train_dataset=train_set, processing_class=tokenizer, callbacks=[Recorder()])
    else:
        trainer = TGPOTrainer(
            model=student,
            reward_funcs=reward_funcs(settings["reward"]),
            args=args,
            train_dataset=train_set,
            processing_class=tokenizer,
            teacher_model=teacher,
            teacher_processing_class=teacher_tokenizer,
            callbacks=[Recorder()],
        )
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts are kept in `state.log_history`, not printed
    started = time.perf_counter()
    error = None
    try:
        trainer.train()
    except Exception as exception:  # noqa: BLE001  (a diverged run is a result, not a crash of the benchmark)
        error = f"{type(exception).__name__}: {exception}"
    seconds = time.perf_counter() - started
    shutil.rmtree(args.output_dir, ignore_errors=True)
    # The per-step training logs (not the end-of-train summary, which has `train_loss` instead of `loss`)
    logs = [{k: v for k, v in entry.items() if isinstance(v, (int, float))}
            for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "regime": regime,
        "method": method,
        "seed": seed,
        "config": method_config(method, settings),
        "settings": settings,
        "seconds": round(seconds, 1),
        "error": error,
        "final_accuracy": evaluations[-1]["accuracy"] if evaluations else float("nan"),
        "initial_accuracy": evaluations[0]["accuracy"] if evaluations else float("nan"),
        "evaluations": evaluations,
        "logs": logs,
    }
    if family is not None:
        record["family"] = family.name
    if settings.get("record_problems"):
        record["final_problems"] = final_problems  # 0/1 per evaluation problem, in the split's order
        record["initial_problems"] = initial_problems
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(path)
    return {"regime": regime, "method": method, "seed": seed, "final_accuracy": record["final_accuracy"],
            "seconds": record["seconds"], "error": error}


def load_teachers(teacher):
    """A run's `teacher_model` and `teacher_processing_class`: (None, None) for no teacher; the model and its tokenizer
    for a path; for {teacher id: path}, {teacher id: model} and None (each teacher's tokenizer is found beside its
    weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if teacher is None:
        return None, None
    if isinstance(teacher, dict):
        return {name: AutoModelForCausalLM.from_pretrained(path) for name, path in teacher.items()}, None
    return AutoModelForCausalLM.from_pretrained(teacher), AutoTokenizer.from_pretrained(teacher)


def _run_one_star(job):
    return run_one(*job)


# ---------------------------------------------------------------------------------------------------- aggregation


def load_records(results_dir: Path, regimes, methods, seeds) -> dict:
    records = {}
    for regime in regimes:
        for method in methods:
            for seed in seeds:
                path = results_dir / regime / method / f"seed{seed}.json"
                if path.exists():
                    records[(regime, method, seed)] = json.loads(path.read_text())
    return records


def step0_gap(records: dict, regime: str) -> dict:
    """The gap at step 0: the first logged step's `gap/*` (measured on the initial student's own rollouts, before its
    first update), averaged over every run of the regime."""
    out = {}
    for key in ("gap/reverse_kl", "gap/mismatch_ratio", "gap/aligned_ratio"):
        values = [r["logs"][0][key] for (reg, _, _), r in records.items() if reg == regime and r["logs"]
                  and key in r["logs"][0]]
        if values or key != "gap/aligned_ratio":  # runs older than the metric have none
            out[key] = common.mean_std(values)
    return out


def _curve(records, regime, method, seeds, key):
    """Per-step mean over seeds of a logged metric (or of the held-out accuracy for key='accuracy')."""
    per_seed = []
    for seed in seeds:
        r = records.get((regime, method, seed))
        if r is None:
            continue
        if key == "accuracy":
            per_seed.append({e["step"]: e["accuracy"] for e in r["evaluations"]})
        else:
            per_seed.append({entry["step"]: entry[key] for entry in r["logs"] if key in entry})
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    return steps, [statistics.fmean(d[s] for d in per_seed) for s in steps]


def _smooth(values, window):
    if window <= 1:
        return values
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


# The curves of a report: (logged key or "accuracy", title, smoothing window in steps)
PANELS = [("accuracy", "held-out greedy accuracy", 1), ("completions/mean_length", "completion length (tokens)", 10),
          ("gap/reverse_kl", "gap/reverse_kl (log p_s - log p_T)", 10),
          ("gap/mismatch_ratio", "gap/mismatch_ratio", 10), ("gap/aligned_ratio", "gap/aligned_ratio", 10)]


def plot(records, regimes, methods, seeds, out_dir: Path, name: str = "methods", panels=PANELS,
         title: str = "{regime}: mean over seeds {seeds}") -> list[str]:
    """One PNG per regime, `<name>_<regime>.png`: a panel per `panels` entry, a curve per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for regime in regimes:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for ax, (key, label, window) in zip(axes, panels, strict=True):
            for method in methods:
                steps, values = _curve(records, regime, method, seeds, key)
                if steps:
                    ax.plot(steps, _smooth(values, window), label=method, marker="o" if key == "accuracy" else None,
                            markersize=3)
            ax.set_xlabel("optimizer step")
            ax.set_title(label + ("" if window == 1 else f" ({window}-step mean)"), fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title.format(regime=regime, seeds=list(seeds)))
        fig.tight_layout()
        png = f"{name}_{regime}.png"
        fig.savefig(out_dir / png, dpi=90)
        plt.close(fig)
        names.append(png)
    return names


def _pct(x):
    return "nan" if math.isnan(x) else f"{100 * x:.1f}"


def write_outputs(records, regimes, methods, seeds, settings, out_dir: Path, wall_seconds: float | None,
                  jobs: int, do_plot: bool = True, name: str = "methods") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for regime in regimes:
        summary[regime] = {
            method: [records[(regime, method, s)]["final_accuracy"] for s in seeds if (regime, method, s) in records]
            for method in methods
        }
    run_seconds = [r["seconds"] for r in records.values()]
    meta = {
        "task": "sum of three two-digit numbers (tgpo_trl.demo.task); held-out greedy exact match",
        "settings": settings,
        "methods": {m: method_config(m, settings) for m in methods},
        "guidance_decay_steps": decay_steps(settings),
        "seeds": list(seeds),
        "threads_per_run": 1,
        "parallel_runs": jobs,
        "runs": len(records),
        "errors": {f"{k[0]}/{k[1]}/seed{k[2]}": r["error"] for k, r in records.items() if r["error"]},
        "run_seconds_total": round(sum(run_seconds), 1),
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
        "demo_build": _demo_build(settings["demo_size"]),
        "step0_gap": {regime: step0_gap(records, regime) for regime in regimes},
        "initial_accuracy": {regime: common.mean_std([r["initial_accuracy"] for k, r in records.items() if k[0] == regime])
                             for regime in regimes},
        "final_stats": {regime: {m: common.mean_std(v) for m, v in summary[regime].items()} for regime in regimes},
    }
    result = {**summary, "meta": meta}
    common.write_json(out_dir / f"{name}.json", result)
    pngs = plot(records, regimes, methods, seeds, out_dir, name) if do_plot and records else []
    md_path = out_dir / f"{name}.md"
    # The hand-written interpretation below the marker survives a regeneration
    kept = md_path.read_text().partition(INTERPRETATION_MARKER)[2] if md_path.exists() else ""
    md_path.write_text(render_markdown(result, regimes, methods, pngs, records, seeds) + kept.lstrip("\n"))
    return result


def _demo_build(size: str) -> dict:
    """The cache key and measured figures of the demo models the runs used (`build.json`)."""
    from tgpo_trl.demo.build import build_demo_models

    report = build_demo_models(size=size, progress=False).report
    return {"key": report["key"], "models": report["models"], "settings": report["settings"]}


def render_markdown(result, regimes, methods, pngs, records, seeds) -> str:
    meta = result["meta"]
    s = meta["settings"]
    lines = [
        "# TGPO against its baselines on the demo task",
        "",
        ("Generated by `python benchmarks/methods.py` (do not edit the generated sections by hand; the interpretation "
        "is appended below them)."),
        "",
        "## Settings",
        "",
        (f"- Task: {meta['task']}; {s['eval_size']} held-out problems, greedy decoding, max {s['max_completion_length']}"
        " new tokens."),
        (f"- Every method: {s['steps']} optimizer steps, {s['prompts_per_step']} prompts x {s['num_generations']} "
        f"rollouts per step, lr {s['learning_rate']} (constant), loss_type `{s['loss_type']}`, temperature "
        f"{s['temperature']}, reward `{s['reward']}` (1 correct, 0 wrong, -1 unparseable), seeds {meta['seeds']}."),
        f"- Guided methods (`kdrl`, `tgpo`, `tgpo_topk`, `tgpo_sample`): lambda_0 = {s['guidance_coef']}, "
        + (f"linear to 0 at D = {meta['guidance_decay_steps']} steps"
           if s["guidance_schedule"] == "linear" else "constant")
        + f"; top-k = {s['guidance_top_k']}.",
        f"- `opd`: advantage `log p_T - log p_old`, coefficient {s['opd_coef']} (constant), no task reward.",
        "- `grpo`: no guidance (the teacher only scores, for the gap metrics).",
        (f"- {meta['runs']} runs, 1 torch thread each, {meta['parallel_runs']} in parallel; wall time "
        f"{meta['wall_seconds']} s (sum of run times {meta['run_seconds_total']} s)."),
        "",
        "## Gap at step 0",
        "",
        ("Measured by the trainer at the first step, on the initial student's own rollouts (mean over all runs of the "
        "regime):"),
        "",
        "| regime | gap/reverse_kl | gap/mismatch_ratio | gap/aligned_ratio | initial held-out accuracy |",
        "|---|---|---|---|---|",
    ]
    for regime in regimes:
        g = meta["step0_gap"][regime]
        aligned = f"{g['gap/aligned_ratio']['mean']:.3f}" if "gap/aligned_ratio" in g else "n/a"
        lines.append(
            f"| {regime} | {g['gap/reverse_kl']['mean']:.3f} | {g['gap/mismatch_ratio']['mean']:.3f} | {aligned} | "
            f"{_pct(meta['initial_accuracy'][regime]['mean'])}% |"
        )
    lines += ["", "## Final held-out accuracy (%)", ""]
    lines += ["| method | " + " | ".join(f"{r} mean ± std | {r} min–max" for r in regimes) + " |",
              "|---|" + "---|---|" * len(regimes)]
    for method in methods:
        cells = []
        for regime in regimes:
            st = meta["final_stats"][regime][method]
            cells += [f"{_pct(st['mean'])} ± {_pct(st['std'])}", f"{_pct(st['min'])}–{_pct(st['max'])}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", ""]
    for regime in regimes:
        for method in methods:
            vals = ", ".join(_pct(v) for v in result[regime][method])
            lines.append(f"- {regime} / {method}: {vals}")
    if meta["errors"]:
        lines += ["", "Runs that stopped with an error (their last evaluation counts):", ""]
        lines += [f"- {k}: {v}" for k, v in meta["errors"].items()]
    # Curves at the evaluation steps, in a compact table
    lines += ["", "## Held-out accuracy during training (%, mean over seeds)", ""]
    for regime in regimes:
        steps0 = None
        rows = []
        for method in methods:
            steps, values = _curve(records, regime, method, seeds, "accuracy")
            steps0 = steps0 or steps
            rows.append(f"| {method} | " + " | ".join(_pct(v) for v in values) + " |")
        if steps0:
            lines += [f"**{regime}**", "", "| method | " + " | ".join(f"step {t}" for t in steps0) + " |",
                      "|---|" + "---|" * len(steps0), *rows, ""]
    if pngs:
        lines += ["## Curves", ""]
        lines += [f"![{p}]({p})" for p in pngs]
        lines.append("")
    lines += [INTERPRETATION_MARKER, ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = common.argument_parser(__doc__, argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced run on the quick demo models (tests)")
    p.add_argument("--aggregate", action="store_true", help="only rebuild the outputs from existing per-run results")
    p.add_argument("--regimes", nargs="+", default=list(DEFAULT_REGIMES), choices=REGIMES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--guidance-coef", type=float, default=None)
    p.add_argument("--guidance-schedule", default=None, choices=["linear", "constant"],
                   help="schedule of the guided methods (default constant; linear is the ablation)")
    p.add_argument("--decay-fraction", type=float, default=None, help="D as a fraction of the steps")
    p.add_argument("--loss-type", default=None)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature of the rollouts")
    p.add_argument("--reward", default=None, choices=["format", "exact_match"])
    p.add_argument("--cross-tokenizer-targets", default=None, choices=["sync", "continuation"],
                   help="where the cross_tokenizer regime's teacher gives targets (TGPOConfig.cross_tokenizer_targets)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None,
                   help="training processes at once, 1 torch thread each (default 2; --quick: 0 = in this process)")
    p.add_argument("--results-dir", default=None, help="per-run JSON (default outputs/benchmark[-quick])")
    p.add_argument("--out-dir", default=None, help="aggregated outputs (default docs/benchmarks)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report-name", default="methods",
                   help="file names of the aggregated outputs: <name>.json, <name>.md, <name>_<regime>.png")
    return p.parse_args(argv)


def report(done: dict) -> None:
    print(f"{done['regime']:9s} {done['method']:11s} seed {done['seed']}: final accuracy {done['final_accuracy']:.3f} "
          f"({done['seconds']:.0f} s)" + (f" ERROR {done['error']}" if done["error"] else ""), flush=True)


def main(argv=None) -> dict:
    a = parse_args(argv)
    settings = dict(QUICK if a.quick else FULL)
    for key in ("steps", "learning_rate", "guidance_coef", "guidance_schedule", "decay_fraction", "loss_type", "temperature",
                "reward", "eval_every", "cross_tokenizer_targets",
                "eval_size", "seeds"):
        value = getattr(a, key)
        if value is not None:
            settings[key] = value
    results_dir = Path(a.results_dir or common.REPO / ("outputs/benchmark-quick" if a.quick else "outputs/benchmark"))
    out_dir = Path(a.out_dir or common.DOCS)
    seeds = settings["seeds"]

    # Settings are part of a run's identity: a results dir holding runs made with other settings is refused
    results_dir.mkdir(parents=True, exist_ok=True)
    settings_file = results_dir / "settings.json"
    if settings_file.exists():
        previous = json.loads(settings_file.read_text())
        if {k: v for k, v in previous.items() if k != "seeds"} != {k: v for k, v in settings.items() if k != "seeds"}:
            raise SystemExit(f"{results_dir} holds runs made with other settings ({settings_file}); choose another "
                             "--results-dir or delete it.")
    settings_file.write_text(json.dumps(settings, indent=2))

    started = time.perf_counter()
    n_jobs = a.jobs if a.jobs is not None else (0 if a.quick else 2)  # 0: in this process
    if not a.aggregate:
        from tgpo_trl.demo.build import build_demo_models

        build_demo_models(size=settings["demo_size"], progress=False)  # build once, before the workers
        if "cross_tokenizer" in a.regimes:
            from tgpo_trl.demo.build import build_cross_tokenizer_teacher

            build_cross_tokenizer_teacher(size=settings["demo_size"], progress=False)
        jobs = []
        for seed in seeds:  # seed-major: a partial benchmark already covers every method
            for regime in a.regimes:
                for method in a.methods:
                    path = results_dir / regime / method / f"seed{seed}.json"
                    if path.exists():
                        continue
                    path.parent.mkdir(parents=True, exist_ok=True)
                    jobs.append((regime, method, seed, settings, str(path)))
        print(f"{len(jobs)} runs to do ({results_dir})", flush=True)
        if jobs and n_jobs == 0:  # in this process, one after the other (no process start-up: the quick mode)
            for job in jobs:
                report(run_one(*job))
        elif jobs:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(n_jobs, maxtasksperchild=1) as pool:
                for done in pool.imap_unordered(_run_one_star, jobs):
                    report(done)
    wall = time.perf_counter() - started
    records = load_records(results_dir, a.regimes, a.methods, seeds)
    timing_file = results_dir / "wall_seconds.json"
    timings = json.loads(timing_file.read_text()) if timing_file.exists() else {"wall_seconds": 0.0}
    if not a.aggregate:
        timings["wall_seconds"] += wall
        timing_file.write_text(json.dumps(timings))
    result = write_outputs(records, a.regimes, a.methods, seeds, settings, out_dir, timings["wall_seconds"],
                           max(n_jobs, 1), do_plot=not a.no_plots, name=a.report_name)
    for regime in a.regimes:
        print(regime, {m: round(st["mean"], 3) for m, st in result["meta"]["final_stats"][regime].items()},
              "step-0 gap:", {k: round(v["mean"], 3) for k, v in result["meta"]["step0_gap"][regime].items()})
    return result


if __name__ == "__main__":
    main()
