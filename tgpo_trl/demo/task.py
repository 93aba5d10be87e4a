"""The demo's verifiable reasoning task: the sum of three two-digit numbers.

Why this task: the answer needs two carries, which a 64-hidden/2-layer model can hardly produce in one shot
("bare" answers), while a worked column-wise solution turns it into two small digit sums that a
128-hidden/4-layer teacher learns almost perfectly and a 64-hidden/2-layer student only partly. The "commas" style is the same column
method written differently (`,` between digits, `:` for `=`, `;` between lines): a student trained on it has the
same skill as one trained on the teacher's style, but the teacher gives its separators almost no probability, though
it has learned to read them (large gap), while a student trained on the teacher's own style is the teacher's family, only
weaker (small gap). "alt" (running sums of whole numbers, left to right) is a different method altogether.

Every completion ends with a marker line `#### <answer>` that `extract_answer` reads.
"""

import random
import re
import zlib
from collections.abc import Iterator

from datasets import Dataset


NUM_OPERANDS = 3
OPERAND_MIN, OPERAND_MAX = 10, 99
ANSWER_MARKER = "####"
STYLES = ("teacher", "commas", "alt", "bare")
# Longest completion of any style is 29 characters (= tokens for the char tokenizer) + <eos>; 40 leaves room.
MAX_COMPLETION_LENGTH = 40
# One question in ten is held out: the split is a function of the question, so no seed can make them overlap.
TEST_BUCKETS = 10

_ANSWER_PATTERN = re.compile(re.escape(ANSWER_MARKER) + r"\s*(-?\d+)")


def make_problem(rng: random.Random) -> dict:
    """Draw one problem: its operands, the question text and the answer as a string."""
    numbers = [rng.randint(OPERAND_MIN, OPERAND_MAX) for _ in range(NUM_OPERANDS)]
    return {"numbers": numbers, "question": "+".join(map(str, numbers)), "answer": str(sum(numbers))}


def problem_split(question: str) -> str:
    """`"test"` or `"train"`, from a hash of the question that, unlike `hash()`, is the same in every process."""
    return "test" if zlib.crc32(question.encode()) % TEST_BUCKETS == 0 else "train"


def iter_problems(seed: int, split: str, make=make_problem, split_of=problem_split) -> Iterator[dict]:
    """An endless, seeded stream of problems of one split (repeats possible), for supervised training. `make` and
    `split_of` are another task's problem maker and split (`product_task.py`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    while True:
        problem = make(rng)
        if split_of(problem["question"]) == split:
            yield problem


def _column_solution(numbers: list[int]) -> str:
    """Units column, then tens column with the carry written out: each line is one small digit sum."""
    units = sum(n % 10 for n in numbers)
    tens = sum(n // 10 for n in numbers) + units // 10
    units_line = "+".join(str(n % 10) for n in numbers) + f"={units}"
    tens_line = "+".join(str(n // 10) for n in numbers) + f"+{units // 10}={tens}"
    return f"{units_line}\n{tens_line}"


def in_commas(text: str) -> str:
    """Worked lines in the large-gap students' separators: `,` for `+`, `:` for `=`, `;` between lines."""
    return text.replace("+", ",").replace("=", ":").replace("\n", ";")


def _comma_column_solution(numbers: list[int]) -> str:
    """The column method in other separators: `7,3,5:15;6,2,4,1:13`, as long as the teacher's solution."""
    return in_commas(_column_solution(numbers))


def _running_sum_solution(numbers: list[int]) -> str:
    """Whole numbers added left to right: another family, different step order and different tokens."""
    lines, total = [], numbers[0]
    for n in numbers[1:]:
        lines.append(f"{total}+{n}={total + n}")
        total += n
    return "\n".join(lines)


def solution_text(problem: dict, style: str) -> str:
    """The assistant's completion for `problem` in `style` (one of `STYLES`), ending with the marker line."""
    final = f"{ANSWER_MARKER} {problem['answer']}"
    if style == "teacher":
        return f"{_column_solution(problem['numbers'])}\n{final}"
    if style == "commas":
        return f"{_comma_column_solution(problem['numbers'])};{final}"
    if style == "alt":
        return f"{_running_sum_solution(problem['numbers'])}\n{final}"
    if style == "bare":
        return final
    raise ValueError(f"Unknown style {style!r}; valid styles: {', '.join(STYLES)}")


def extract_answer(text: str) -> str | None:
    """The integer after the first `####` marker (without leading zeros), or None if there is none (unparseable).

    The first marker counts, so a completion cannot hedge by writing several answers.
    """
    match = _ANSWER_PATTERN.search(text)
    return str(int(match.group(1))) if match else None


def build_dataset(n: int, seed: int, split: str, problems_of=iter_problems) -> Dataset:
    """`n` distinct problems of `split` as a conversational dataset with `prompt` and `answer` columns (drawn from
    `problems_of(seed, split)`: another task's `iter_problems`)."""
    return problems_dataset(n, problems_of(seed, split), split)


def problems_dataset(n: int, stream: Iterator[dict], split: str) -> Dataset:
    """The first `n` distinct problems of `stream`; a `ValueError` when the split has fewer (a small problem space,
    as `product_task.py`'s, would otherwise be searched forever)."""
    problems = {}
    for draws, problem in enumerate(stream, 1):
        problems.setdefault(problem["question"], problem["answer"])
        if len(problems) == n:
            break
        if draws > 100 * n + 100_000:
            raise ValueError(f"asked for {n} distinct {split!r} problems, found only {len(problems)} in {draws} draws")
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": question}] for question in problems],
            "answer": list(problems.values()),
        }
    )
