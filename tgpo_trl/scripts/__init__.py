"""The entry points behind the `tgpo` command (`tgpo_trl.cli`): `train.py` (`tgpo train`) and `gap_report.py`
(`tgpo gap-report`). Each is a script accelerate can launch, and a module: `make_parser`, `parse_args`, `validate` and
`cli(argv)`. The files in the repository's `scripts/` folder are wrappers around them."""

import os

# Set by `tgpo` for the processes it launches, so that their errors name the command the user typed
PROG_VARIABLE = "TGPO_PROG"


def prog_name(default: str) -> str:
    return os.environ.get(PROG_VARIABLE) or default
