"""Verifiable outcome rewards with TRL's reward-function signature.

`GRPOTrainer` calls each function as `f(prompts=..., completions=..., completion_ids=..., **columns)`, where
`columns` are the dataset's extra columns as lists (here `answer` or `solution`). Completions are conversational
(`[{"role": "assistant", "content": str}]`) or plain strings; both are accepted. A `None` reward tells the
trainer to skip that sample (used when the reference answer itself cannot be parsed).
"""

import threading
from collections.abc import Callable, Iterable

from math_verify import LatexExtractionConfig, parse, verify
from trl.rewards import accuracy_reward as trl_accuracy_reward

from .demo.task import ANSWER_MARKER, extract_answer


RewardFunc = Callable[..., list[float | None]]


def completion_text(completion: str | list[dict]) -> str:
    """The text of a plain or conversational completion (the last message holds the final answer)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_match_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """Demo task: 1.0 if the `####` answer equals the reference exactly, else 0.0 (wrong or unparseable)."""
    return [
        float(extract_answer(completion_text(c)) == str(gold).strip())
        for c, gold in zip(completions, answer, strict=True)
    ]


def _math_verify_timeout() -> int | None:
    # math_verify enforces timeouts with signal.alarm, which only works in the main thread (as in TRL).
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse_prediction(text: str, timeout: int | None) -> list:
    """The predicted answer: the rest of the line after the first `####` marker if there is one (any expression:
    `0.5`, `1,000`, `\\frac{1}{2}`), else the first `\\boxed{}` (or an explicit "final answer is" anchor); an empty
    list when there is none."""
    _, marker, rest = text.partition(ANSWER_MARKER)
    marked = rest.strip().splitlines()[0].strip() if marker and rest.strip() else ""
    if marked:
        return parse(marked, parsing_timeout=timeout)
    boxed_only = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)
    return parse(text, extraction_config=[boxed_only], extraction_mode="first_match", parsing_timeout=timeout)


def format_reward(completions: list, answer: list[str], **kwargs) -> list[float | None]:
    """The paper's outcome reward: 1 correct, 0 wrong, -1 unparseable (no `####` answer and no `\\boxed{}`).

    Correctness is decided by math verification, so `\\frac{1}{2}` and `0.5` agree. The -1 teaches the policy to
    always commit to a final answer. `None` (skip) when the reference answer cannot be parsed.
    """
    timeout = _math_verify_timeout()
    rewards = []
    for c, gold in zip(completions, answer, strict=True):
        gold_parsed = parse(str(gold), parsing_timeout=timeout)
        if not gold_parsed:
            rewards.append(None)
            continue
        predicted = _parse_prediction(completion_text(c), timeout)
        if not predicted:
            rewards.append(-1.0)
        else:
            rewards.append(float(verify(gold_parsed, predicted, timeout_seconds=timeout)))
    return rewards


def accuracy_reward(
    completions: list, answer: list[str] | None = None, solution: list[str] | None = None, **kwargs
) -> list[float | None]:
    """`trl.rewards.accuracy_reward` (math verification of a `\\boxed{}` answer: 1 correct, else 0), for datasets
    whose reference column is `answer` rather than `solution`, and for plain-string completions."""
    gold = solution if solution is not None else answer
    if gold is None:
        raise ValueError("accuracy_reward needs a `solution` or an `answer` dataset column")
    conversational = [[{"role": "assistant", "content": completion_text(c)}] for c in completions]
    return trl_accuracy_reward(conversational, gold, **kwargs)


REWARD_FUNCS: dict[str, RewardFunc] = {
    "exact_match": exact_match_reward,
    "format": format_reward,
    "accuracy": accuracy_reward,
}


def get_reward_funcs(names: str | Iterable[str]) -> list[RewardFunc]:
    """Reward functions by registry name (a single name or several), in the order given."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"Unknown reward function {unknown[0]!r}; valid names: {', '.join(REWARD_FUNCS)}")
    return [REWARD_FUNCS[name] for name in names]
