"""The `tgpo` command: `tgpo train ...` and `tgpo gap-report ...`, launched through `accelerate launch` as TRL's `trl`
command launches its scripts.

    tgpo train                                            # the offline demo
    tgpo train --config recipe.yaml --num_processes 8     # fields and accelerate's launch options, in any order
    tgpo train --accelerate_config zero3 --config recipe.yaml
    tgpo gap-report --config recipe.yaml --gap_num_prompts 256
    tgpo train --help                                     # every field

As `trl <command>` does, the command's own parser (`tgpo_trl.scripts.<name>.parse_args`) reads the arguments first:
`--help` stops there, and the flags no field takes are `accelerate launch`'s options (`--num_processes`,
`--config_file`, `--main_process_port`, ...). `--accelerate_config NAME|FILE` is resolved by TRL (a file, or one of the
configs TRL ships: multi_gpu, zero1, zero2, zero3, fsdp1, fsdp2). A flag that is neither a field nor a launch option,
a `--config` key that is no field, a value of the wrong type or outside a field's choices, and a missing config file
stop here, with one line naming them, before accelerate starts a process. The rest (a field's constraints, a missing
student or teacher, a reward function that does not import, the dataset) is checked by the launched script, with the
world size of the launch, before any model loads; its one-line error names the command too.
"""

import argparse
import importlib
import os
import subprocess
import sys
from importlib import resources

from tgpo_trl import __version__
from tgpo_trl.scripts import PROG_VARIABLE

# command -> (module in tgpo_trl.scripts, help)
COMMANDS = {
    "train": ("train", "Train a student with TGPO (no arguments: the offline demo)"),
    "gap-report": ("gap_report", "Measure a student-teacher pair before training, and say which method fits"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgpo", allow_abbrev=False,
                                     description="Teacher-Guided Policy Optimization (TGPO) for TRL.")
    parser.add_argument("--version", action="version", version=f"tgpo_trl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)  # the command's own parser has the help
    return parser


def remove_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (the flags for accelerate, taken out of the user's argv)."""
    rest, pending = [], iter(subsequence)
    current = next(pending, None)
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            rest.append(item)
    return rest


def accelerate_arguments(launch_args: list[str], script: str, script_args: list[str]) -> argparse.Namespace:
    """`accelerate launch <launch_args> <script> <script_args>` parsed by accelerate's own parser; a flag it does not
    know either raises `ValueError` naming it (accelerate would otherwise take a stray value for the script)."""
    from accelerate.commands.launch import launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    launch_args = resolve_accelerate_config_argument(launch_args)
    parser = launch_command_parser()
    checked, unknown = parser.parse_known_args([*launch_args, script])
    if checked.training_script != script:
        unknown.append(checked.training_script)
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (neither a field, see --help, nor an "
                         "`accelerate launch` option)")
    return parser.parse_args([*launch_args, script, *script_args])


def launch(command: str, argv: list[str]) -> None:
    """Parse and check `argv` with the command's own parser, then run its script under `accelerate launch`."""
    from accelerate.commands.launch import launch_command

    name = COMMANDS[command][0]
    module = importlib.import_module(f"tgpo_trl.scripts.{name}")
    prog = f"tgpo {command}"
    try:
        _, launch_args = module.parse_args(argv, prog=prog, launch_args=True)
        script = str(resources.files("tgpo_trl.scripts").joinpath(f"{name}.py"))
        accelerate_args = accelerate_arguments(launch_args, script, remove_subsequence(argv, launch_args))
    except ValueError as error:
        raise SystemExit(f"{prog}: error: {error}") from None
    os.environ[PROG_VARIABLE] = prog  # the launched processes' errors name the command
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as error:  # the process printed its error: no traceback of accelerate's
        raise SystemExit(error.returncode) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    launch(args.command, argv[argv.index(args.command) + 1 :])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
