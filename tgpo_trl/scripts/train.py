"""Train a student with TGPO (Teacher-Guided Policy Optimization, arXiv 2605.13230).

    tgpo train                                                          # no arguments: the offline demo
    tgpo train --guidance none --max_steps 50                           # the demo, with overrides
    tgpo train --demo_size quick                                        # the demo, reduced (for tests)
    tgpo train --accelerate_config zero3 --config recipe.yaml [--flag value ...]
    tgpo train --help                                                   # every option

From a checkout, the same with `accelerate launch scripts/train.py ...` (`--config_file <accelerate config>` before the
script) or `python scripts/train.py ...`.

Every `TGPOConfig` (hence `GRPOConfig`) field, every `trl.ModelConfig` field (`--use_peft --lora_r ...`) and the
dataset and reward options below are both a flag and a key of a `--config` YAML file; flags override the file.
Without a student (`--model_name_or_path`) and a dataset (`--dataset_name`), the script runs the demo.
"""

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field

import yaml
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from tgpo_trl import TGPOConfig, TGPOTrainer
from tgpo_trl.data import DatasetArguments, filter_long_prompts, load_prompt_dataset
from tgpo_trl.demo.run import DEMO_SIZES, demo_defaults, run_demo
from tgpo_trl.rewards import REWARD_FUNCS, get_reward_funcs
from tgpo_trl.scripts import prog_name

PROG = "train.py"
LAUNCH_OPTIONS = """\
Launch options: every `accelerate launch` option goes among the fields, and `tgpo` passes it to accelerate:
  --num_processes N, --config_file FILE (an accelerate config), --main_process_port PORT, ... (accelerate launch --help)
  --accelerate_config NAME|FILE: a file, or one of the configs TRL ships (multi_gpu, zero1, zero2, zero3, fsdp1, fsdp2)
"""


@dataclass
class TGPOScriptArguments(DatasetArguments):
    """Dataset arguments (see `tgpo_trl.data.DatasetArguments`), the reward functions, and the demo switch."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["format"],
        metadata={"help": f"Reward functions, by registry name ({', '.join(REWARD_FUNCS)}) or dotted import path "
                  "('my_lib.rewards.my_reward'). 'format' is the paper's: 1 correct, 0 wrong, -1 unparseable."},
    )
    demo_size: str | None = field(
        default=None,
        metadata={"help": "Run the built-in offline demo at this size ('quick' is a reduced one for tests). Without "
                  "--model_name_or_path and --dataset_name the script runs the 'full' demo. Other flags override the "
                  "demo's settings.", "choices": list(DEMO_SIZES)},
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option (as `HfArgumentParser`), and the usage above kept as written."""


class LaunchParser(TrlParser):
    """`TrlParser`'s reading of the flags over `--config`, without building the dataclasses: what `tgpo` needs to split
    the arguments between the script and accelerate. Building a `TrainingArguments` sets up the devices of the process
    that builds it, at its world size, and the launcher is none of the launched processes: the fields' values are
    checked there, before any model loads."""

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        namespace, remaining = self.parse_known_args(args=args)
        return namespace, remaining


def make_parser(prog: str | None = None, dataclass_types=(TGPOScriptArguments, TGPOConfig, ModelConfig),
                description: str = __doc__, parser_class=TrlParser) -> TrlParser:
    """The parser of every field; under `tgpo` (`prog` "tgpo ...") its help also says where launch options go."""
    epilog = LAUNCH_OPTIONS if prog and prog.startswith("tgpo") else None
    return parser_class(dataclass_types, prog=prog, description=description, epilog=epilog,
                        formatter_class=HelpFormatter)


def requested_demo(argv: list[str]) -> str | None:
    """The demo size to run: `--demo_size`, else "full" when neither a student nor a dataset is given (by flag or in
    `--config`), so that no arguments at all, or only overrides like `--max_steps 50`, run the demo."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    for name in ("demo_size", "config", "model_name_or_path", "dataset_name"):
        pre_parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}")
    pre_parser.add_argument("-h", "--help", action="store_true")
    known, _ = pre_parser.parse_known_args(argv)
    if known.help:
        return None  # --help shows the general defaults
    config = {}
    if known.config is not None:
        try:
            with open(known.config) as file:
                config = yaml.safe_load(file)
        except (OSError, yaml.YAMLError):
            pass  # reported by the real parser
        config = config if isinstance(config, dict) else {}
    demo_size = known.demo_size or config.get("demo_size")
    if demo_size is None and not any((known.model_name_or_path, known.dataset_name,
                                      config.get("model_name_or_path"), config.get("dataset_name"))):
        demo_size = "full"
    return demo_size


def parse_with(parser: TrlParser, argv: list[str], launch_args: bool = False):
    """`parser`'s dataclasses from flags over `--config`. With `launch_args` (a `LaunchParser`), the parsed namespace
    and the flags no field takes (for `tgpo` to pass to accelerate); a `--config` key no field takes is an error."""
    try:
        if not launch_args:
            return parser.parse_args_and_config(argv)
        *parsed, from_config, from_flags = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except (OSError, yaml.YAMLError) as error:  # TrlParser reads `--config` as the argument after the flag
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(f"Could not read config file {config_path(argv)!r}: {first_line}") from error
    if from_config:
        keys = [item[2:] for item in from_config[::2]]
        raise ValueError(f"Unknown keys in config file {config_path(argv)!r}: {', '.join(keys)} (no such field; "
                         "accelerate's launch options go on the command line)")
    return (*parsed, from_flags)


def config_path(argv: list[str]) -> str | None:
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None


def parse_args(argv: list[str], prog: str | None = None, launch_args: bool = False):
    """Parse flags and `--config` (flags win); for the demo, on top of the demo's settings. Returns the script, training
    and model arguments, or with `launch_args` the namespace of every field and the flags left for accelerate."""
    parser = make_parser(prog, parser_class=LaunchParser if launch_args else TrlParser)
    demo_size = requested_demo(argv)
    if demo_size is not None:
        parser.set_defaults_with_config(**demo_defaults(demo_size))
    return parse_with(parser, argv, launch_args)


def load_reward_funcs(names: list[str]) -> list:
    """Reward functions by registry name (`tgpo_trl.rewards.REWARD_FUNCS`) or dotted import path, in order."""
    funcs = []
    for name in names:
        if "." in name:
            module_name, attribute = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            try:
                funcs.append(getattr(importlib.import_module(module_name), attribute))
            except (ImportError, AttributeError) as error:
                raise ValueError(f"Could not import reward function {name!r}: {error}") from error
        else:
            funcs += get_reward_funcs(name)
    return funcs


def validate(script_args: TGPOScriptArguments, training_args: TGPOConfig, model_args: ModelConfig) -> list:
    """What can be checked without loading data or models (the reward functions, a student, a teacher); the reward
    functions. Raises `ValueError` naming the flag."""
    reward_funcs = load_reward_funcs(script_args.reward_funcs)
    if script_args.demo_size is not None:
        return reward_funcs  # the demo brings its own models and data
    if not model_args.model_name_or_path:
        raise ValueError("No student model: set --model_name_or_path (or run with no arguments for the demo)")
    if training_args.guidance_needs_teacher and not training_args.teacher_model_name_or_path:
        raise ValueError(f"--guidance {training_args.guidance} needs a teacher: set --teacher_model_name_or_path "
                         "(or --guidance none for plain GRPO)")
    return reward_funcs


def load_datasets(script_args: TGPOScriptArguments, training_args: TGPOConfig, model_args: ModelConfig):
    """The prepared train (and, when evaluating, test) split; long prompts dropped if `max_prompt_length` is set."""
    from transformers import AutoTokenizer

    splits = [script_args.dataset_train_split]
    if training_args.eval_strategy != "no":
        splits.append(script_args.dataset_test_split)
    with training_args.main_process_first(desc="dataset preparation"):
        prepared = [load_prompt_dataset(script_args, split) for split in splits]
        if script_args.max_prompt_length is not None:
            tokenizer = AutoTokenizer.from_pretrained(
                model_args.model_name_or_path, revision=model_args.model_revision,
                trust_remote_code=training_args.trust_remote_code,
            )
            prepared = [filter_long_prompts(d, tokenizer, script_args.max_prompt_length) for d in prepared]
    return prepared[0], (prepared[1] if len(prepared) > 1 else None)


def model_init_kwargs(training_args: TGPOConfig, model_args: ModelConfig) -> dict:
    """The student's `from_pretrained` arguments from `ModelConfig`, under any the config already sets."""
    from_model_args = {"revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code,
                       "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype}
    return {**from_model_args, **(training_args.model_init_kwargs or {})}


def main(script_args: TGPOScriptArguments, training_args: TGPOConfig, model_args: ModelConfig, reward_funcs, datasets):
    train_dataset, eval_dataset = datasets
    training_args.model_init_kwargs = model_init_kwargs(training_args, model_args)

    trainer = TGPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # The card links a Hub dataset and names a local one without a link
    if training_args.push_to_hub:  # TRL's path: saves the model and writes the card to output_dir, then uploads both
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}")
    else:
        trainer.save_model(training_args.output_dir)
        trainer.create_model_card(model_name=os.path.basename(os.path.normpath(training_args.output_dir)),
                                  dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Model and model card saved to {training_args.output_dir}")
    trainer.accelerator.wait_for_everyone()  # the group ends on every process together, after the main one wrote
    if hasattr(trainer, "end"):  # transformers >= 5.18: close the trackers and the process group
        trainer.end()


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    """Everything a user can get wrong is checked here, before any model is loaded, and stops with one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        script_args, training_args, model_args = parse_args(argv, prog)
        reward_funcs = validate(script_args, training_args, model_args)
        datasets = None if script_args.demo_size is not None else load_datasets(script_args, training_args, model_args)
    except ValueError as error:
        raise SystemExit(f"{prog}: error: {error}") from None
    if script_args.demo_size is not None:
        run_demo(script_args.demo_size, training_args, reward_funcs)
    else:
        main(script_args, training_args, model_args, reward_funcs, datasets)


if __name__ == "__main__":
    cli(prog=prog_name(PROG))
