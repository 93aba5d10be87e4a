"""What the benchmarks (`methods.py`, `speed.py`, `gpu.py`) share.

- the offline environment (set on import, before torch and TRL load) and the paths (`REPO`, `DOCS`);
- summary statistics, JSON and report writing, the description of the software a run used;
- the command line of a benchmark whose settings are a dataclass (one flag per field);
- the step-timing harness of the speed and GPU benchmarks: fixed rollouts instead of generation, one trainer builder
  for GRPO, TGPO and TRL's `DistillationTrainer`, a callback that times each optimizer step, the teacher-forward probe,
  and the issue's criteria (`OVERHEAD_TARGET`, `DISTILLATION_TARGET`, `MEMORY_FRACTION`).

A benchmark puts the repository root on `sys.path` (for `benchmarks` and `tgpo_trl`) and imports this module before
anything that loads torch.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the speed benchmark's memory workers are forked

import torch
import transformers
import trl
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

from tgpo_trl import CHECKPOINTING_FIELD, TGPOConfig, TGPOTrainer
from tgpo_trl.demo.models import tiny_qwen2
from tgpo_trl.demo.tokenizer import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks"  # where every benchmark writes its JSON and Markdown by default


# ---------------------------------------------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict:
    """Median, min, max and count of step times, and the samples themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "samples": values}


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (0.0 for one value), min, max and count of the values that are not NaN (a run
    that stopped early); NaN figures and `n` 0 where there are none."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


# ---------------------------------------------------------------------------------------------------- outputs


def log(message: str) -> None:
    print(message, flush=True)


def write_json(path: Path, data) -> None:
    """`data` as indented JSON with a final newline (the format of every file in docs/benchmarks)."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_report(out_dir: Path, name: str, result: dict, markdown: str) -> str:
    """Write `<name>.json` (the result) and `<name>.md` in `out_dir`; the line that says so."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", result)
    (out_dir / f"{name}.md").write_text(markdown)
    return (f"Wrote {out_dir / f'{name}.json'} and {out_dir / f'{name}.md'} ({result['wall_time_s']:.0f} s of "
            "measurement)")


def check_line(name: str, check: dict) -> str:
    """One printed line per check: its value, its target and its verdict."""
    return f"  {name}: {check['value']:.3f} (target <= {check['target']}): {'pass' if check['pass'] else 'FAIL'}"


def environment(**extra) -> dict:
    """When the run was made and the versions it ran on, followed by `extra` (the benchmark's own fields)."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, **extra,
    }


def cpu_environment(**extra) -> dict:
    """`environment` of a CPU run: the platform, the cores and torch's threads, and the load average at the start
    (other jobs on a shared machine show there), then `extra`."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return environment(
        platform=platform.platform(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(), device="cpu", dtype="float32", load_average=load,
        **extra,
    )


def start_cpu_run(settings, environment_fn) -> dict:
    """Set torch's threads from `settings.threads` (one inter-op thread), then describe the run with
    `environment_fn()` (a `cpu_environment`), log it with the settings, and return it."""
    torch.set_num_threads(settings.threads)
    torch.set_num_interop_threads(1)
    env = environment_fn()
    log(f"Settings: {settings}\ntorch threads: {env['torch_threads']}, load average: {env['load_average']}")
    return env


# ---------------------------------------------------------------------------------------------------- command line


def argument_parser(doc: str, formatter_class=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a benchmark's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=formatter_class)


def report_parser(doc: str, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags of a benchmark that writes `<name>.json` and `<name>.md`: `--quick`, `--out-dir` and `--render`."""
    parser = argument_parser(doc)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out-dir", default=str(DOCS),
                        help=f"where {name}.json and {name}.md are written (default: docs/benchmarks)")
    parser.add_argument("--render", metavar="JSON", help=f"measure nothing: recompute the checks and rewrite "
                        f"{name}.json and {name}.md in --out-dir from the measurements of an earlier {name}.json")
    return parser


def add_settings_arguments(parser: argparse.ArgumentParser, defaults, quick=None) -> None:
    """One `--field-name` flag per field of the `defaults` dataclass, of the field's type; None (not given) keeps the
    field's value. `quick`: the `--quick` settings, named in the help."""
    for name, value in asdict(defaults).items():
        note = "" if quick is None else f" ({getattr(quick, name)} with --quick)"
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None, help=f"default {value}{note}")


def settings_from_args(parser: argparse.ArgumentParser, args, base):
    """`base` with the fields given on the command line replaced; a batch that is not whole groups is refused."""
    settings = replace(base, **{name: getattr(args, name) for name in asdict(base) if getattr(args, name) is not None})
    if settings.batch % settings.num_generations:
        parser.error("--batch must be a multiple of --num-generations")
    return settings


# ---------------------------------------------------------------------------------------------------- the step harness


METHODS = ("grpo", "tgpo", "tgpo_topk", "distillation")  # the trainers the speed and GPU benchmarks compare
# Timed alone: one teacher forward over the step's batch, as TGPO runs it (`tgpo` keeps argmax and log p_T(y_t),
# `tgpo_topk` also the top-k); each probe runs on the trainer of its method
PROBES = {"teacher_forward": "tgpo", "teacher_forward_topk": "tgpo_topk"}
OVERHEAD_TARGET = 1.25  # (TGPO step - GRPO step) / teacher forward
DISTILLATION_TARGET = 1.0  # TGPO step / DistillationTrainer step
MEMORY_FRACTION = 0.25  # of one (batch, completion length, vocab) float32 tensor, on top of the teacher's weights


class Setup:
    """The tokenizer (`vocab` ids), the fixed prompt and completion ids, and a prompt dataset, built from a benchmark's
    settings (`batch`, `prompt_length`, `completion_length`, `vocab`, `seed`; `student()` and `teacher()` also read
    the tiny models' sizes)."""

    def __init__(self, settings):
        self.settings = s = settings
        extra = s.vocab - len(SPECIAL_TOKENS) - len(set(CHARACTERS))
        if extra < 0:
            raise ValueError(f"--vocab must be at least {s.vocab - extra}")
        # A character tokenizer padded with synthetic tokens, so len(tokenizer) == vocab (the shared vocabulary is
        # the whole embedding, as with Qwen's tokenizer and 151,936-row models)
        self.tokenizer = build_char_tokenizer(list(CHARACTERS) + [f"<v{i}>" for i in range(extra)])
        assert len(self.tokenizer) == s.vocab
        generator = torch.Generator().manual_seed(s.seed)
        first = len(SPECIAL_TOKENS)  # no pad / eos / role token: every completion runs to its full length
        self.prompt_ids = torch.randint(first, s.vocab, (s.batch, s.prompt_length), generator=generator)
        self.completion_ids = torch.randint(first, s.vocab, (s.batch, s.completion_length), generator=generator)
        prompts = [[{"role": "user", "content": f"{i}+{i + 1}="}] for i in range(64)]
        self.dataset = Dataset.from_dict({"prompt": prompts})

    def fixed_rows(self, count: int) -> tuple[list[list[int]], list[list[int]]]:
        if count > self.settings.batch:
            raise RuntimeError(f"asked for {count} fixed rollouts, have {self.settings.batch}")
        return self.prompt_ids[:count].tolist(), self.completion_ids[:count].tolist()

    def student(self):
        s = self.settings
        return tiny_qwen2(self.tokenizer, s.student_hidden, s.student_layers, s.heads, vocab_size=s.vocab, seed=0)

    def teacher(self):
        s = self.settings
        return tiny_qwen2(self.tokenizer, s.teacher_hidden, s.teacher_layers, s.heads, vocab_size=s.vocab, seed=1)


def fixed_rollout(setup: Setup):
    """A GRPO `rollout_func`: the same prompt and completion ids every step, no sampling."""
    def rollout_func(prompts, trainer):
        prompt_ids, completion_ids = setup.fixed_rows(len(prompts))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}
    return rollout_func


class FixedDistillationTrainer(DistillationTrainer):
    """`DistillationTrainer` whose on-policy generation returns the fixed rollouts (its loss path is untouched)."""

    def __init__(self, *args, setup: Setup, **kwargs):
        self._setup = setup
        super().__init__(*args, **kwargs)

    def _tokenize_prompts(self, prompts):
        return self._setup.fixed_rows(len(prompts))[0], None, {}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        return self._setup.fixed_rows(len(prompt_ids))[1]


def alternating_reward(completions, **kwargs):
    """Rewards that differ within every group, so GRPO's advantages are not all zero."""
    return [float(i % 3) for i in range(len(completions))]


def training_arguments(settings, output_dir: str) -> dict:
    """Training arguments every method shares (CPU, float32); `run_steps` sets `max_steps` for each run."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": settings.batch,
        "gradient_accumulation_steps": 1,
        "max_completion_length": settings.completion_length,
        "learning_rate": 1e-6,
        "max_steps": 1,
        "logging_steps": 10**6,  # logging runs after `on_step_end`; keep it out of the way anyway
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "bf16": False,
        CHECKPOINTING_FIELD: False,
        "seed": settings.seed,
    }


def build_trainer(method: str, setup: Setup, output_dir: str, student=None, teacher=None, **overrides):
    """The trainer of `method` (`METHODS`, or `tgpo_none`: TGPO with `guidance='none'`) on `setup`'s fixed rollouts;
    `student`/`teacher` default to `setup`'s tiny models, and `overrides` replace training arguments (the GPU
    benchmark's device and precision; `teacher_server_url` for a served teacher)."""
    s = setup.settings
    args = {**training_arguments(s, output_dir), **overrides}
    data = {"train_dataset": setup.dataset, "processing_class": setup.tokenizer}
    student = student if student is not None else setup.student()
    if method == "distillation":
        config = DistillationConfig(**args, beta=1.0, temperature=1.0)  # beta=1.0: reverse KL
        teacher = teacher if teacher is not None else setup.teacher()
        trainer = FixedDistillationTrainer(student, teacher, args=config, setup=setup, **data)
    elif method == "grpo":
        config = GRPOConfig(**args, num_generations=s.num_generations)
        trainer = GRPOTrainer(student, alternating_reward, args=config, rollout_func=fixed_rollout(setup), **data)
    else:
        guidance = "none" if method == "tgpo_none" else method
        config = TGPOConfig(**args, num_generations=s.num_generations, guidance=guidance, guidance_top_k=s.top_k)
        if config.teacher_server_url is None:  # else the teacher is served, and never built here
            teacher = teacher if teacher is not None else setup.teacher()
        trainer = TGPOTrainer(student, alternating_reward, args=config, rollout_func=fixed_rollout(setup),
                              teacher_model=teacher, teacher_processing_class=setup.tokenizer, **data)
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


class StepRecorder(TrainerCallback):
    """Wall time of every optimizer step (`on_step_begin` to `on_step_end`). A subclass that measures memory as well
    appends each step's peak to `peaks`, measuring around this class's timer."""

    def __init__(self):
        self.times, self.peaks = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run_steps(trainer, recorder: StepRecorder, steps: int) -> list[float]:
    """`steps` optimizer steps through `Trainer.train` (its setup is not timed); their times."""
    trainer.args.max_steps = steps
    done = len(recorder.times)
    trainer.train()
    return recorder.times[done:]


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_teacher_forward(trainer, setup: Setup, steps: int) -> list[float]:
    """The teacher's forward over the step's batch, exactly as a training step runs it
    (`TGPOTrainer.score_with_teacher`), one time per call."""
    device = trainer.accelerator.device
    prompt_ids, completion_ids = setup.prompt_ids.to(device), setup.completion_ids.to(device)
    trainer.model.train()  # the training batch size, as in a step
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        trainer.score_with_teacher(prompt_ids, torch.ones_like(prompt_ids), completion_ids,
                                   torch.ones_like(completion_ids))
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def parameter_bytes(model) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def logits_tensor_bytes(settings) -> int:
    """One `(batch, completion length, vocab)` float32 tensor: the unit of the memory budget."""
    return settings.batch * settings.completion_length * settings.vocab * 4


def memory_budget(teacher_weight_bytes: float, settings) -> float:
    """What a TGPO step may hold beyond a GRPO step's peak: the teacher's weights and `MEMORY_FRACTION` of the
    batch's logits tensor."""
    return teacher_weight_bytes + MEMORY_FRACTION * logits_tensor_bytes(settings)
