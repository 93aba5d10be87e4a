import os


os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from trl.rewards import accuracy_reward as trl_accuracy_reward  # noqa: E402

from tgpo_trl.rewards import (  # noqa: E402
    REWARD_FUNCS,
    accuracy_reward,
    exact_match_reward,
    format_reward,
    get_reward_funcs,
)


def chat(*texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


# What GRPOTrainer passes besides the dataset columns
TRAINER_KWARGS = dict(prompts=None, completion_ids=None, trainer_state=None, log_metric=lambda *a: None)


def test_exact_match_demo_answers_plain_and_conversational():
    texts = ["7+8+9=24\n4+3+2+2=11\n#### 114", "#### 113", "114", "#### ", "####114\n#### 113"]
    expected = [1.0, 0.0, 0.0, 0.0, 1.0]  # no marker or an empty one is wrong; the first marker counts
    assert exact_match_reward(texts, answer=["114"] * 5) == expected
    assert exact_match_reward(chat(*texts), answer=["114"] * 5, **TRAINER_KWARGS) == expected


def test_format_reward_is_one_zero_minus_one():
    texts = ["#### 114", "#### 113", "the answer is probably big", r"so it is \boxed{114}", r"\boxed{115}"]
    assert format_reward(chat(*texts), answer=["114"] * 5) == [1.0, 0.0, -1.0, 1.0, 0.0]


def test_format_reward_math_verifies_latex():
    texts = [r"Hence $\boxed{\frac{1}{2}}$.", r"\boxed{0.5}", r"\boxed{\frac{1}{3}}", r"1/2, I think"]
    # An answer outside a box is not an answer
    gold = [r"\frac{1}{2}", "1/2", r"\frac{1}{2}", r"\frac{1}{2}"]
    assert format_reward(texts, answer=gold) == [1.0, 1.0, 0.0, -1.0]


def test_format_reward_reads_any_expression_after_the_marker():
    texts = ["#### 0.5", r"#### \frac{1}{2}", "#### 1,000\nthanks", "#### 0"]
    assert format_reward(texts, answer=["1/2", "0.5", "1000", "0.5"]) == [1.0, 1.0, 1.0, 0.0]


def test_format_reward_skips_unparseable_reference():
    assert format_reward(["#### 5"], answer=["not a number"]) == [None]


def test_accuracy_reward_adapts_answer_column_and_plain_strings():
    texts = [r"so \boxed{\frac{1}{3}}", r"\boxed{\frac{1}{2}}", "#### 114"]
    gold = [r"\frac{1}{3}", r"\frac{1}{3}", "114"]
    expected = trl_accuracy_reward(chat(*texts), gold)
    assert expected == [1.0, 0.0, 0.0]  # TRL's accuracy needs a boxed answer: the demo marker does not count
    assert accuracy_reward(texts, answer=gold) == expected
    assert accuracy_reward(chat(*texts), solution=gold, **TRAINER_KWARGS) == expected


def test_accuracy_reward_forwards_log_extra():
    logged = {}
    accuracy_reward([r"\boxed{2}"], answer=["2"], log_extra=logged.__setitem__)
    assert logged["solution"] == ["2"]


def test_accuracy_reward_without_reference_column():
    with pytest.raises(ValueError, match="solution"):
        accuracy_reward(["#### 1"])


def test_get_reward_funcs():
    assert get_reward_funcs(["format", "exact_match"]) == [format_reward, exact_match_reward]
    assert get_reward_funcs("accuracy") == [accuracy_reward]
    assert set(REWARD_FUNCS) == {"exact_match", "format", "accuracy"}


def test_get_reward_funcs_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="'accurracy'.*exact_match, format, accuracy"):
        get_reward_funcs(["exact_match", "accurracy"])
