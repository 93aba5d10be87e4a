"""`benchmarks/cross_tokenizer.py`: its quick mode trains two different BPEs into the cache it is given, loads them back
(without training on a rerun), and writes results of the right shape; the vocabulary map of the pair it trained is
checked by hand."""

import json
import math
from pathlib import Path

import conftest
import pytest
from transformers import AutoTokenizer

from tgpo_trl.alignment import CrossTokenizerAlignment

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "cross_tokenizer.py"
TABLES = {"token_bytes_student", "token_bytes_teacher", "vocabulary_map", "alignment_construction"}
PER_BATCH = {"teacher_batch", "to_student", "alignment", "teacher_forward", "to_student_topk", "alignment_topk",
             "teacher_forward_topk"}
CHECKS = {"alignment_vs_forward", "alignment_vs_forward_topk", "table_build"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir, cache_dir = tmp_path_factory.mktemp("benchmarks"), tmp_path_factory.mktemp("tokenizer_cache")
    stdout = conftest.run_script_quick(SCRIPT, out_dir, "--cache-dir", cache_dir)
    return out_dir, cache_dir, stdout, json.loads((out_dir / "cross_tokenizer.json").read_text())


def finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_run_writes_json_of_the_right_shape(quick_run):
    _, _, _, result = quick_run
    assert result["quick"] is True
    settings = result["settings"]
    assert result["environment"]["torch_threads"] == settings["threads"] == 1
    assert result["environment"]["device"] == "cpu"
    assert result["corpus"]["bytes"] >= settings["corpus_mb"] * 2**20 and result["corpus"]["held_out_bytes"] > 0

    assert set(result["table_build_s"]) == TABLES
    for name, summary in result["table_build_s"].items():
        assert summary["n"] == settings["table_repeats"] == len(summary["samples"]), name
        assert 0 < summary["min"] <= summary["median"] <= summary["max"], name
    per_batch = result["per_batch_s"]
    assert set(per_batch) == PER_BATCH
    for name, summary in per_batch.items():
        assert summary["n"] == settings["rounds"] == len(summary["samples"]), name
        assert 0 < summary["min"] <= summary["median"] <= summary["max"], name
    for round_index in range(settings["rounds"]):  # the alignment is the two parts of the same round
        parts = per_batch["teacher_batch"]["samples"][round_index] + per_batch["to_student"]["samples"][round_index]
        assert per_batch["alignment"]["samples"][round_index] == pytest.approx(parts)

    checks = result["checks"]
    assert set(checks) == CHECKS
    for name, check in checks.items():
        assert finite_positive(check["value"]), name
        assert isinstance(check["pass"], bool) and check["pass"] == (check["value"] <= check["target"]), name
    ratio = checks["alignment_vs_forward"]
    assert ratio["target"] == 0.10
    assert ratio["value"] == pytest.approx(per_batch["alignment"]["median"] / per_batch["teacher_forward"]["median"])
    assert finite_positive(ratio["paired_rounds_median"])

    shapes = result["batch_shapes"]
    assert shapes["batches"] == settings["rounds"] and shapes["rows_per_batch"] == settings["batch"]
    assert shapes["teacher_completion_tokens_per_row"] > 0 and shapes["teacher_prompt_tokens_per_row"] > 0
    assert 0 < shapes["aligned_share"] < 1  # real text, two segmentations: some positions only
    vocab = result["vocabulary_map"]
    assert 0 < vocab["exact_ratio"] < 1 and 0 < vocab["mapped_share"] <= 1
    assert vocab["exact_ids"] + vocab["prefix_mapped_ids"] + vocab["unmapped_ids"] <= vocab["teacher_ids"]


def test_quick_run_trains_two_different_tokenizers_outside_the_repository(quick_run):
    _, cache_dir, _, result = quick_run
    records = result["tokenizers"]
    for role, target in (("student", "student_vocab"), ("teacher", "teacher_vocab")):
        record = records[role]
        assert record["trained_this_run"] is True and record["train_time_s"] > 0
        assert record["target_vocab"] == result["settings"][target]
        assert 0 < record["vocab_size"] <= record["target_vocab"]
        assert record["reached_target"] == (record["vocab_size"] == record["target_vocab"])
        path = Path(record["path"])
        assert path.parent == cache_dir and not path.resolve().is_relative_to(REPO)
    assert records["student"]["regex_split"] is True and records["teacher"]["regex_split"] is False
    student = AutoTokenizer.from_pretrained(records["student"]["path"])
    teacher = AutoTokenizer.from_pretrained(records["teacher"]["path"])
    assert len(student) == records["student"]["vocab_size"] != records["teacher"]["vocab_size"] == len(teacher)
    assert student.get_vocab() != teacher.get_vocab()
    text = "    def __init__(self, name):\n        self.name = name\n"
    assert student.tokenize(text) != teacher.tokenize(text)  # two segmentations of the same text
    assert student.decode(student(text)["input_ids"]) == teacher.decode(teacher(text)["input_ids"]) == text


def test_vocabulary_map_of_the_trained_pair_checked_by_hand(quick_run):
    _, _, _, result = quick_run
    records = result["tokenizers"]
    student = AutoTokenizer.from_pretrained(records["student"]["path"])
    teacher = AutoTokenizer.from_pretrained(records["teacher"]["path"])
    alignment = CrossTokenizerAlignment(student, teacher, student_rows=len(student))
    table = alignment.vocabulary.teacher_to_student
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    specials = set(student.all_special_tokens) | set(teacher.all_special_tokens)
    # byte-level tokens are strings of one character per byte: the same string is the same bytes
    shared = sorted((token for token in set(s_vocab) & set(t_vocab) if token not in specials),
                    key=lambda token: (-len(token), token))
    assert len(shared) > 100
    for token in shared[:20] + ["Ġ", "a", "Ċ"]:  # the longest shared tokens, and single bytes
        assert table[t_vocab[token]].item() == s_vocab[token], token
    # every teacher token the student lacks maps to the longest student token it starts with
    teacher_only = sorted(token for token in set(t_vocab) - set(s_vocab) if token not in specials)
    assert len(teacher_only) > 100
    for token in teacher_only:
        prefix = next(token[:size] for size in range(len(token) - 1, 0, -1) if token[:size] in s_vocab)
        assert table[t_vocab[token]].item() == s_vocab[prefix], token
    assert table[teacher.convert_tokens_to_ids("<|im_end|>")].item() == student.eos_token_id  # the end of turn
    exact = sum(token in s_vocab for token in t_vocab) / len(t_vocab)
    assert result["vocabulary_map"]["exact_ratio"] == pytest.approx(exact)
    assert alignment.vocabulary.exact_ratio == pytest.approx(exact)


def test_quick_run_writes_markdown_and_prints_the_checks(quick_run):
    out_dir, _, stdout, _ = quick_run
    text = (out_dir / "cross_tokenizer.md").read_text()
    assert text.startswith("# Cross-tokenizer teachers at real scale")
    assert "| Check | Measured | Target | Result |" in text and "`--quick` run" in text
    assert "## Table build" in text and "## Per batch" in text
    assert "Checks:" in stdout
    for name in CHECKS:
        assert f"{name}: " in stdout


def test_render_rewrites_the_same_report_and_a_rerun_loads_the_cached_tokenizers(quick_run, tmp_path):
    out_dir, cache_dir, _, result = quick_run
    conftest.run_script_quick(SCRIPT, tmp_path / "rendered", "--render", out_dir / "cross_tokenizer.json")
    assert (tmp_path / "rendered" / "cross_tokenizer.md").read_text() == (out_dir / "cross_tokenizer.md").read_text()
    assert json.loads((tmp_path / "rendered" / "cross_tokenizer.json").read_text()) == result

    conftest.run_script_quick(SCRIPT, tmp_path / "rerun", "--cache-dir", cache_dir, "--rounds", 1,
                              "--table-repeats", 1)
    rerun = json.loads((tmp_path / "rerun" / "cross_tokenizer.json").read_text())
    for role, record in rerun["tokenizers"].items():
        assert record["trained_this_run"] is False, role
        assert record["path"] == result["tokenizers"][role]["path"]
        assert record["train_time_s"] == result["tokenizers"][role]["train_time_s"]  # from the first run's record
    assert rerun["vocabulary_map"] == result["vocabulary_map"]
