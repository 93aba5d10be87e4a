"""Pilot for issue 14, part 1: why GRPO loses accuracy on the demo task. One GRPO run per configuration (small gap,
seed 0, `exact_match` reward, 100 steps), each changing one thing of the benchmark's shared setup; per run the
held-out greedy accuracy every 25 steps, the mean sampled reward, the share of groups with zero reward variance
(`frac_reward_zero_std`: GRPO's advantage is 0 there), the completion length, the entropy and the gradient norm.

    python benchmarks/pilots/grpo_health.py [CONFIG ...]   # default: every configuration; results in
                                                           # outputs/pilots/grpo_health/<config>.json (resumable)
"""

import json
import multiprocessing
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import common, methods  # noqa: E402

BASE = {**methods.FULL, "steps": 100, "eval_every": 25, "eval_size": 200, "reward": "exact_match", "seeds": [0]}
CONFIGS = {
    "base": {},
    "format_reward": {"reward": "format"},
    "lr3e-5": {"learning_rate": 3e-5},
    "lr1e-5": {"learning_rate": 1e-5},
    "temperature0.3": {"temperature": 0.3},
    "temperature1.0": {"temperature": 1.0},
    "group16": {"num_generations": 16, "prompts_per_step": 4},
    "sgd_lr1e-2": {"extra_config": {"optim": "sgd"}, "learning_rate": 1e-2},
    "loss_grpo": {"loss_type": "grpo"},
    "adam_eps1e-4": {"extra_config": {"adam_epsilon": 1e-4}},
}
OUT = common.REPO / "outputs" / "pilots" / "grpo_health"


def job(name):
    path = OUT / f"{name}.json"
    if not path.exists():
        methods.run_one("small_gap", "grpo", 0, {**BASE, **CONFIGS[name]}, str(path))
    return name


def summarize(name):
    record = json.loads((OUT / f"{name}.json").read_text())
    logs = record["logs"]

    def mean(key, part):
        values = [entry[key] for entry in logs[part] if key in entry]
        return statistics.fmean(values) if values else float("nan")

    first, last = slice(0, 10), slice(-10, None)
    return {
        "accuracy": [round(e["accuracy"], 3) for e in record["evaluations"]],
        "reward_first10": round(mean("reward", first), 3), "reward_last10": round(mean("reward", last), 3),
        "zero_std_first10": round(mean("frac_reward_zero_std", first), 2),
        "zero_std_last10": round(mean("frac_reward_zero_std", last), 2),
        "length_first10": round(mean("completions/mean_length", first), 1),
        "length_last10": round(mean("completions/mean_length", last), 1),
        "entropy_first10": round(mean("entropy", first), 3), "entropy_last10": round(mean("entropy", last), 3),
        "grad_norm_mean": round(mean("grad_norm", slice(None)), 4),
        "seconds": record["seconds"], "error": record["error"],
    }


if __name__ == "__main__":
    names = sys.argv[1:] or list(CONFIGS)
    OUT.mkdir(parents=True, exist_ok=True)
    from tgpo_trl.demo.build import build_demo_models

    build_demo_models(size="full", progress=False)
    with multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=1) as pool:
        for done in pool.imap_unordered(job, names):
            print(done, json.dumps(summarize(done)), flush=True)
    summary = {name: summarize(name) for name in names if (OUT / f"{name}.json").exists()}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
