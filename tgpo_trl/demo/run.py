"""The offline demo that `tgpo train` (`tgpo_trl/scripts/train.py`, `scripts/train.py` in a checkout) runs with no
arguments.

It builds (or reuses from the cache) the demo's teacher and students (`build.py`), measures the student's held-out
greedy accuracy, trains it with TGPO on the synthetic task (`task.py`), measures it again, and writes the model, its
card and `demo_results.json` to the output directory. Every `TGPOConfig` setting comes from `demo_defaults` through
the script's parser, so any flag (`--max_steps`, `--guidance none`, `--output_dir`, ...) overrides it.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import CHECKPOINTING_FIELD, TGPOConfig
from ..trainer import TGPOTrainer
from .build import SIZES, build_demo_models
from .evaluate import GreedyEvaluation, greedy_evaluation
from .task import MAX_COMPLETION_LENGTH, build_dataset


DEMO_SIZES = tuple(SIZES)
OUTPUT_DIR = "outputs/tgpo-demo"
# The teacher-style student (small gap): on this toy task TGPO does not rescue the other-family student within a CPU
# demo's steps (docs/benchmarks/methods.md)
STUDENT = "student_small_gap"
TASK_NAME = "tgpo_trl demo: sum of three two-digit numbers"
RESULTS_FILE = "demo_results.json"
TRAIN_SEED = 1  # the build pretrains on seed 0's stream; RL draws other problems (the test split stays disjoint)

# Per size: RL steps and distinct training problems (8 prompts per step, so every step sees new ones)
_SCHEDULE = {"full": {"max_steps": 300, "train_size": 2400}, "quick": {"max_steps": 4, "train_size": 64}}


def demo_defaults(size: str = "full") -> dict[str, Any]:
    """The demo's settings, as `--config` YAML keys: `TGPOConfig` fields plus the script's `reward_funcs`."""
    steps = _SCHEDULE[size]["max_steps"]
    return {
        "demo_size": size,
        "reward_funcs": ["exact_match"],
        "output_dir": OUTPUT_DIR,
        "max_steps": steps,
        "per_device_train_batch_size": 64,  # 8 prompts x 8 rollouts per optimizer step
        "num_generations": 8,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "temperature": 0.7,  # as the method benchmark: at 1.0 the students' samples are rarely right
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "guidance": "tgpo",
        # Far above the paper's 0.002 (lr 1e-6): at this lr the reward alone erodes the tiny student's greedy accuracy,
        # and a guidance that dominates the update is what carries it toward the teacher
        "guidance_coef": 1.0,
        "guidance_schedule": "constant",
        "guidance_decay_steps": steps,
        "logging_steps": max(1, steps // 10),
        "save_strategy": "no",
        "report_to": "none",
        CHECKPOINTING_FIELD: False,
        "bf16": False,  # tiny float32 models; GRPOConfig's bf16 default fails on a CPU
        "use_cpu": not torch.cuda.is_available(),
        "seed": 0,
    }


@dataclass(frozen=True)
class DemoResult:
    """Held-out greedy evaluation of the student before and after TGPO, and where the model went."""

    student: str
    guidance: str
    before: GreedyEvaluation
    after: GreedyEvaluation
    teacher_accuracy: float
    eval_size: int
    output_dir: str
    train_seconds: float

    def summary(self) -> str:
        return (
            f"Student held-out accuracy ({self.eval_size} problems, greedy): {self.before.accuracy:.1%} before training, "
            f"{self.after.accuracy:.1%} after (guidance={self.guidance}; teacher: {self.teacher_accuracy:.1%}). "
            f"Model and card: {self.output_dir}"
        )


def _card_section(result: DemoResult, args: TGPOConfig) -> str:
    schedule = args.guidance_schedule + (f", D={args.guidance_decay_steps}" if args.guidance_schedule == "linear" else "")
    return (
        "\n## Demo results\n\n"
        f"Trained by `tgpo_trl`'s offline demo ({TASK_NAME}): the student (`{result.student}`) with `guidance="
        f"{args.guidance}`, `guidance_coef={args.guidance_coef}` ({schedule}), {args.max_steps} steps, against a "
        "tiny teacher.\n\n"
        f"| held-out greedy accuracy ({result.eval_size} problems) | before | after |\n|---|---|---|\n"
        f"| student | {result.before.accuracy:.1%} | {result.after.accuracy:.1%} |\n"
        f"| teacher | {result.teacher_accuracy:.1%} | |\n"
    )


def run_demo(size: str, args: TGPOConfig, reward_funcs, cache_dir=None) -> DemoResult | None:
    """Build or reuse the demo models, train the student with TGPO under `args`, and report; `None` on the processes
    other than the main one."""
    state = PartialState()
    with state.local_main_process_first():  # one process builds, the others then find the cache
        models = build_demo_models(cache_dir, size=size, progress=state.is_local_main_process)
    if args.teacher_model_name_or_path is None:
        args.teacher_model_name_or_path = str(models.teacher)
    settings = SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(models.tokenizer)
    student_path = getattr(models, STUDENT)
    test_set = build_dataset(settings.eval_size, settings.eval_seed, "test")
    train_set = build_dataset(_SCHEDULE[size]["train_size"], TRAIN_SEED, "train")

    before = None
    if state.is_main_process:
        before = greedy_evaluation(AutoModelForCausalLM.from_pretrained(student_path), tokenizer, test_set,
                                   MAX_COMPLETION_LENGTH)
        print(f"Student before training: {before.accuracy:.1%} held-out accuracy ({settings.eval_size} problems)")

    trainer = TGPOTrainer(model=str(student_path), reward_funcs=reward_funcs, args=args, train_dataset=train_set,
                          processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trainer.save_model(args.output_dir)
    trainer.create_model_card(model_name=Path(args.output_dir).name, tags=["tgpo-demo"])  # the task: a local one
    if not state.is_main_process:
        _end(trainer)
        return None

    model = trainer.accelerator.unwrap_model(trainer.model)
    after = greedy_evaluation(model, tokenizer, test_set, MAX_COMPLETION_LENGTH)
    teacher_accuracy = models.report["models"]["teacher"]["accuracy"]
    result = DemoResult(STUDENT, args.guidance, before, after, teacher_accuracy, settings.eval_size, args.output_dir,
                        round(train_seconds, 1))
    output_dir = Path(args.output_dir)
    (output_dir / RESULTS_FILE).write_text(json.dumps(asdict(result), indent=2))
    with open(output_dir / "README.md", "a") as card:
        card.write(_card_section(result, args))
    print(result.summary())
    _end(trainer)
    return result


def _end(trainer) -> None:
    if hasattr(trainer, "end"):  # transformers >= 5.18: close the trackers and the process group
        trainer.end()
