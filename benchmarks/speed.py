"""Per-step time and peak memory of a TGPO step against a GRPO step and TRL's `DistillationTrainer` (GitHub issue 5).

    python benchmarks/speed.py            # the full benchmark (CPU, ~10 minutes): docs/benchmarks/speed.{json,md}
    python benchmarks/speed.py --quick    # a reduced run (~1 minute) that checks the script, not the numbers
    python benchmarks/speed.py --help     # every setting

What is timed: one optimizer step as the trainer runs it (`Trainer` callbacks `on_step_begin` to `on_step_end`):
rollout, rewards, teacher scoring (TGPO), the loss forward, the backward, gradient clipping and the optimizer step.
Generation is replaced by fixed completions (a `rollout_func` for GRPO and TGPO, overridden generation methods for
`DistillationTrainer`): every method gets the same token ids every step, so the only differences are the methods'
own work. The denominator of the overhead ratio, one teacher forward over the same batch, is
`TGPOTrainer.score_with_teacher` timed alone. All trainers live in one process and their runs are alternated
(the order rotates every round); figures are medians over the rounds, the first round being a discarded warm-up.

Peak memory: each configuration runs in a fresh process forked from one preloaded server (`multiprocessing`
forkserver), where glibc's mmap threshold is pinned at 128 KiB so freed tensors go back to the OS and the resident set
follows the live bytes. The peak of a step is the kernel's high-water mark (`VmHWM`, reset through
`/proc/self/clear_refs` at `on_step_begin`) read at `on_step_end`. A TGPO step's extra peak memory is its peak minus a
GRPO step's peak: it includes the teacher's weights, which a TGPO process holds and a GRPO one does not.
"""

import ctypes
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks`, `tgpo_trl`
# first: it sets the offline environment before transformers and TRL load
from benchmarks import common

# isort: split
import torch

from tgpo_trl.lm_head import TEACHER_CHUNK_ELEMENTS

METHODS = common.METHODS
# Timed too, not part of the checks: TGPO with `guidance='none'`, where the teacher still scores every rollout
# (for the gap metrics) but there is no guidance term, so `tgpo_none - teacher forward` is GRPO's step as TGPOTrainer
# runs it: the baseline of the supplementary ratio below
TIMED_METHODS = METHODS + ("tgpo_none",)
PROBES = common.PROBES
MMAP_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class Settings:
    batch: int = 8  # sequences per optimizer step, for every method
    num_generations: int = 4  # GRPO/TGPO group size (batch / num_generations prompts)
    prompt_length: int = 8
    completion_length: int = 48
    vocab: int = 151_936  # Qwen2.5's embedding rows; the tokenizer has as many ids
    student_hidden: int = 64
    student_layers: int = 2
    teacher_hidden: int = 128
    teacher_layers: int = 4
    heads: int = 4
    top_k: int = 20  # guidance_top_k of tgpo_topk
    threads: int = 1  # torch intra-op threads
    rounds: int = 7  # measured rounds (after one warm-up round)
    steps_per_run: int = 1  # optimizer steps (or teacher forwards) per run in a round
    memory_steps: int = 2  # measured steps per memory process (after one warm-up step)
    seed: int = 0


QUICK = Settings(
    batch=4, num_generations=2, prompt_length=8, completion_length=16, vocab=8192, student_hidden=32, student_layers=1,
    teacher_hidden=48, teacher_layers=1, rounds=2, memory_steps=1,
)


# ---------------------------------------------------------------------------------------------------- measuring


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set


def memory_supported() -> bool:
    try:
        _reset_peak_rss()
        return _proc_status_kib("VmHWM") > 0
    except OSError:
        return False


class RssStepRecorder(common.StepRecorder):
    """Step wall time and the step's resident-set high-water mark (and the resident set just before the step)."""

    def __init__(self):
        super().__init__()
        self.rss_before = []

    def on_step_begin(self, args, state, control, **kwargs):
        gc.collect()
        self.rss_before.append(_proc_status_kib("VmRSS") * 1024)
        _reset_peak_rss()
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.peaks.append(_proc_status_kib("VmHWM") * 1024)


def measure_time(settings: Settings, log) -> dict:
    setup = common.Setup(settings)
    with tempfile.TemporaryDirectory() as output_dir:
        trainers, recorders = {}, {}
        for method in TIMED_METHODS:
            trainers[method] = common.build_trainer(method, setup, os.path.join(output_dir, method))
            recorders[method] = common.StepRecorder()
            trainers[method].add_callback(recorders[method])
        items = list(TIMED_METHODS) + list(PROBES)
        rounds = {item: [] for item in items}  # per round: the median of the run's steps
        for round_index in range(settings.rounds + 1):
            shift = round_index % len(items)
            order = items[shift:] + items[:shift]
            per_round = {}
            for item in order:
                gc.collect()
                if item in PROBES:
                    per_round[item] = common.time_teacher_forward(trainers[PROBES[item]], setup, settings.steps_per_run)
                else:
                    per_round[item] = common.run_steps(trainers[item], recorders[item], settings.steps_per_run)
            label = "warm-up" if round_index == 0 else f"round {round_index}/{settings.rounds}"
            log(f"  {label}: " + ", ".join(f"{item} {statistics.median(per_round[item]):.3f}s" for item in items))
            if round_index > 0:
                for item in items:
                    rounds[item].append(statistics.median(per_round[item]))
    return {item: common.summary(values) for item, values in rounds.items()}


def memory_worker(method: str, settings: Settings) -> dict:
    """In a fresh process: warm one step up, then the resident-set peak of `memory_steps` steps of `method`."""
    libc = ctypes.CDLL("libc.so.6")
    # M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1): every allocation above 128 KiB is its own mapping, unmapped when
    # freed, so the resident set follows the live tensors (glibc otherwise keeps freed heap memory at will)
    pinned = bool(libc.mallopt(-3, MMAP_THRESHOLD)) and bool(libc.mallopt(-1, MMAP_THRESHOLD))
    torch.set_num_threads(settings.threads)
    setup = common.Setup(settings)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = common.build_trainer(method, setup, output_dir)
        recorder = RssStepRecorder()
        trainer.add_callback(recorder)
        common.run_steps(trainer, recorder, 1)  # warm-up: the optimizer's state is allocated here
        del recorder.times[:], recorder.rss_before[:], recorder.peaks[:]
        common.run_steps(trainer, recorder, settings.memory_steps)
        teacher = getattr(trainer, "teacher_model", None)
        teacher_bytes = 0 if teacher is None else common.parameter_bytes(teacher)
    return {
        "rss_before_step_bytes": statistics.median(recorder.rss_before),
        "peak_bytes": statistics.median(recorder.peaks),
        "step_growth_bytes": statistics.median(p - b for p, b in zip(recorder.peaks, recorder.rss_before)),
        "peak_samples_bytes": recorder.peaks,
        "teacher_weight_bytes": teacher_bytes,
        "malloc_mmap_threshold_pinned": pinned,
    }


def measure_memory(settings: Settings, log) -> dict | None:
    if not memory_supported():
        log("  /proc/self/clear_refs is not writable here: no memory figures")
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__"])  # the imports, once; each configuration gets a fresh fork
    results = {}
    for method in METHODS:
        with context.Pool(1, maxtasksperchild=1) as pool:
            results[method] = pool.apply(memory_worker, (method, settings))
        log(f"  {method}: peak {results[method]['peak_bytes'] / 2**20:.0f} MiB, "
            f"step growth {results[method]['step_growth_bytes'] / 2**20:.0f} MiB")
    return results


# ---------------------------------------------------------------------------------------------------- results


def analyse(settings: Settings, times: dict, memory: dict | None) -> dict:
    checks = {}
    grpo = times["grpo"]["median"]
    for probe, method in PROBES.items():
        extra = times[method]["median"] - grpo
        teacher = times[probe]["median"]
        paired = [
            (m - g) / t for m, g, t in zip(times[method]["samples"], times["grpo"]["samples"], times[probe]["samples"])
        ]
        ratio = extra / teacher
        checks[f"{method}_overhead"] = {
            "criterion": f"({method} step - grpo step) / teacher forward <= {common.OVERHEAD_TARGET}",
            "extra_step_s": extra, "teacher_forward_s": teacher, "value": ratio,
            "paired_rounds_median": statistics.median(paired), "target": common.OVERHEAD_TARGET,
            "pass": ratio <= common.OVERHEAD_TARGET,
        }
        ratio = times[method]["median"] / times["distillation"]["median"]
        checks[f"{method}_vs_distillation"] = {
            "criterion": f"{method} step / distillation step <= {common.DISTILLATION_TARGET}",
            "value": ratio, "target": common.DISTILLATION_TARGET, "pass": ratio <= common.DISTILLATION_TARGET,
        }
    if memory is not None:
        tensor_bytes = common.logits_tensor_bytes(settings)
        for method in PROBES.values():
            teacher_bytes = memory[method]["teacher_weight_bytes"]
            budget = common.memory_budget(teacher_bytes, settings)
            extra = memory[method]["peak_bytes"] - memory["grpo"]["peak_bytes"]
            checks[f"{method}_memory"] = {
                "criterion": f"{method} step peak - grpo step peak <= teacher weights + {common.MEMORY_FRACTION:g} x "
                             "(batch, completion length, vocab) float32",
                "extra_peak_bytes": extra, "teacher_weight_bytes": teacher_bytes,
                "logits_tensor_bytes": tensor_bytes, "budget_bytes": budget, "value": extra / budget, "target": 1.0,
                "pass": extra <= budget,
            }
    return checks


def same_head_ratios(times: dict) -> dict:
    """
    The overhead ratio against `tgpo_none` minus its teacher forward (GRPO's step as TGPOTrainer runs it) instead of
    `trl.GRPOTrainer`'s step: what the guidance term costs beyond the teacher forward. Not an issue check. (The name
    dates from when TGPO had its own student head; the student head is now TRL's in every configuration.)
    """
    base = times["tgpo_none"]["median"] - times["teacher_forward"]["median"]
    bases = [n - t for n, t in zip(times["tgpo_none"]["samples"], times["teacher_forward"]["samples"])]
    ratios = {}
    for probe, method in PROBES.items():
        teacher = times[probe]["median"]
        paired = [(m - b) / t for m, b, t in zip(times[method]["samples"], bases, times[probe]["samples"])]
        ratios[method] = {"tgpo_none_less_teacher_forward_s": base, "teacher_forward_s": teacher,
                          "value": (times[method]["median"] - base) / teacher,
                          "paired_rounds_median": statistics.median(paired)}
    return ratios


def environment() -> dict:
    return common.cpu_environment(gpu="not used here: the GPU figures are in gpu.json")


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def markdown(result: dict) -> str:
    s = result["settings"]
    env = result["environment"]
    times = result["time_per_step_s"]
    checks = result["checks"]
    memory = result["memory"]
    same_head = result["same_head_ratios"]
    threads = f"{env['torch_threads']} torch thread{'s' if env['torch_threads'] != 1 else ''}"
    labels = {
        "grpo": "GRPO (`trl.GRPOTrainer`)", "tgpo": "TGPO `guidance='tgpo'`",
        "tgpo_topk": f"TGPO `guidance='tgpo_topk'` (k={s['top_k']})",
        "tgpo_none": "TGPO `guidance='none'` with the teacher (scoring for the gap metrics, no guidance term)",
        "distillation": "`trl.DistillationTrainer` (beta=1.0, reverse KL)",
        "teacher_forward": "teacher forward alone (`score_completions`: argmax, log p_T(y_t))",
        "teacher_forward_topk": f"teacher forward alone, with the top-{s['top_k']}",
    }
    lines = [
        "# Speed and memory: a TGPO step against GRPO and TRL's DistillationTrainer",
        "",
        (f"Generated by `python benchmarks/speed.py{' --quick' if result['quick'] else ''}` on {env['date']} "
        "(GitHub issue 5, part 2). The measurements are in `speed.json` next to this file."),
        "",
        (f"**Device: CPU** ({env['cpu_count']} cores shared with other jobs, float32, {threads}). The bf16 figures on a "
        "GPU (a Qwen2.5-1.5B-shaped student, a 7B-shaped teacher) are in [gpu.md](gpu.md): there TRL's fused head "
        "runs Triton kernels that score only the completion positions, and the backbones dominate the step."),
        "",
        "## Results",
        "",
        "| Check | Measured | Target | Result |",
        "|---|---|---|---|",
    ]
    for name, check in checks.items():
        if name.endswith("_overhead"):
            measured = (f"{check['value']:.2f} (extra {check['extra_step_s'] * 1e3:+,.0f} ms / teacher forward "
                        f"{check['teacher_forward_s'] * 1e3:,.0f} ms; paired rounds: {check['paired_rounds_median']:.2f})")
            target = f"<= {check['target']}"
        elif name.endswith("_vs_distillation"):
            measured = f"{check['value']:.2f}x the distillation step"
            target = "<= 1.00x"
        else:
            measured = (f"{mib(check['extra_peak_bytes'])} (budget {mib(check['budget_bytes'])} = teacher "
                        f"{mib(check['teacher_weight_bytes'])} + {common.MEMORY_FRACTION:g} x {mib(check['logits_tensor_bytes'])})")
            target = "<= budget"
        lines.append(f"| {check['criterion']} | {measured} | {target} | {'pass' if check['pass'] else '**FAIL**'} |")

    lines += ["", "What the numbers say:", ""]
    lines.append(
        "- TGPO's student forward *is* GRPO's: TRL's fused head, unchanged (`tgpo_trl.lm_head.StudentLogProbs`). The "
        "teacher's token is read off it as `log p(c) = log p(y) + z_c - z_y`, two gathered logits per position (1 + K for the top-k modes), so "
        "what a TGPO step adds to a GRPO step is the teacher forward and a few `(B, T)` operations. On this CPU, with "
        "tiny backbones and a 151,936-token vocabulary, the LM heads are most of the step and the rounds vary by "
        "hundreds of milliseconds (min/max columns): ratios near 1.0 are within that noise."
    )
    lines.append(
        "- `tgpo_none` (TGPO with `guidance='none'`: the teacher scores every rollout for the gap metrics, no guidance "
        f"term): `tgpo_none - teacher forward` = {same_head['tgpo']['tgpo_none_less_teacher_forward_s'] * 1e3:,.0f} ms against "
        f"{times['grpo']['median'] * 1e3:,.0f} ms for GRPO; `(TGPO step - that) / teacher forward` is "
        + " and ".join(f"{r['value']:.2f} for `{m}` (paired rounds: {r['paired_rounds_median']:.2f})"
                       for m, r in same_head.items())
        + " (supplementary, not an issue check)."
    )
    lines.append(
        "- DistillationTrainer's reverse KL projects the student's *and* the teacher's full-vocabulary logits in its "
        "divergence kernel, in the forward and again in the backward; TGPO's teacher runs once, without gradients, "
        "and keeps only what the guidance needs."
    )
    if memory is not None:
        positions = s["batch"] * s["completion_length"]
        chunk = min(positions, TEACHER_CHUNK_ELEMENTS // s["vocab"]) * s["vocab"] * 4
        lines.append(
            f"- Memory: a TGPO step grows the resident set by {mib(memory['tgpo']['step_growth_bytes'])}, against "
            f"{mib(memory['grpo']['step_growth_bytes'])} for GRPO. On top of GRPO's head, TGPO's step holds the "
            f"teacher's scoring chunk ({mib(chunk)} of fp32 logits and the temporaries of their log-sum-exp, "
            "`TEACHER_CHUNK_ELEMENTS`). The chunk is capped by a fixed number of logits, so its size does not grow with "
            "the batch, while the allowance of the check (a quarter of the batch's logits tensor) does."
        )

    lines += [
        "",
        f"### Time per optimizer step (median of {s['rounds']} alternated rounds)",
        "",
        "| Configuration | Median | Min | Max |",
        "|---|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(f"| {labels[name]} | {t['median'] * 1e3:,.0f} ms | {t['min'] * 1e3:,.0f} ms | "
                     f"{t['max'] * 1e3:,.0f} ms |")
    lines.append("")
    for probe, method in PROBES.items():
        rest = times[method]["median"] - times[probe]["median"]
        lines.append(f"- {labels[method]} minus its teacher forward: {rest * 1e3:,.0f} ms, against "
                     f"{times['grpo']['median'] * 1e3:,.0f} ms for the GRPO step "
                     f"({(rest - times['grpo']['median']) * 1e3:+,.0f} ms).")
    if memory is not None:
        lines += [
            "",
            f"### Resident memory of a step (a fresh process per configuration, median of {s['memory_steps']} steps)",
            "",
            "| Configuration | Before the step | Peak during the step | Growth during the step | Peak - GRPO's peak |",
            "|---|---|---|---|---|",
        ]
        for name, m in memory.items():
            lines.append(f"| {labels[name]} | {mib(m['rss_before_step_bytes'])} | {mib(m['peak_bytes'])} | "
                         f"{mib(m['step_growth_bytes'])} | {mib(m['peak_bytes'] - memory['grpo']['peak_bytes'])} |")
    else:
        lines += ["", "Memory was not measured (`/proc/self/clear_refs` is not writable on this machine)."]
    load = env["load_average"]
    lines += [
        "",
        "## Settings",
        "",
        (f"- {s['batch']} sequences per optimizer step for every method (GRPO/TGPO: {s['batch'] // s['num_generations']}"
        f" prompts x {s['num_generations']} completions; distillation: {s['batch']} prompts x 1). Prompt "
        f"{s['prompt_length']} tokens, completion {s['completion_length']} tokens (fixed ids, no EOS), one gradient "
        "accumulation step, one generation per optimizer step, `num_iterations=1`."),
        (f"- Vocabulary {s['vocab']:,} for the student, the teacher and the tokenizer (a character tokenizer padded "
        "with synthetic tokens to that size). Tiny Qwen2 models (`tgpo_trl.demo.models.tiny_qwen2`, untied "
        f"embeddings): student hidden {s['student_hidden']} x {s['student_layers']} layers, teacher hidden "
        f"{s['teacher_hidden']} x {s['teacher_layers']} layers, {s['heads']} heads."),
        (f"- float32, no autocast, no gradient checkpointing, AdamW (lr 1e-6), `max_grad_norm=1.0`; {threads} "
        f"(`torch.set_num_threads`, chosen so that a busy neighbour slows a step down instead of stalling a "
        f"parallel region), {env['torch_interop_threads']} inter-op thread. torch {env['torch']}, transformers "
        f"{env['transformers']}, TRL {env['trl']}, Python {env['python']}. Load average at the start: "
        f"{', '.join(f'{x:.1f}' for x in load) if load else 'n/a'}; the benchmark took "
        f"{result['wall_time_s'] / 60:.1f} minutes."),
        (f"- {s['rounds']} measured rounds after one warm-up round. A round runs every configuration for "
        f"{s['steps_per_run']} step(s) (the teacher probes: as many forwards) in an order that rotates every round, "
        "so contention from other jobs hits every configuration alike. Medians are over rounds; the paired-rounds "
        "figures are the median of the ratio computed within each round."),
        "",
        "## Method",
        "",
        ("- **One step** is what `Trainer` runs between `on_step_begin` and `on_step_end`: `_prepare_inputs` (the "
        "rollout, the rewards and, for TGPO, the teacher's scoring forward), the loss forward, the backward, gradient "
        "clipping, the optimizer and scheduler steps. `Trainer.train`'s setup and logging are outside it."),
        ("- **No sampling noise.** GRPO and TGPO get a `rollout_func` that returns the same fixed prompt and completion "
        "ids every step; `DistillationTrainer` (which takes no `rollout_func`) gets the same ids through overridden "
        "`_tokenize_prompts` and `_generate_single_turn`. Its loss path is TRL's own: student and teacher backbones, "
        "then TRL's chunked generalized-JSD kernel with `beta=1.0` (reverse KL over the full vocabulary). Every "
        "method trains on the same token ids, and generation costs all of them the same, next to nothing."),
        ("- **The overhead ratio** is `(median TGPO step - median GRPO step) / median teacher forward`. The teacher "
        "forward is `TGPOTrainer.score_with_teacher` over the same batch, the call a training step makes (with top-k "
        "for `tgpo_topk`)."),
        ("- **Memory.** Each configuration runs in its own process, forked from one server that has done the imports "
        "(`multiprocessing` forkserver). glibc's mmap threshold is pinned at 128 KiB (`mallopt`), so freed tensors "
        "leave the resident set. After one warm-up step, which allocates the optimizer state, the kernel's resident "
        "high-water mark (`VmHWM`) is reset through `/proc/self/clear_refs` at `on_step_begin` and read at "
        "`on_step_end`. *Extra peak* = TGPO's peak - GRPO's peak, so it includes the teacher's weights, which are "
        "resident in the TGPO process and absent from the GRPO one. The budget takes the completion length as the "
        "tensor's length, the stricter reading (prompt + completion would give a larger budget)."),
        ("- Tiny models with a 151,936-token vocabulary make the LM heads (the student's projection, the teacher's "
        "scoring) most of every step: the student's head, which TGPO shares with GRPO, and the teacher's scoring, which "
        "TGPO adds. These ratios stress the vocabulary-sized work; with real models the backbones dilute every "
        "difference."),
        "",
        "## Changes made because of these measurements",
        "",
        ("- TGPO's student head was its own tiled kernel (all `1 + K` columns and the log-partition in torch ops). It "
        "was faster than TRL's torch fallback on the CPU, but on an H100 its fp32 backward matmuls made a TGPO step "
        "1.65 teacher forwards slower than GRPO (and 1.30x DistillationTrainer's step, see gpu.md). It was replaced "
        "by TRL's own fused head plus the two-gather identity above; on the H100 the ratio fell to 1.00-1.02."),
        ("- The teacher's scoring reads argmax, `log p_T(y_t)` and the top-k off the logits and their log-sum-exp "
        "instead of writing a `(rows, vocab)` log-softmax, and flags a row whose log-sum-exp is not finite (NaN or "
        "+inf anywhere in it)."),
        ("- Multiplications by a `logit_scale` or a `1 / temperature` of 1.0 are skipped: on a vocabulary-wide tile "
        "each is a full pass and an allocation."),
        "",
        ("Reproduce: `python benchmarks/speed.py` (full), `--quick` (the test's reduced run), `--render "
        "docs/benchmarks/speed.json` (rewrite this page from stored measurements), `--help` for every setting."),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = common.report_parser(__doc__, "speed", "a reduced run (~1 minute): checks the script")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    common.add_settings_arguments(parser, Settings(), QUICK)
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.render), Path(args.out_dir))
    settings = common.settings_from_args(parser, args, QUICK if args.quick else Settings())
    log = common.log

    env = common.start_cpu_run(settings, environment)
    start = time.perf_counter()
    log("Timing (alternated rounds):")
    times = measure_time(settings, log)
    memory = None
    if not args.no_memory:
        log("Peak memory (one fresh process per configuration):")
        memory = measure_memory(settings, log)
    result = {
        "quick": args.quick, "settings": asdict(settings), "environment": env, "time_per_step_s": times,
        "memory": memory, "wall_time_s": time.perf_counter() - start,
    }
    return write_results(result, Path(args.out_dir))


def write_results(result: dict, out_dir: Path) -> dict:
    """Derive the checks from the measurements, write speed.json and speed.md, print the ratios."""
    settings = Settings(**result["settings"])
    result["checks"] = analyse(settings, result["time_per_step_s"], result["memory"])
    result["same_head_ratios"] = same_head_ratios(result["time_per_step_s"])
    wrote = common.write_report(out_dir, "speed", result, markdown(result))
    print("\nRatios:")
    for name, check in result["checks"].items():
        print(common.check_line(name, check))
    for method, ratio in result["same_head_ratios"].items():
        print(f"  {method}_overhead_over_tgpo_none (supplementary, not a check): {ratio['value']:.3f}")
    common.log(wrote)
    return result


def render(path: Path, out_dir: Path) -> dict:
    """Rewrite the results of an earlier run (e.g. after a change to the report's wording), measuring nothing."""
    result = json.loads(path.read_text())
    measured = {key: result[key] for key in ("quick", "settings", "environment", "time_per_step_s", "memory",
                                              "wall_time_s")}
    return write_results(measured, out_dir)


if __name__ == "__main__":
    main()
    sys.exit(0)
