"""What a student of `benchmarks/routing.py` writes before and after some steps of one arm: greedy completions of the
first 6 test problems of each family (one seed; an illustration for docs/benchmarks/routing.md, not a measurement).

    python benchmarks/pilots/routing_completions.py sum_teacher 40       # arm, steps (seed 0)

The run is the benchmark's (`routing.run_settings(routing.FULL, arm)`, its models, data and seed-0 training stream),
stopped after `steps` steps."""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from benchmarks import methods, routing  # noqa: I001  (sets the offline environment first)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

from tgpo_trl import TGPOConfig, TGPOTrainer
from tgpo_trl.demo.evaluate import greedy_completions
from tgpo_trl.rewards import get_reward_funcs

SHOWN = 6  # problems per family

arm, steps, seed = sys.argv[1], int(sys.argv[2]), 0
torch.set_num_threads(1)
settings = routing.run_settings(routing.FULL, arm)
student_path, teacher_path = routing.MIX.models(settings["demo_size"])[arm]
tokenizer = AutoTokenizer.from_pretrained(routing.MIX.tokenizer(settings["demo_size"]))
student = AutoModelForCausalLM.from_pretrained(student_path)
teacher, teacher_tokenizer = methods.load_teachers(teacher_path)
shown = routing.mix_dataset(2 * SHOWN, 0, "test")  # the first test problems of each family, as the benchmark's


def show(label: str) -> None:
    completions = greedy_completions(student, tokenizer, shown["prompt"], settings["max_completion_length"])
    for prompt, text, answer in zip(shown["prompt"], tokenizer.batch_decode(completions, skip_special_tokens=True),
                                    shown["answer"], strict=True):
        print(f"{label} {prompt[0]['content']!r} -> {text!r} (answer {answer})", flush=True)


show("step 0")
args = TGPOConfig(
    output_dir=tempfile.mkdtemp(prefix="tgpo-pilot-"), max_steps=steps,
    per_device_train_batch_size=settings["prompts_per_step"] * settings["num_generations"],
    num_generations=settings["num_generations"], max_completion_length=settings["max_completion_length"],
    temperature=settings["temperature"], learning_rate=settings["learning_rate"], lr_scheduler_type="constant",
    warmup_steps=0, loss_type=settings["loss_type"], logging_steps=steps, save_strategy="no", report_to="none",
    disable_tqdm=True, use_cpu=True, bf16=False, seed=seed, data_seed=seed,
    **methods.method_config(routing.ARMS[arm][0], settings), **settings.get("extra_config", {}),
)
trainer = TGPOTrainer(model=student, reward_funcs=get_reward_funcs(settings["reward"]), args=args,
                      train_dataset=routing.mix_dataset(steps * settings["prompts_per_step"], 100 + seed, "train"),
                      processing_class=tokenizer, teacher_model=teacher, teacher_processing_class=teacher_tokenizer)
trainer.remove_callback(PrinterCallback)
trainer.train()
show(f"step {steps}")
