"""Pilot for issue 14: the evidence benchmark's tuned configurations over a longer horizon than its 60 steps.

Two questions the 60-step evidence leaves open (docs/benchmarks/evidence.md):
- Is GRPO a healthy baseline in every family x regime, given more steps? At 60 steps it gains 7.5 points in the
  column-sum large gap and at most a point elsewhere (and loses 0.7 in the column-sum small gap).
- Does TGPO leave its large-gap valley (below the initial students at step 60) in both families, and where does it
  end against GRPO on the same test problems?

Every run is `benchmarks/evidence.py`'s final run (its shared setup, its test split, the configuration its tuning
chose, read from docs/benchmarks/evidence.json), with only the steps changed: 300 for the column sum (the
grpo_health pilot's horizon), 175 for the column product, whose training split holds 5,709 problems (a run draws
`steps x 32` distinct ones). `replica`: one evidence run again at its own 60 steps, which must give the accuracy
evidence.json holds for that seed (the runs are deterministic at one thread).

    python benchmarks/pilots/evidence_horizon.py [RUN ...]   # default: every run, 2 at a time; resumable
    python benchmarks/pilots/evidence_horizon.py --report    # docs/benchmarks/evidence_horizon.{json,md}
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import common, evidence  # noqa: E402

EVIDENCE = common.DOCS / "evidence.json"
OUT = common.REPO / "outputs" / "pilots" / "evidence_horizon"
HORIZON = {"column_sum": 300, "column_product": 175}
EVAL_EVERY = {"column_sum": 50, "column_product": 35}
# name: (family, regime, row, seed, steps or None for the family's horizon)
RUNS = {
    **{f"{family}_{regime}_grpo": (family, regime, "grpo", 0, None)
       for family in HORIZON for regime in evidence.REGIMES},
    **{f"{family}_large_gap_tgpo_seed{seed}": (family, "large_gap", "tgpo", seed, None)
       for family in HORIZON for seed in (0, 1)},
    "replica_column_sum_large_gap_tgpo_seed0": ("column_sum", "large_gap", "tgpo", 0, 60),
}


def settings_of(name: str, tuned: dict) -> dict:
    family, regime, row, _, steps = RUNS[name]
    steps = steps or HORIZON[family]
    every = evidence.FULL["eval_every"] if steps == evidence.FULL["steps"] else EVAL_EVERY[family]
    return evidence.run_settings(evidence.FULL, {**tuned[family][regime][row], "steps": steps, "eval_every": every},
                                 "test")


def run(names: list[str], jobs: int = 2) -> None:
    tuned = json.loads(EVIDENCE.read_text())["best_configs"]
    OUT.mkdir(parents=True, exist_ok=True)
    for family in {RUNS[name][0] for name in names}:
        evidence.FAMILIES[family].models(evidence.FULL["demo_size"])  # build once, before the workers
    todo = [(*RUNS[name][:4], settings_of(name, tuned), str(OUT / f"{name}.json")) for name in names
            if not (OUT / f"{name}.json").exists()]
    todo.sort(key=lambda job: -job[4]["steps"] * (1 if job[2] == "grpo" else 2))  # longest first: 2 workers even out
    evidence.execute(todo, jobs, "horizon", OUT)


def report() -> dict:
    result = json.loads(EVIDENCE.read_text())
    runs = {}
    for name, (family, regime, row, seed, _) in RUNS.items():
        path = OUT / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        logs = record["logs"]
        evidence_runs = result["families"][family][regime][row]
        runs[name] = {
            "family": family, "regime": regime, "method": row, "seed": seed,
            "config": result["best_configs"][family][regime][row], "steps": record["settings"]["steps"],
            "accuracy": {e["step"]: round(e["accuracy"], 4) for e in record["evaluations"]},
            "evidence_initial": result["initial"][family][regime],
            "evidence_step60_seed": evidence_runs[seed], "evidence_step60_mean": statistics.fmean(evidence_runs),
            "reward_first20": round(statistics.fmean(e["reward"] for e in logs[:20]), 3),
            "reward_last20": round(statistics.fmean(e["reward"] for e in logs[-20:]), 3),
            "mismatch_first_last": [round(logs[0]["gap/mismatch_ratio"], 3), round(logs[-1]["gap/mismatch_ratio"], 3)]
            if "gap/mismatch_ratio" in logs[0] else None,
            "seconds": record["seconds"], "error": record["error"],
        }
    common.write_json(common.DOCS / "evidence_horizon.json", {"runs": runs, "horizon": HORIZON})
    rows = [("| run | configuration | steps | test accuracy (%) at each evaluation | evidence at step 60, "
             "this seed / mean of 5 (%) | reward first -> last 20 steps | mismatch first -> last |"),
            "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        curve = " / ".join(f"{step}: {100 * acc:.1f}" for step, acc in r["accuracy"].items())
        mismatch = "—" if r["mismatch_first_last"] is None else " -> ".join(map(str, r["mismatch_first_last"]))
        rows.append(f"| `{name}` | {evidence._config_text(r['config'])} | {r['steps']} | {curve} | "
                    f"{100 * r['evidence_step60_seed']:.1f} / {100 * r['evidence_step60_mean']:.1f} | "
                    f"{r['reward_first20']:.3f} -> {r['reward_last20']:.3f} | {mismatch} |")
    md = common.DOCS / "evidence_horizon.md"
    kept = md.read_text().partition(evidence.methods.INTERPRETATION_MARKER)[2] if md.exists() else ""
    md.write_text("\n".join([
        "# The evidence's configurations over a longer horizon (pilot)", "",
        ("Generated by `python benchmarks/pilots/evidence_horizon.py --report` (raw numbers: `evidence_horizon.json`). "
        "Each run is a final run of [evidence.md](evidence.md) (its setup, its 500 test problems, the configuration its "
        "tuning chose) with more steps: 300 for `column_sum`, 175 for `column_product` (its training split holds "
        "5,709 problems, 32 new ones a step). One seed per run unless named; a 500-problem evaluation has a standard "
        "error of about 1.8 points at 20%. `replica_*` repeats one evidence run at its own 60 steps."), "",
        *rows, "", evidence.methods.INTERPRETATION_MARKER, ""]) + kept.lstrip("\n"))
    return runs


if __name__ == "__main__":
    if sys.argv[1:] == ["--report"]:
        report()
    else:
        unknown = [name for name in sys.argv[1:] if name not in RUNS]
        if unknown:
            raise SystemExit(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
        run(sys.argv[1:] or list(RUNS))
