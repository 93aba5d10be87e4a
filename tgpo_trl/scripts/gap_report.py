"""Measure a student-teacher pair before training, and say which method fits (docs/gap_report.md).

    tgpo gap-report                                                   # no arguments: the offline demo's pair
    tgpo gap-report --gap_demo_student student_large_gap
    tgpo gap-report --config recipe.yaml --gap_num_prompts 256
    tgpo gap-report --help                                            # every option

From a checkout, the same with `accelerate launch scripts/gap_report.py ...` or `python scripts/gap_report.py ...`.

The parser, the recipes and the YAML keys are those of `tgpo train` (every TGPOConfig, trl.ModelConfig, dataset and
reward option), plus the `--gap_*` options below. It builds the trainer the run would build, trains nothing, and
measures with `tgpo_trl.gap_report.measure_gap` (the Python entry: what is measured is described there). On several
processes each one measures a shard of the prompts and the results are gathered on the main one. Writes
`gap_report.json`, `gap_report.md` and two PNG plots to `--output_dir`.
"""

import sys
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from tgpo_trl import TGPOConfig, TGPOTrainer
from tgpo_trl.demo.build import MODEL_NAMES
from tgpo_trl.gap_report import GapReport, GapReportOptions, first_prompts, measure_gap
from tgpo_trl.scripts import prog_name, train

PROG = "gap_report.py"
DEMO_OUTPUT_DIR = "outputs/gap-report-demo"
DEMO_NUM_PROMPTS = 128
DEMO_STUDENTS = tuple(name for name in MODEL_NAMES if name != "teacher")


@dataclass
class GapReportArguments(train.TGPOScriptArguments, GapReportOptions):
    """`tgpo train`'s dataset, reward and demo arguments, what the gap report measures, and the demo's student."""

    gap_demo_student: str = field(
        default="student_small_gap",
        metadata={"help": "The demo's student measured (demo only).", "choices": list(DEMO_STUDENTS)})

    def __post_init__(self):
        train.TGPOScriptArguments.__post_init__(self)
        GapReportOptions.__post_init__(self)

    def options(self) -> GapReportOptions:
        return GapReportOptions(**{name: getattr(self, name) for name in GapReportOptions.__dataclass_fields__})


def make_parser(prog: str | None = None, parser_class=train.TrlParser):
    return train.make_parser(prog, (GapReportArguments, TGPOConfig, ModelConfig), __doc__, parser_class)


def parse_args(argv: list[str], prog: str | None = None, launch_args: bool = False):
    """As `tgpo train` parses (flags over `--config`, the demo's settings under both), with the report's defaults for
    the demo."""
    parser = make_parser(prog, train.LaunchParser if launch_args else train.TrlParser)
    demo_size = train.requested_demo(argv)
    if demo_size is not None:
        from tgpo_trl.demo.run import demo_defaults

        parser.set_defaults_with_config(**{**demo_defaults(demo_size), "output_dir": DEMO_OUTPUT_DIR,
                                           "gap_num_prompts": DEMO_NUM_PROMPTS})
    return train.parse_with(parser, argv, launch_args)


def validate(script_args: GapReportArguments, training_args: TGPOConfig, model_args: ModelConfig) -> list:
    """What can be checked before loading data or models; the reward functions. Raises `ValueError` naming the flag."""
    reward_funcs = train.load_reward_funcs(script_args.reward_funcs)
    if script_args.demo_size is None:
        if not model_args.model_name_or_path:
            raise ValueError("No student model: set --model_name_or_path (or run with no arguments for the demo)")
        if not training_args.teacher_model_name_or_path:
            raise ValueError("The gap report needs a teacher: set --teacher_model_name_or_path")
        if training_args.teacher_server_url is not None:
            raise ValueError("The gap report runs the teacher in process (it continues the student's prefixes with "
                             "it): drop --teacher_server_url and load the teacher by --teacher_model_name_or_path")
    return reward_funcs


# ------------------------------------------------------------------ models and data


def demo_inputs(script_args, training_args, model_args):
    """The demo's pair and prompts: its teacher, the chosen student, the RL run's training problems."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from tgpo_trl.demo.build import build_demo_models
    from tgpo_trl.demo.run import TRAIN_SEED
    from tgpo_trl.demo.task import build_dataset

    state = PartialState()
    with state.local_main_process_first():
        models = build_demo_models(size=script_args.demo_size, progress=state.is_local_main_process)
    if training_args.teacher_model_name_or_path is None:
        training_args.teacher_model_name_or_path = str(models.teacher)
    if not model_args.model_name_or_path:
        model_args.model_name_or_path = str(getattr(models, script_args.gap_demo_student))
    dataset = build_dataset(script_args.gap_num_prompts, TRAIN_SEED, "train")
    return dataset, AutoTokenizer.from_pretrained(models.tokenizer)


def build_trainer(training_args, model_args, reward_funcs, dataset, processing_class=None) -> TGPOTrainer:
    """The trainer a run with these settings would build (its teacher, vocabulary rule, generation and rewards)."""
    training_args.model_init_kwargs = train.model_init_kwargs(training_args, model_args)
    return TGPOTrainer(
        model=model_args.model_name_or_path, reward_funcs=reward_funcs, args=training_args, train_dataset=dataset,
        processing_class=processing_class, peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )


# ------------------------------------------------------------------ entry point


def cli(argv: list[str] | None = None, prog: str = PROG) -> GapReport | None:
    """Bad input stops here with one line naming the field, before any model is loaded."""
    argv = sys.argv[1:] if argv is None else list(argv)
    processing_class = None
    try:
        script_args, training_args, model_args = parse_args(argv, prog)
        reward_funcs = validate(script_args, training_args, model_args)
        if script_args.demo_size is None:
            train_dataset, _ = train.load_datasets(script_args, training_args, model_args)
            train_dataset = first_prompts(train_dataset, script_args.gap_num_prompts)
    except ValueError as error:
        raise SystemExit(f"{prog}: error: {error}") from None
    if script_args.demo_size is not None:
        train_dataset, processing_class = demo_inputs(script_args, training_args, model_args)
    trainer = build_trainer(training_args, model_args, reward_funcs, train_dataset, processing_class)
    report = measure_gap(trainer, train_dataset, script_args.options())
    if report is not None:
        paths = report.write(training_args.output_dir)
        print(report.verdict["text"])
        print("Written: " + ", ".join(map(str, paths)))
    # The process group ends on every process together, after the main one wrote (one leaving early while another still
    # holds its connections was seen to abort under gloo)
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()
    return report


if __name__ == "__main__":
    cli(prog=prog_name(PROG))
