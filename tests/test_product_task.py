"""The second demo task family (`tgpo_trl.demo.product_task`): its worked solutions are right for every problem, its
splits never meet, and the demo build makes its models apart from the column sum's."""

import os
import random


os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tgpo_trl.demo import build, product_task  # noqa: E402
from tgpo_trl.demo.task import extract_answer, problems_dataset  # noqa: E402


PROBLEM = {"numbers": [347, 8], "question": "347*8", "answer": "2776"}
ALL_PROBLEMS = [{"numbers": [n, d], "question": f"{n}*{d}", "answer": str(n * d)}
                for n in range(100, 1000) for d in range(2, 10)]


def test_solution_styles():
    assert product_task.solution_text(PROBLEM, "teacher") == "7*8=56\n4*8+5=37\n3*8+3=27\n#### 2776"
    assert product_task.solution_text(PROBLEM, "commas") == "7*8:56;4*8,5:37;3*8,3:27;#### 2776"
    assert product_task.solution_text(PROBLEM, "bare") == "#### 2776"
    with pytest.raises(ValueError, match="teacher, commas, bare"):
        product_task.solution_text(PROBLEM, "alt")


def test_every_problem_worked_solution_is_right_and_fits():
    for problem in ALL_PROBLEMS:
        number, digit = problem["numbers"]
        teacher = product_task.solution_text(problem, "teacher")
        for style in product_task.STYLES:
            text = product_task.solution_text(problem, style)
            assert extract_answer(text) == problem["answer"]
            assert len(text) < product_task.MAX_COMPLETION_LENGTH  # one char = one token, plus <eos>
        # Each line is a true digit product plus the previous line's carry; the digits read off are the answer
        lines, carry, digits = teacher.split("\n")[:-1], 0, []
        for position, line in enumerate(lines):
            left, value = line.split("=")
            terms = left.split("+")
            d, times = map(int, terms[0].split("*"))
            assert times == digit and d == int(str(number)[-1 - position])
            assert len(terms) == (2 if position else 1) and (int(terms[1]) if position else 0) == carry
            assert int(value) == d * digit + carry
            carry = int(value) // 10
            digits.append(value if position == len(lines) - 1 else value[-1])
        assert "".join(reversed(digits)) == problem["answer"]


def test_make_problem_covers_the_space_and_is_seeded():
    a, b = product_task.make_problem(random.Random(3)), product_task.make_problem(random.Random(3))
    assert a == b and int(a["answer"]) == a["numbers"][0] * a["numbers"][1]
    assert a["question"] == f"{a['numbers'][0]}*{a['numbers'][1]}"


def test_splits_are_disjoint_and_a_fifth_is_held_out():
    held_out = {p["question"] for p in ALL_PROBLEMS if product_task.problem_split(p["question"]) == "test"}
    assert 0.17 < len(held_out) / len(ALL_PROBLEMS) < 0.23
    train = {p[0]["content"] for seed in range(3) for p in product_task.build_dataset(2000, seed, "train")["prompt"]}
    test = {p[0]["content"] for p in product_task.build_dataset(600, 0, "test")["prompt"]}
    assert not train & held_out and test <= held_out and len(test) == 600
    # More distinct problems than the split holds: an error, not an endless search
    with pytest.raises(ValueError, match="distinct 'test' problems, found only"):
        product_task.build_dataset(len(held_out) + 1, 0, "test")
    with pytest.raises(ValueError, match="found only 2"):
        problems_dataset(3, iter([PROBLEM, {**PROBLEM, "question": "1*2"}] * 200_000), "train")


def test_the_build_keeps_each_task_apart(tmp_path):
    product = build.build_demo_models(cache_dir=tmp_path, size="quick", progress=False, task="column_product")
    assert product.root.name.startswith("quick-column_product-")
    assert set(product.report["models"]) == set(build.MODEL_NAMES)
    tokenizer = AutoTokenizer.from_pretrained(product.tokenizer)
    assert AutoModelForCausalLM.from_pretrained(product.teacher).config.vocab_size == len(tokenizer)
    again = build.build_demo_models(cache_dir=tmp_path, size="quick", progress=False, task="column_product")
    assert again.root == product.root and again.report == product.report  # cached
    assert build.build_demo_models(cache_dir=tmp_path, size="quick", progress=False).root != product.root
    with pytest.raises(ValueError, match="column_sum, column_product"):
        build.build_demo_models(cache_dir=tmp_path, size="quick", task="column_difference")


def test_supervised_batches_are_the_task_s_problems_and_solutions():
    tokenizer = build.build_char_tokenizer()
    spec = build.PRODUCT_SIZES["quick"].student_small_gap
    input_ids, _, labels = next(build._training_batches(tokenizer, spec, 8, product_task))
    for ids, row_labels in zip(input_ids.tolist(), labels.tolist(), strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        target = tokenizer.decode([t for t in row_labels if t != -100], skip_special_tokens=True)
        number, digit = map(int, text.removesuffix(target).split("*"))
        problem = {"numbers": [number, digit], "answer": str(number * digit)}
        assert target == product_task.solution_text(problem, spec.style)
