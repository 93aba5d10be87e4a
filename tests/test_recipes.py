"""Every recipe goes through the real parser of `tgpo train` (tgpo_trl/scripts/train.py): a renamed or removed field
fails here."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import yaml

from tgpo_trl.scripts import train as train_script

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PAPER = ROOT / "recipes" / "qwen2.5-math-1.5b_tgpo.yaml"
PAPER_GPUS = 8  # recipes/accelerate/zero3.yaml


@pytest.fixture(scope="module")
def script():
    return train_script


def parse(script, recipe, *flags):
    # The recipes ask for bf16 on a GPU, which TrainingArguments refuses to set up on a machine without one
    return script.make_parser().parse_args_and_config(["--config", str(recipe), "--use_cpu", "true", *flags])


def test_there_are_recipes():
    assert PAPER in RECIPES and len(RECIPES) >= 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_parses_with_every_key_known(script, recipe):
    script_args, training_args, model_args = parse(script, recipe)
    config = yaml.safe_load(recipe.read_text())
    parsed = {**vars(script_args), **vars(model_args), **training_args.to_dict()}
    for key in config:  # every key reached a field (an unknown key raises in parse_args_and_config)
        assert key in parsed, key
    assert script.load_reward_funcs(script_args.reward_funcs)
    assert training_args.teacher_model_name_or_path and model_args.model_name_or_path and script_args.dataset_name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_flags_override_the_recipe(script, recipe):
    _, training_args, model_args = parse(script, recipe, "--guidance", "none", "--lora_r", "8")
    assert training_args.guidance == "none" and model_args.lora_r == 8


def test_paper_recipe_is_the_papers_setup(script):
    """TGPO.md 6: 128 prompts x 8 rollouts per step in 2 updates of 64 prompts, lr 1e-6 constant, clip 1.0, eps 0.2,
    entropy 0.001, no KL, prompts <= 1024, completions <= 8192, T = 1.0, 300 steps, lambda_0 0.002 linear over 200."""
    script_args, args, model_args = parse(script, PAPER)
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-Math-1.5B"
    assert args.teacher_model_name_or_path == "Qwen/Qwen3-30B-A3B-Thinking-2507"
    assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert (args.guidance, args.guidance_coef, args.guidance_schedule, args.guidance_decay_steps) == (
        "tgpo", 0.002, "linear", 200)
    completions_per_update = args.per_device_train_batch_size * PAPER_GPUS * args.gradient_accumulation_steps
    completions_per_generation = args.per_device_train_batch_size * PAPER_GPUS * args.steps_per_generation
    assert args.num_generations == 8
    assert completions_per_update // args.num_generations == 64
    assert completions_per_generation // args.num_generations == 128
    assert args.num_iterations == 1
    assert args.learning_rate == 1e-6 and args.lr_scheduler_type == "constant" and args.max_steps == 300
    assert (args.max_grad_norm, args.epsilon, args.entropy_coef, args.beta, args.temperature) == (1.0, 0.2, 0.001, 0, 1)
    assert script_args.max_prompt_length == 1024 and args.max_completion_length == 8192
    assert args.use_vllm and args.vllm_mode == "colocate"
    assert script_args.reward_funcs == ["format"]


def test_served_recipe_is_the_paper_setup_with_the_teacher_served(script):
    """The served-teacher recipe (docs/distributed.md): the paper's batch on the 4 training GPUs, the teacher named and
    served by two replicas, never loaded in training; everything else as in the paper's recipe."""
    served = ROOT / "recipes" / "qwen2.5-math-1.5b_tgpo_served.yaml"
    _, args, _ = parse(script, served)
    _, paper, _ = parse(script, PAPER)
    assert args.teacher_server_url == ["http://localhost:8001", "http://localhost:8002"]
    assert args.teacher_model_name_or_path == paper.teacher_model_name_or_path
    assert args.teacher_model_init_kwargs is None
    training_gpus = 4
    assert args.per_device_train_batch_size * training_gpus * args.gradient_accumulation_steps == (
        paper.per_device_train_batch_size * PAPER_GPUS * paper.gradient_accumulation_steps)
    assert args.per_device_train_batch_size * training_gpus * args.steps_per_generation == (
        paper.per_device_train_batch_size * PAPER_GPUS * paper.steps_per_generation)
    same = ("guidance", "guidance_coef", "learning_rate", "max_steps", "max_completion_length", "beta", "epsilon")
    assert all(getattr(args, key) == getattr(paper, key) for key in same)
