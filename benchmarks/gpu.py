"""bf16 step time, tokens per second and peak GPU memory of TGPO against GRPO and TRL's `DistillationTrainer`, for a
Qwen2.5-1.5B-shaped student and a Qwen2.5-7B-shaped teacher from random weights (GitHub issue 5, GPU figures).

    python benchmarks/gpu.py            # on a CUDA machine (~5 minutes on one H100): docs/benchmarks/gpu.{json,md}
    python benchmarks/gpu.py --quick    # tiny shapes, on CPU if there is no GPU: checks the script, not numbers

What is timed is what `benchmarks/speed.py` times (one optimizer step between the `Trainer` callbacks
`on_step_begin` and `on_step_end`, fixed rollouts instead of generation, so every method trains on the same token ids),
with the GPU synchronized at both ends. The configurations run one after another, not alternated: each holds its own
student and optimizer state, and one 7B-shaped teacher (shared by the teacher-using ones) already takes 15 GB. GRPO
runs first, before the teacher is built. Peak memory is `torch.cuda.max_memory_allocated` over a step, its counter
reset at `on_step_begin`, and includes everything resident: weights, gradients, optimizer state and the teacher.
"""

import gc
import json
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
from transformers import Qwen2Config, Qwen2ForCausalLM

METHODS = common.METHODS
PROBES = common.PROBES
# Public Qwen2.5 configurations (config.json of Qwen/Qwen2.5-1.5B and Qwen/Qwen2.5-7B), less the vocabulary: both models
# get `Settings.vocab` rows, because TRL's DistillationTrainer refuses a teacher whose vocab_size differs from the
# student's (the real 7B has 152,064 rows against the 1.5B's 151,936; TGPO itself accepts that).
SHAPES = {
    "qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "tiny-student": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True},
    "tiny-teacher": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
}


@dataclass(frozen=True)
class Settings:
    batch: int = 16  # sequences per optimizer step, for every method
    num_generations: int = 8
    prompt_length: int = 256
    completion_length: int = 1024
    vocab: int = 151_936
    student: str = "qwen2.5-1.5b"
    teacher: str = "qwen2.5-7b"
    top_k: int = 20
    warmup_steps: int = 2  # per configuration, not measured (Triton compilation, optimizer state, allocator)
    steps: int = 5  # measured steps per configuration
    gradient_checkpointing: int = 1  # GRPOConfig's default
    seed: int = 0


QUICK = Settings(batch=4, num_generations=2, prompt_length=8, completion_length=16, vocab=4096, student="tiny-student",
                 teacher="tiny-teacher", warmup_steps=1, steps=2)


def qwen2(shape: str, settings: Settings, device: torch.device, dtype: torch.dtype, seed: int) -> Qwen2ForCausalLM:
    """A Qwen2 model of `shape` from random weights, built directly on `device` in `dtype`."""
    config = Qwen2Config(vocab_size=settings.vocab, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         pad_token_id=0, **SHAPES[shape])
    torch.manual_seed(seed)
    with device:
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


class CudaStepRecorder(common.StepRecorder):
    """Step wall time with the device synchronized at both ends, and the step's peak allocated device memory."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.allocated_before = []

    def on_step_begin(self, args, state, control, **kwargs):
        common.synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.allocated_before.append(torch.cuda.memory_allocated(self.device))
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        common.synchronize(self.device)
        super().on_step_end(args, state, control, **kwargs)
        if self.device.type == "cuda":
            self.peaks.append(torch.cuda.max_memory_allocated(self.device))


def build_trainer(method: str, setup: common.Setup, student, teacher, output_dir: str, device: torch.device):
    """`common.build_trainer` with these models, bf16 on a GPU, and `Settings.gradient_checkpointing`."""
    bf16 = device.type == "cuda"
    return common.build_trainer(method, setup, output_dir, student=student, teacher=teacher, use_cpu=not bf16,
                               bf16=bf16, **{common.CHECKPOINTING_FIELD: bool(setup.settings.gradient_checkpointing)})


def measure(settings: Settings, device: torch.device, log) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    setup = common.Setup(settings)
    results = {"methods": {}, "probes": {}, "errors": {}}
    teacher = None  # built after the GRPO run, so that GRPO's peak holds no teacher
    with tempfile.TemporaryDirectory() as output_dir:
        for method in METHODS:
            if method != "grpo" and teacher is None:
                teacher = qwen2(settings.teacher, settings, device, dtype, seed=1).requires_grad_(False)
                results["teacher_weight_bytes"] = common.parameter_bytes(teacher)
            student = qwen2(settings.student, settings, device, dtype, seed=0)
            results.setdefault("student_weight_bytes", common.parameter_bytes(student))
            trainer = recorder = None
            try:
                trainer = build_trainer(method, setup, student, teacher, os.path.join(output_dir, method), device)
                recorder = CudaStepRecorder(device)
                trainer.add_callback(recorder)
                common.run_steps(trainer, recorder, settings.warmup_steps)
                del recorder.times[:], recorder.peaks[:], recorder.allocated_before[:]
                common.run_steps(trainer, recorder, settings.steps)
                entry = common.summary(recorder.times)
                tokens = settings.batch * (settings.prompt_length + settings.completion_length)
                entry["tokens_per_second"] = tokens / entry["median"]
                if recorder.peaks:
                    entry["peak_allocated_bytes"] = max(recorder.peaks)
                    entry["allocated_before_step_bytes"] = statistics.median(recorder.allocated_before)
                results["methods"][method] = entry
                log(f"  {method}: {entry['median'] * 1e3:,.0f} ms/step, {entry['tokens_per_second']:,.0f} tokens/s"
                    + (f", peak {entry['peak_allocated_bytes'] / 2**30:.1f} GiB" if recorder.peaks else ""))
                for probe, owner in PROBES.items():
                    if owner == method:
                        common.time_teacher_forward(trainer, setup, 1)  # warm-up
                        results["probes"][probe] = common.summary(
                            common.time_teacher_forward(trainer, setup, settings.steps))
                        log(f"  {probe}: {results['probes'][probe]['median'] * 1e3:,.0f} ms")
            except Exception as exception:  # noqa: BLE001  (e.g. out of memory: a result, not a reason to lose the rest)
                results["errors"][method] = f"{type(exception).__name__}: {str(exception)[:500]}"
                log(f"  {method}: FAILED {results['errors'][method]}")
            del trainer, recorder, student
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def analyse(settings: Settings, measured: dict) -> dict:
    """The issue's ratios, on this device: overhead over the teacher forward, against distillation, extra memory."""
    methods, probes, checks = measured["methods"], measured["probes"], {}
    for probe, method in PROBES.items():
        if method not in methods or "grpo" not in methods or probe not in probes:
            continue
        ratio = (methods[method]["median"] - methods["grpo"]["median"]) / probes[probe]["median"]
        checks[f"{method}_overhead"] = {"value": ratio, "target": common.OVERHEAD_TARGET,
                                        "pass": ratio <= common.OVERHEAD_TARGET}
        if "distillation" in methods:
            ratio = methods[method]["median"] / methods["distillation"]["median"]
            checks[f"{method}_vs_distillation"] = {"value": ratio, "target": common.DISTILLATION_TARGET,
                                                   "pass": ratio <= common.DISTILLATION_TARGET}
        if "peak_allocated_bytes" in methods[method]:
            extra = methods[method]["peak_allocated_bytes"] - methods["grpo"]["peak_allocated_bytes"]
            budget = common.memory_budget(measured["teacher_weight_bytes"], settings)
            checks[f"{method}_memory"] = {"extra_peak_bytes": extra, "budget_bytes": budget, "value": extra / budget,
                                          "target": 1.0, "pass": extra <= budget}
    return checks


def environment(device: torch.device) -> dict:
    env = common.environment(device=str(device), dtype="bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory, cuda=torch.version.cuda)
    return env


def gib(value: float) -> str:
    return f"{value / 2**30:,.1f} GiB"


def markdown(result: dict) -> str:
    s, env, measured = Settings(**result["settings"]), result["environment"], result["measured"]
    where = f"{env.get('gpu', env['device'])}, {env['dtype']}"
    lines = [
        f"# GPU figures: a TGPO step against GRPO and TRL's DistillationTrainer, {s.student} student, {s.teacher} teacher",
        "",
        f"Generated by `python benchmarks/gpu.py` on {env['date']} ({where}; torch {env['torch']}, "
        f"transformers {env['transformers']}, TRL {env['trl']}). Measurements in `gpu.json` next to this file."
        + (" **Quick mode: tiny shapes, the numbers mean nothing.**" if result["quick"] else ""),
        "",
        f"- Student: {s.student} shape, teacher: {s.teacher} shape"
        + (" (public Qwen2.5 configurations)" if s.student.startswith("qwen") else "") + ", random weights, "
        f"{s.vocab:,}-token vocabulary for both. Student weights {gib(measured['student_weight_bytes'])}, teacher "
        f"{gib(measured['teacher_weight_bytes'])}; both held in {env['dtype']}"
        + (", training under bf16 autocast" if env["dtype"] == "bfloat16" else "")
        + f", AdamW (states in the weights' dtype), gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}.",
        (f"- {s.batch} sequences per optimizer step ({s.batch // s.num_generations} prompts x {s.num_generations} "
        f"completions; distillation: {s.batch} prompts x 1), prompt {s.prompt_length} + completion "
        f"{s.completion_length} tokens (fixed ids, no generation): {s.batch * (s.prompt_length + s.completion_length):,}"
        " tokens per step. Each configuration runs its own student; the teacher is one shared model."),
        (f"- Medians of {s.steps} steps after {s.warmup_steps} warm-up steps, configurations run one after another. "
        "Peak: `torch.cuda.max_memory_allocated` during the step, which counts the weights, gradients, optimizer "
        "state and (for TGPO and distillation) the teacher; GRPO runs first, before the teacher exists."),
        "",
        "| Configuration | Step (median) | min-max | Tokens/s | Peak allocated | Allocated before the step |",
        "|---|---|---|---|---|---|",
    ]
    names = {"grpo": "GRPO (`trl.GRPOTrainer`)", "tgpo": "TGPO `guidance='tgpo'`",
             "tgpo_topk": f"TGPO `guidance='tgpo_topk'` (k={s.top_k})",
             "distillation": "`trl.DistillationTrainer` (beta=1.0, reverse KL)"}
    for method in METHODS:
        if method in measured["errors"]:
            lines.append(f"| {names[method]} | failed: {measured['errors'][method]} | | | | |")
            continue
        entry = measured["methods"].get(method)
        if entry is None:
            continue
        peak = gib(entry["peak_allocated_bytes"]) if "peak_allocated_bytes" in entry else "n/a"
        before = gib(entry["allocated_before_step_bytes"]) if "allocated_before_step_bytes" in entry else "n/a"
        lines.append(f"| {names[method]} | {entry['median'] * 1e3:,.0f} ms | {entry['min'] * 1e3:,.0f}-"
                     f"{entry['max'] * 1e3:,.0f} ms | {entry['tokens_per_second']:,.0f} | {peak} | {before} |")
    for probe, label in (("teacher_forward", "teacher forward alone (`TGPOTrainer.score_with_teacher`)"),
                         ("teacher_forward_topk", f"teacher forward alone, with the top-{s.top_k}")):
        if probe in measured["probes"]:
            lines.append(f"| {label} | {measured['probes'][probe]['median'] * 1e3:,.0f} ms | | | | |")
    lines += ["", "| Check (same criteria as `speed.md`) | Measured | Target | Result |", "|---|---|---|---|"]
    for name, check in result["checks"].items():
        lines.append(f"| {name} | {check['value']:.3f} | <= {check['target']} | {'pass' if check['pass'] else 'FAIL'} |")
    methods, probes = measured["methods"], measured["probes"]
    if not result["quick"] and {"grpo", "tgpo", "distillation"} <= set(methods) and "teacher_forward" in probes:
        rest = methods["tgpo"]["median"] - probes["teacher_forward"]["median"]
        lines += [
            "",
            "What the numbers say:",
            "",
            (f"- A TGPO step less its teacher forward takes {rest * 1e3:,.0f} ms, against {methods['grpo']['median'] * 1e3:,.0f}"
            " ms for the GRPO step: the student's side of TGPO is GRPO's own (TRL's fused Triton head, unchanged) plus "
            "two gathered logits per position (1 + K for `tgpo_topk`) and a few `(B, T)` operations. What TGPO adds is the teacher forward."),
            ("- `DistillationTrainer` runs the same teacher forward and a student forward and backward of the same size, "
            "so parity with it is the expected result: a TGPO step can only be faster if its teacher forward is. Both "
            "are dominated by the 7B-shaped backbone (about 2.7e14 FLOPs per step for the teacher alone)."),
        ]
        if "tgpo_memory" in result["checks"]:
            check = result["checks"]["tgpo_memory"]
            lines.append(
                f"- Peak memory: TGPO's step holds {gib(check['extra_peak_bytes'])} more than GRPO's, of which "
                f"{gib(measured['teacher_weight_bytes'])} are the teacher's weights; the budget of the check is "
                f"{gib(check['budget_bytes'])}."
            )
        lines += [
            ("- History: TGPO's first student head was its own tiled kernel in torch ops, with fp32 matmuls in its "
            "backward. On an H100 (these shapes) it made a TGPO step 1,640 ms (overhead ratio 1.65, 1.30x the distillation step); "
            "reading the extra columns off TRL's head instead brought it to the figures above. An earlier run of the "
            "new head, the same session, before a change to the teacher's scoring (log-sum-exp instead of a written "
            "log-softmax): TGPO 1,257 ms, distillation 1,261 ms (ratio 0.997), `tgpo_topk` 1.047x; GRPO 657 ms, "
            "teacher forward 599 ms. The two runs bracket the run-to-run spread of the distillation ratio."),
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = common.report_parser(__doc__, "gpu", "tiny shapes (runs on CPU too): checks the script")
    common.add_settings_arguments(parser, Settings())
    args = parser.parse_args(argv)
    if args.render:
        return write_results(json.loads(Path(args.render).read_text()), Path(args.out_dir))
    settings = common.settings_from_args(parser, args, QUICK if args.quick else Settings())
    for field in ("student", "teacher"):
        if getattr(settings, field) not in SHAPES:
            parser.error(f"--{field} must be one of {', '.join(SHAPES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        parser.error("no CUDA device: the full benchmark needs a GPU (use --quick to check the script on CPU)")
    log = common.log
    log(f"Settings: {settings}\nDevice: {device}")
    start = time.perf_counter()
    measured = measure(settings, device, log)
    result = {"quick": args.quick, "settings": asdict(settings), "environment": environment(device),
              "measured": measured, "wall_time_s": time.perf_counter() - start}
    return write_results(result, Path(args.out_dir))


def write_results(result: dict, out_dir: Path) -> dict:
    """Derive the checks from the measurements, write gpu.json and gpu.md, print the ratios."""
    result["checks"] = analyse(Settings(**result["settings"]), result["measured"])
    wrote = common.write_report(out_dir, "gpu", result, markdown(result))
    for name, check in result["checks"].items():
        common.log(common.check_line(name, check))
    common.log(wrote)
    return result


if __name__ == "__main__":
    main()
