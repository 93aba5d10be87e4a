"""A second verifiable task family: a three-digit number times a one-digit number (`347*8`).

Not a sum: the skill is the times table, digit by digit from the units, with the carry added. The worked solution
writes one small product per line, `7*8=56`, `4*8+5=37`, `3*8+3=27`, then the marker line `#### 2776`. As in the
column sum (`task.py`), a 64-hidden/2-layer model can hardly produce the answer in one shot, and the two students are
made the same way: one writes the teacher's lines (small gap), one the same lines in other separators (`,` for `+`,
`:` for `=`, `;` between lines: large gap). The answer marker, its parser and the reward are `task.py`'s.

The problem space is small (900 x 8 = 7,200 questions), so one question in five is held out (not one in ten): the
held-out half that is not validation still has ~720 test problems.
"""

import random
import zlib
from collections.abc import Iterator

from datasets import Dataset

from . import task


NAME = "column_product"
MULTIPLICAND_MIN, MULTIPLICAND_MAX = 100, 999
MULTIPLIER_MIN, MULTIPLIER_MAX = 2, 9
STYLES = ("teacher", "commas", "bare")
# Longest completion: 3 lines of at most 8 characters, 2 line breaks and `#### dddd` after a third = 35, + <eos>
MAX_COMPLETION_LENGTH = 40
TEST_BUCKETS = 5


def make_problem(rng: random.Random) -> dict:
    number, digit = rng.randint(MULTIPLICAND_MIN, MULTIPLICAND_MAX), rng.randint(MULTIPLIER_MIN, MULTIPLIER_MAX)
    return {"numbers": [number, digit], "question": f"{number}*{digit}", "answer": str(number * digit)}


def problem_split(question: str) -> str:
    """`"test"` (held out) or `"train"`, from a hash of the question, the same in every process."""
    return "test" if zlib.crc32(question.encode()) % TEST_BUCKETS == 0 else "train"


def iter_problems(seed: int, split: str) -> Iterator[dict]:
    return task.iter_problems(seed, split, make=make_problem, split_of=problem_split)


def build_dataset(n: int, seed: int, split: str) -> Dataset:
    return task.build_dataset(n, seed, split, problems_of=iter_problems)


def _digit_lines(number: int, digit: int) -> list[str]:
    """Units first: `d*digit(+carry)=value`, the carry being the previous value's tens; the last value is written
    whole (it is the answer's leading digits)."""
    lines, carry = [], 0
    for position, d in enumerate(reversed(str(number))):
        value = int(d) * digit + carry
        lines.append(f"{d}*{digit}" + (f"+{carry}" if position else "") + f"={value}")
        carry = value // 10
    return lines


def solution_text(problem: dict, style: str) -> str:
    """The completion for `problem` in `style` (one of `STYLES`), ending with the marker line."""
    number, digit = problem["numbers"]
    final = f"{task.ANSWER_MARKER} {problem['answer']}"
    if style == "teacher":
        return "\n".join([*_digit_lines(number, digit), final])
    if style == "commas":
        return task.in_commas("\n".join(_digit_lines(number, digit))) + f";{final}"
    if style == "bare":
        return final
    raise ValueError(f"Unknown style {style!r}; valid styles: {', '.join(STYLES)}")
