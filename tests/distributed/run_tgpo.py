"""
Worker of `tests/test_distributed.py`: runs TGPO scenarios in one process or under `accelerate launch`, and writes what
each rank saw to `OUT/<scenario>/rank<R>.json` (plus the saved models under `OUT/<scenario>/`).

    python tests/distributed/run_tgpo.py --models DIR --out DIR --scenarios step
    accelerate launch --config_file recipes/accelerate/zero3_cpu_2proc.yaml --main_process_port PORT \
        tests/distributed/run_tgpo.py --models DIR --out DIR --scenarios step,resume,lora

`--models DIR` holds `student/` and `teacher/` (tiny models, each with the tokenizer), loaded by path as users load
theirs: under ZeRO-3 they arrive partitioned (`zero.Init`), which is the path a 30B teacher takes. `teacher_bpe/` is a
teacher of another family, with its own tokenizer (a byte-level BPE), for `cross_resume`.

Scenarios:
- `step`: one optimizer step on a fixed global batch of 8 rollouts, identical whatever the number of processes (no
  sampling: GRPO's generation is replaced by the batch, rank r taking rows `r*8/N .. (r+1)*8/N`; the teacher is still
  scored by TGPO). Records the logs, how the teacher and the student are partitioned, and saves the final model.
- `resume`: real sampling in bfloat16; 2 steps with a checkpoint after each, then a new trainer resumes from
  `checkpoint-2` for step 3, and saves the final model.
- `lora`: a LoRA student, a teacher passed as a model object and the top-k guidance; one real step, and the adapter
  saved.
- `cross_resume`: `resume` with the teacher of another tokenizer (`teacher_bpe/`, found beside its weights, so
  cross-tokenizer scoring is on): real sampling, so each rollout's prompt is re-rendered the teacher's way. Records
  whether cross-tokenizer scoring was on and how the teacher is partitioned.
- `routed_step`: `step` with two teachers, each row routed to its own; the ranks hold different mixes of them.
- `vlm_twin`: a vision-language student (`vlm_student/`, a tiny LLaVA-Next with its processor) and its twin as the
  teacher (`vlm_twin/`, the same weights) on prompts with images: one real step with the top-k guidance. The teacher,
  partitioned, gets the student's image inputs, so the logged reverse KL is 0 (a teacher scoring without the images
  would differ). Records the logs and how the teacher is partitioned.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOTrainer

from tgpo_trl import TGPOConfig, TGPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny vision-language models

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (a C++ build of ~2 minutes on 2 cores) when
# its first process group starts; gloo does the same reductions without it. Declaring the op unavailable keeps a fresh
# machine's first run short. (Only the CPU accelerator has this op: nothing changes on GPUs.)
try:
    import deepspeed.ops
except ImportError:  # the data-parallel and single-process runs do not need DeepSpeed
    pass
else:
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


GLOBAL_BATCH = 8  # rollouts per optimizer step, over all processes
PROMPT_LENGTH, COMPLETION_LENGTH = 6, 8


def length_reward(completions, **kwargs):
    return [len(c[0]["content"]) / 10 for c in completions]


def make_config(output_dir: Path, world_size: int, **overrides) -> TGPOConfig:
    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": GLOBAL_BATCH // world_size,
        "num_generations": 4,
        "max_completion_length": COMPLETION_LENGTH,
        "max_steps": 1,
        # SGD, so that the weight change is -lr * gradient and comparing weights compares gradients (Adam's first step
        # is ~ -lr * sign(gradient), blind to the gradient's scale)
        "optim": "sgd",
        "learning_rate": 0.1,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 10.0,  # computed and logged, but never clipping here: the step is exactly -lr * gradient
        # "dapo" divides the policy term's token sum by the token count of the *global* batch (`num_items_in_batch`,
        # gathered over processes) over the number of processes: each rank's loss is
        # sum_rank / (N_global / P), and averaging the ranks' gradients (DDP / ZeRO) gives exactly the gradient of
        # sum_all / N_global, the single-process loss. Per-sequence ("grpo") or per-process ("bnpo") means would
        # only match for equal token counts on each rank, and the fixed batch gives the 2 ranks 24 and 17 tokens.
        "loss_type": "dapo",
        "guidance": "tgpo",
        "guidance_coef": 0.5,
        "guidance_schedule": "constant",
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "use_cpu": True,
        # Several CPU processes talk over gloo; without it accelerate counts one process and DeepSpeed's batch-size
        # check fails. A single process must leave it unset (accelerate would look for a process group).
        "ddp_backend": "gloo" if world_size > 1 else None,
        "bf16": False,  # float32, so that processes and a single process can be compared tightly
    }
    settings.update(overrides)
    return TGPOConfig(**settings)


def make_trainer(models: Path, args: TGPOConfig, teacher_id: bool = False, **kwargs) -> TGPOTrainer:
    kwargs.setdefault("teacher_model", str(models / "teacher"))
    data = {"prompt": [[{"role": "user", "content": f"{i}+{i}="}] for i in range(16)]}
    if teacher_id:
        data["teacher_id"] = ["a", "b"] * 8
    return TGPOTrainer(
        model=str(models / "student"),
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_dict(data),
        processing_class=AutoTokenizer.from_pretrained(models / "student"),
        **kwargs,
    )


def fixed_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """A global batch in the layout GRPO's `_generate_and_score_completions` returns, with padding on both sides."""
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(6, vocab_size, (GLOBAL_BATCH, PROMPT_LENGTH), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    completion_ids = torch.randint(6, vocab_size, (GLOBAL_BATCH, COMPLETION_LENGTH), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    for row, (left, length) in enumerate([(2, 8), (0, 3), (1, 8), (0, 5), (3, 1), (0, 8), (0, 6), (4, 2)]):
        prompt_mask[row, :left] = 0
        completion_mask[row, length:] = 0
    return {
        "prompt_ids": prompt_ids.masked_fill(prompt_mask == 0, 0),
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids.masked_fill(completion_mask == 0, 0),
        "completion_mask": completion_mask,
        "advantages": torch.randn(GLOBAL_BATCH, generator=generator),
    }


def serve_fixed_batch(batch: dict[str, torch.Tensor], rank: int, world_size: int):
    """Replace GRPO's sampling and rewards by this process's rows of `batch` (TGPO still scores them: the teacher)."""
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)

    def generate_and_score(self, inputs):
        output = {key: value[rows].clone() for key, value in batch.items()}
        output["num_items_in_batch"] = batch["completion_mask"].sum()  # GRPO gathers it over processes
        return output

    return mock.patch.object(GRPOTrainer, "_generate_and_score_completions", generate_and_score)


def partition_summary(model) -> dict[str, int]:
    """
    Parameter elements of `model` (a DeepSpeed engine, a DDP wrapper or a model): `total`; the `partition` this process
    owns (ZeRO-3's `ds_tensor`, the whole parameter otherwise); the full parameters `resident` on it now; and the
    `persistent` ones, which ZeRO-3 keeps whole on every process once used (those below
    `stage3_param_persistence_threshold` elements: norms and biases of a large model, every parameter of a tiny one).
    """
    module = getattr(model, "module", model)
    summary = {"total": 0, "partition": 0, "resident": 0, "persistent": 0, "num_params": 0, "num_partitioned": 0}
    for param in module.parameters():
        partitioned = hasattr(param, "ds_tensor")
        summary["total"] += param.ds_numel if partitioned else param.numel()
        summary["partition"] += param.ds_tensor.numel() if partitioned else param.numel()
        summary["resident"] += param.data.numel()
        summary["persistent"] += param.ds_numel if partitioned and param.ds_persist else 0
        summary["num_params"] += 1
        summary["num_partitioned"] += partitioned
    return summary


def is_deepspeed_engine(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def run_step(models: Path, out: Path, world_size: int) -> dict:
    trainer = make_trainer(models, make_config(out, world_size))
    report = {
        "teacher": partition_summary(trainer.teacher_model),
        "teacher_is_deepspeed_engine": is_deepspeed_engine(trainer.teacher_model),
    }
    batch = fixed_batch(trainer.teacher_vocab_size)
    with serve_fixed_batch(batch, trainer.accelerator.process_index, world_size):
        trainer.train()
    report["teacher_after_step"] = partition_summary(trainer.teacher_model)
    report["student"] = partition_summary(trainer.model_wrapped)
    report["student_is_deepspeed_engine"] = is_deepspeed_engine(trainer.model_wrapped)
    report["log_history"] = trainer.state.log_history
    trainer.save_model(str(out / "final"))
    return report


class StepsRun(TrainerCallback):
    """The optimizer steps a trainer actually takes (not those restored from a checkpoint)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def run_resume(models: Path, out: Path, world_size: int, teacher: str = "teacher") -> dict:
    # In bfloat16, as on GPUs: under ZeRO-3 the saved model is then the gathered 16-bit weights
    schedule = {
        "guidance_schedule": "linear", "guidance_decay_steps": 4, "save_strategy": "steps", "save_steps": 1,
        "bf16": True, "teacher_model_init_kwargs": {"dtype": "bfloat16"},
    }
    teacher_model = str(models / teacher)
    first = make_trainer(models, make_config(out, world_size, max_steps=2, **schedule), teacher_model=teacher_model)
    first.train()
    report = {
        "first_log_history": first.state.log_history,
        "teacher": partition_summary(first.teacher_model),
        "teacher_is_deepspeed_engine": is_deepspeed_engine(first.teacher_model),
        "first_cross_tokenizer": first.teacher_scoring.cross_tokenizer,
    }
    del first

    resumed = make_trainer(models, make_config(out, world_size, max_steps=3, **schedule), teacher_model=teacher_model)
    report["resumed_cross_tokenizer"] = resumed.teacher_scoring.cross_tokenizer
    steps_run = StepsRun()
    resumed.add_callback(steps_run)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    report["resumed_log_history"] = resumed.state.log_history
    report["resumed_steps_run"] = steps_run.steps  # a fresh start would run 1, 2, 3 and log the same history
    resumed.save_model(str(out / "final"))
    return report


def run_lora(models: Path, out: Path, world_size: int) -> dict:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    # The top-k guidance, for its gathers at the teacher's top-k ids through the partitioned LM head
    args = make_config(out, world_size, guidance="tgpo_topk", guidance_top_k=4)
    # The teacher as a model object this time, loaded after the config: under ZeRO-3 it arrives already partitioned
    # (`zero.Init`), and cannot run until the trainer prepares it
    teacher = AutoModelForCausalLM.from_pretrained(models / "teacher")
    loaded = partition_summary(teacher)
    trainer = make_trainer(models, args, peft_config=lora, teacher_model=teacher)
    trainable = [name for name, param in trainer.model.named_parameters() if param.requires_grad]
    trainer.train()
    trainer.save_model(str(out / "final"))
    return {
        "log_history": trainer.state.log_history,
        "teacher_loaded": loaded,
        "teacher": partition_summary(trainer.teacher_model),
        "student": partition_summary(trainer.model_wrapped),
        "trainable": trainable,
    }


def run_cross_resume(models: Path, out: Path, world_size: int) -> dict:
    # The dataset's prompts are conversations, which the teacher reads in its own (ChatML) template
    return run_resume(models, out, world_size, teacher="teacher_bpe")


def run_vlm_twin(models: Path, out: Path, world_size: int) -> dict:
    from transformers import AutoProcessor
    from vlm_models import image_dataset

    args = make_config(out, world_size, guidance="tgpo_topk", guidance_top_k=4, max_completion_length=6)
    trainer = TGPOTrainer(
        model=str(models / "vlm_student"), reward_funcs=length_reward, args=args, train_dataset=image_dataset(16),
        processing_class=AutoProcessor.from_pretrained(models / "vlm_student"), teacher_model=str(models / "vlm_twin"),
    )
    trainer.train()
    return {"log_history": trainer.state.log_history, "teacher": partition_summary(trainer.teacher_model),
            "teacher_is_deepspeed_engine": is_deepspeed_engine(trainer.teacher_model)}


def run_served_step(models: Path, out: Path, world_size: int) -> dict:
    """`run_step` with the teacher served by the test's stand-in (`$TGPO_TEST_TEACHER_SERVER`): each rank sends the
    requests of its own rows, and the logged metrics are reduced over ranks as with an in-process teacher."""
    args = make_config(out, world_size, teacher_server_url=os.environ["TGPO_TEST_TEACHER_SERVER"],
                       teacher_model_name_or_path=str(models / "teacher"))
    trainer = make_trainer(models, args, teacher_model=None)
    batch = fixed_batch(trainer.teacher_vocab_size)
    with serve_fixed_batch(batch, trainer.accelerator.process_index, world_size):
        trainer.train()
    trainer.save_model(str(out / "final"))
    return {"log_history": trainer.state.log_history, "teacher_in_process": trainer.teacher_model is not None}


# The teacher of each row of the fixed batch in `routed_step`: rank 0 of 2 holds 3 rows of `a` and 1 of `b`, rank 1
# only rows of `b`
FIXED_ROUTE = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])


def run_routed_step(models: Path, out: Path, world_size: int) -> dict:
    """`run_step` with two teachers, each row routed to its own (`FIXED_ROUTE`): `a` from `teacher/`, `b` from
    `teacher_shifted/` (its output rows shifted by one id: it disagrees with `a` at every token), both loaded by path,
    so both partitioned under ZeRO-3. The per-teacher metrics are reduced over ranks that hold different mixes of the
    teachers."""
    trainer = make_trainer(models, make_config(out, world_size), teacher_id=True,
                           teacher_model={"a": str(models / "teacher"), "b": str(models / "teacher_shifted")})
    rank = trainer.accelerator.process_index
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    trainer.teachers.route = lambda examples: FIXED_ROUTE[rows].clone()  # the fixed batch's rows, not the dataset's
    batch = fixed_batch(min(teacher.vocab_size for teacher in trainer.teachers))
    with serve_fixed_batch(batch, rank, world_size):
        trainer.train()
    trainer.save_model(str(out / "final"))
    return {"log_history": trainer.state.log_history,
            "teachers": {teacher.name: partition_summary(teacher.model) for teacher in trainer.teachers},
            "teachers_are_deepspeed_engines": all(is_deepspeed_engine(teacher.model) for teacher in trainer.teachers)}


SCENARIOS = {"step": run_step, "resume": run_resume, "lora": run_lora, "cross_resume": run_cross_resume,
             "served_step": run_served_step, "vlm_twin": run_vlm_twin, "routed_step": run_routed_step}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", default="step", help=f"comma-separated, from {sorted(SCENARIOS)}")
    options = parser.parse_args()
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    for name in options.scenarios.split(","):
        out = options.out / name
        report = {"rank": rank, "world_size": world_size, **SCENARIOS[name](options.models, out, world_size)}
        (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    # Leave together: a rank that exits while the other still saves tears gloo down under it (SIGABRT at exit)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every report and model is written: skip the interpreter's teardown, where a C++ thread of the distributed stack
    # is sometimes destroyed while still joinable ("terminate called without an active exception", SIGABRT; seen once
    # in a ZeRO-3 launch after both ranks had finished), which would fail a run whose results are all on disk
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
