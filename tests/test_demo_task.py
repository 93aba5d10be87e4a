import dataclasses
import itertools
import json
import os
import random


os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tgpo_trl.demo import build  # noqa: E402
from tgpo_trl.demo.evaluate import greedy_completions, greedy_evaluation, teacher_mismatch_ratio  # noqa: E402
from tgpo_trl.demo.task import (  # noqa: E402
    MAX_COMPLETION_LENGTH,
    STYLES,
    build_dataset,
    extract_answer,
    iter_problems,
    make_problem,
    solution_text,
)
from tgpo_trl.demo.tokenizer import build_char_tokenizer  # noqa: E402


PROBLEM = {"numbers": [47, 38, 29], "question": "47+38+29", "answer": "114"}


def test_make_problem_is_seeded_and_consistent():
    a, b = make_problem(random.Random(3)), make_problem(random.Random(3))
    assert a == b
    assert a["question"] == "+".join(map(str, a["numbers"]))
    assert int(a["answer"]) == sum(a["numbers"])


def test_solution_styles():
    assert solution_text(PROBLEM, "teacher") == "7+8+9=24\n4+3+2+2=11\n#### 114"
    assert solution_text(PROBLEM, "commas") == "7,8,9:24;4,3,2,2:11;#### 114"
    assert solution_text(PROBLEM, "alt") == "47+38=85\n85+29=114\n#### 114"
    assert solution_text(PROBLEM, "bare") == "#### 114"
    with pytest.raises(ValueError, match="teacher, commas, alt, bare"):
        solution_text(PROBLEM, "verbose")


def test_every_style_is_correct_and_fits_the_completion_budget():
    rng = random.Random(0)
    for _ in range(2000):
        problem = make_problem(rng)
        for style in STYLES:
            text = solution_text(problem, style)
            assert extract_answer(text) == problem["answer"]
            assert len(text) < MAX_COMPLETION_LENGTH  # one char = one token, plus <eos>


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4+3=7\n#### 53", "53"),
        ("####53", "53"),
        ("#### -7", "-7"),
        ("#### 007", "7"),
        ("#### 12\n#### 13", "12"),
        ("#### ", None),
        ("53", None),
        ("## 53", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_build_dataset_columns_and_answers():
    dataset = build_dataset(50, seed=0, split="train")
    assert dataset.column_names == ["prompt", "answer"]
    assert len(dataset) == 50
    for prompt, answer in zip(dataset["prompt"], dataset["answer"]):
        assert [message["role"] for message in prompt] == ["user"]
        assert sum(map(int, prompt[0]["content"].split("+"))) == int(answer)


def test_build_dataset_splits_are_disjoint_for_any_seeds():
    def questions(n, seed, split):
        return {p[0]["content"] for p in build_dataset(n, seed, split)["prompt"]}

    train = questions(3000, 0, "train") | questions(3000, 1, "train")
    test = questions(500, 0, "test") | questions(500, 1, "test")
    assert len(test) > 500  # different seeds draw different problems...
    assert not train & test  # ...but never across splits
    assert questions(100, 0, "test") == questions(100, 0, "test")
    with pytest.raises(ValueError, match="split"):
        build_dataset(1, 0, "validation")


class SumOracle(torch.nn.Module):
    """Stands in for a model: greedily "generates" `#### <sum>` for even sums and `#### 0` otherwise, then <eos> and
    padding, like `generate` does for rows that finish early."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for text in self.tokenizer.batch_decode(input_ids, skip_special_tokens=True):
            total = sum(map(int, text.split("+")))
            completion = f"#### {total if total % 2 == 0 else 0}"
            ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            rows.append(ids + [self.tokenizer.eos_token_id])
        width = max(map(len, rows)) + 3
        rows = [row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(rows)], 1)


def test_greedy_evaluation_scores_exact_matches_and_lengths():
    tokenizer = build_char_tokenizer()
    dataset = build_dataset(70, seed=0, split="test")
    evaluation = greedy_evaluation(SumOracle(tokenizer), tokenizer, dataset, MAX_COMPLETION_LENGTH, batch_size=16)
    answers = [int(a) for a in dataset["answer"]]
    assert evaluation.accuracy == sum(a % 2 == 0 for a in answers) / len(answers)
    expected_lengths = [len(f"#### {a if a % 2 == 0 else 0}") + 1 for a in answers]  # <eos> counts, padding not
    assert evaluation.mean_length == pytest.approx(sum(expected_lengths) / len(answers))


def test_foreign_prefix_rewrites_only_separators_before_the_cut():
    text = solution_text(PROBLEM, "teacher")
    rng = random.Random(0)
    for _ in range(200):
        rewritten, cut = build.reread_prefix(text, rng)
        assert len(rewritten) == len(text) and 1 <= cut < len(text)
        assert rewritten[cut:] == text[cut:]
        for new, old in zip(rewritten[:cut], text[:cut], strict=True):
            assert new in build.FOREIGN_SEPARATORS if old in "+=\n" else new == old


def test_training_batches_skip_the_loss_on_a_foreign_prefix():
    tokenizer = build_char_tokenizer()
    problems = list(itertools.islice(iter_problems(0, "train"), 8))
    solutions = [solution_text(p, "teacher") + tokenizer.eos_token for p in problems]
    for fraction in (0.0, 1.0):
        spec = build.ModelSpec(8, 1, 1, "teacher", steps=1, learning_rate=1e-3, seed=0,
                               foreign_prefix_fraction=fraction)
        input_ids, _, labels = next(build._training_batches(tokenizer, spec, batch_size=8))
        for row, row_labels, solution in zip(input_ids, labels, solutions, strict=True):
            scored = tokenizer.decode(row_labels[row_labels != -100])
            written = tokenizer.decode(row[-len(tokenizer(solution)["input_ids"]) :])
            assert solution.endswith(scored)  # what is scored is the model's own style
            if fraction == 0.0:
                assert scored == solution == written
            else:  # a rewritten prefix, read but not scored
                assert len(scored) < len(solution) and written.endswith(scored) and written != solution


def test_training_batches_mix_in_the_teachers_style():
    tokenizer = build_char_tokenizer()
    problems = list(itertools.islice(iter_problems(2, "train"), 64))
    for fraction in (0.0, 0.25):
        spec = build.ModelSpec(8, 1, 1, "commas", steps=1, learning_rate=1e-3, seed=2, teacher_style_fraction=fraction)
        _, _, labels = next(build._training_batches(tokenizer, spec, batch_size=64))
        styles = []
        for row_labels, problem in zip(labels, problems, strict=True):
            scored = tokenizer.decode(row_labels[row_labels != -100], skip_special_tokens=True)
            styles.append(next(s for s in ("teacher", "commas") if scored == solution_text(problem, s)))
        share = styles.count("teacher") / len(styles)
        assert share == 0.0 if fraction == 0.0 else 0.1 < share < 0.45


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    return build.build_demo_models(tmp_path_factory.mktemp("demo-cache"), size="quick", progress=False)


def test_quick_build_saves_loadable_models_and_report(quick_build):
    report = json.loads((quick_build.root / "build.json").read_text())
    assert report == quick_build.report
    assert report["key"] == build.SIZES["quick"].key() and report["size"] == "quick"
    tokenizer = AutoTokenizer.from_pretrained(quick_build.tokenizer)
    assert tokenizer.get_vocab() == build_char_tokenizer().get_vocab()
    for name in build.MODEL_NAMES:
        path = getattr(quick_build, name)
        spec = getattr(build.SIZES["quick"], name)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.hidden_size == spec.hidden_size
        assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
        assert 0.0 <= report["models"][name]["accuracy"] <= 1.0
    for name in ("student_large_gap", "student_small_gap"):
        assert 0.0 <= report["models"][name]["teacher_mismatch_ratio"] <= 1.0


def test_cached_build_is_reused(quick_build, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached build was retrained")

    monkeypatch.setattr(build, "train_supervised", no_training)
    again = build.build_demo_models(quick_build.root.parent, size="quick", progress=False)
    assert again == quick_build


def test_interrupted_build_leaves_nothing(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "train_supervised", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_demo_models(tmp_path, size="quick", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cache_key_follows_settings_and_env(monkeypatch, tmp_path):
    settings = build.SIZES["quick"]
    changed = dataclasses.replace(settings, batch_size=settings.batch_size + 1)
    assert changed.key() != settings.key() == build.SIZES["quick"].key()
    monkeypatch.setenv("TGPO_DEMO_CACHE", str(tmp_path))
    assert build.default_cache_dir() == tmp_path
    with pytest.raises(ValueError, match="full, quick"):
        build.build_demo_models(tmp_path, size="huge")


def test_teacher_agrees_with_its_own_greedy_completions(quick_build):
    """Teacher forcing on the teacher's own greedy tokens reproduces them (checks the prompt/completion alignment)."""
    tokenizer = AutoTokenizer.from_pretrained(quick_build.tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(quick_build.teacher)
    prompts = build_dataset(40, seed=1, split="test")["prompt"]
    completions = greedy_completions(teacher, tokenizer, prompts, MAX_COMPLETION_LENGTH, batch_size=16)
    assert teacher_mismatch_ratio(teacher, tokenizer, prompts, completions, batch_size=16) <= 0.01
    others = [[(token + 1) % len(tokenizer) for token in c] for c in completions]
    assert teacher_mismatch_ratio(teacher, tokenizer, prompts, others, batch_size=16) > 0.5


def test_accuracy_from_prefixes_spans_teacher_and_student():
    """From an empty prefix it is the teacher's own greedy accuracy; from the whole rollout, the rollout's own."""
    from tgpo_trl.demo.evaluate import encode_prompts, generate_completions, accuracy_from_prefixes

    models = build.build_demo_models(size="quick", progress=False)  # the shared default cache, as the CLI tests
    tokenizer = AutoTokenizer.from_pretrained(models.tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(models.teacher)
    student = AutoModelForCausalLM.from_pretrained(models.student_small_gap)
    test_set = build_dataset(24, 0, "test")
    torch.manual_seed(0)
    rollouts = generate_completions(student, tokenizer, encode_prompts(tokenizer, test_set["prompt"]),
                                    MAX_COMPLETION_LENGTH, temperature=1.0)

    from_prompt = accuracy_from_prefixes(teacher, tokenizer, test_set, rollouts, 0.0, MAX_COMPLETION_LENGTH)
    assert from_prompt == greedy_evaluation(teacher, tokenizer, test_set, MAX_COMPLETION_LENGTH).accuracy
    # A rollout kept whole up to its <eos>: the teacher can only add text after the student's marker line
    texts = tokenizer.batch_decode(rollouts, skip_special_tokens=True)
    student_correct = [extract_answer(t) == a for t, a in zip(texts, test_set["answer"], strict=True)]
    whole = accuracy_from_prefixes(teacher, tokenizer, test_set, rollouts, 1.0, MAX_COMPLETION_LENGTH)
    assert whole >= sum(student_correct) / len(texts)
