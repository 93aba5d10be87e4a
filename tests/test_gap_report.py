"""The gap report (tgpo_trl/gap_report.py, tgpo_trl/gap.py) through its Python entry (`measure_gap` on a built trainer)
and its commands (`scripts/gap_report.py`, `tgpo gap-report`): an identical teacher, a full-logits recomputation of the
report's values, the quick demo, the verdict on the benchmark's regimes (and its cross-tokenizer rule), sharding, and
bad input."""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import conftest

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from datasets import Dataset

import tgpo_trl.cli
from tgpo_trl import gap as G
from tgpo_trl import gap_report as R
from tgpo_trl.scripts import gap_report as script_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gap_report.py"
COMMANDS = {"script": [sys.executable, str(SCRIPT)], "tgpo": [sys.executable, "-m", "tgpo_trl.cli", "gap-report"]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}


def has_one(completions, **kwargs):
    """1 when the completion writes a '1': deterministic, so it can be recomputed from the rollouts."""
    return [float("1" in (c[0]["content"] if isinstance(c, list) else c)) for c in completions]


def measure(trainer, dataset, **gap_args):
    """The Python entry, `measure_gap`, on a built trainer; the report and every generation batch it scored."""
    outputs = []
    original = trainer._generate_and_score_completions

    def capture(inputs):
        outputs.append(original(inputs))
        return outputs[-1]

    trainer._generate_and_score_completions = capture
    options = R.GapReportOptions(**{"gap_num_prompts": len(dataset), "gap_prompts_per_batch": 2, **gap_args})
    return R.measure_gap(trainer, dataset, options), outputs


def full_logits_reference(student, teacher, vocab, outputs, temperature, top_k, tokenizer):
    """Every token statistic recomputed from the models' full logits, independently of tgpo_trl.gap."""
    per_name = {name: [] for name in G.TOKEN_METRICS}
    positions, texts = [], []
    for out in outputs:
        prompt, completion = out["prompt_ids"], out["completion_ids"]
        mask = out["completion_mask"].bool()
        ids = torch.cat([prompt, completion], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        p = prompt.size(1)
        with torch.no_grad():
            ls = torch.log_softmax(student(input_ids=ids, attention_mask=attention).logits[:, p - 1 : -1] / temperature, -1)
            lt = torch.log_softmax(teacher(input_ids=ids, attention_mask=attention).logits[:, p - 1 : -1, :vocab], -1)
        for b in range(ids.size(0)):
            n = int(mask[b].sum())
            texts.append(tokenizer.decode(completion[b, :n], skip_special_tokens=True))
            for j in range(n):
                y = int(completion[b, j])
                s_row, t_row = ls[b, j], lt[b, j]
                top_t = t_row.topk(top_k).indices.tolist()
                top_s = s_row.topk(top_k).indices.tolist()
                argmax = int(t_row.argmax())
                r = float(s_row[y] - t_row[y])
                per_name["reverse_kl"].append(r)
                per_name["mismatch_ratio"].append(float(argmax != y))
                per_name["off_support_ratio"].append(float(y not in top_t))
                per_name["guidance_loss"].append(float(-s_row[argmax]))
                per_name["teacher_confidence"].append(float(t_row.exp().max()))
                per_name["topk_overlap"].append(len(set(top_t) & set(top_s)) / top_k)
                per_name["shared_mass"].append(sum(min(float(s_row[v].exp()), float(t_row[v].exp())) for v in top_t))
                per_name["negative_feedback"].append(float(r > G.NEGATIVE_FEEDBACK_NATS))
                positions.append(j * G.POSITION_BINS // n)
    return per_name, positions, texts


def test_json_values_equal_a_full_logits_recomputation(tmp_path, student, teacher, tokenizer):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i + 3}="}] for i in range(4)]})
    trainer = conftest.make_trainer(tmp_path, student, teacher, tokenizer, dataset, reward_funcs=has_one,
                                    temperature=0.7, guidance_top_k=5, max_completion_length=10)
    report, outputs = measure(trainer, dataset, gap_prefix_fractions=[0.5])
    reference, positions, texts = full_logits_reference(student, teacher, trainer.teacher_vocab_size, outputs, 0.7, 5,
                                                        tokenizer)
    assert report["settings"]["rollouts"] == 16 and report["settings"]["completion_tokens"] == len(positions)
    for name, values in reference.items():
        assert report[name] == pytest.approx(sum(values) / len(values), abs=1e-5), name
        assert report["distributions"][name]["tokens"] == len(values)
    # the gap along the completion, by tenth of each completion
    for k in range(G.POSITION_BINS):
        values = [v for v, pos in zip(reference["reverse_kl"], positions) if pos == k]
        expected = sum(values) / len(values) if values else None
        assert report["distributions"]["reverse_kl"]["by_position"][k] == pytest.approx(expected, abs=1e-5)
    assert report["student_accuracy"] == pytest.approx(sum("1" in text for text in texts) / len(texts))
    assert report["aligned_ratio"] == 1.0
    assert set(report["teacher_prefix_accuracy"]) == {"0.5"} and report["settings"]["prefix_rollouts"] == 4
    # the report is JSON as written, with its Markdown and plots
    paths = report.write(tmp_path / "report")
    assert [p.name for p in paths] == [R.REPORT_JSON, R.REPORT_MD, R.PLOT_LOG_RATIO, R.PLOT_POSITIONS]
    written = json.loads(paths[0].read_text())
    for key in ("reverse_kl", "mismatch_ratio", "off_support_ratio", "guidance_loss", "student_accuracy",
                "teacher_prefix_accuracy", "student_prefix_accuracy", "verdict"):
        assert key in written, key
    assert written["reverse_kl"] == pytest.approx(report["reverse_kl"])


def test_a_teacher_identical_to_the_student_shows_no_gap(tmp_path, tokenizer):
    student = conftest.tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=3)
    twin = copy.deepcopy(student)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i}="}] for i in range(4)]})
    vocab = len(tokenizer)
    trainer = conftest.make_trainer(tmp_path, student, twin, tokenizer, dataset, reward_funcs=has_one,
                                    temperature=1.0, guidance_top_k=vocab, max_completion_length=10)
    report, outputs = measure(trainer, dataset)
    assert report["reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    assert report["distributions"]["reverse_kl"]["max"] == pytest.approx(0.0, abs=1e-4)
    assert report["off_support_ratio"] == 0.0  # the top-k is the whole vocabulary
    assert report["topk_overlap"] == pytest.approx(1.0) and report["shared_mass"] == pytest.approx(1.0, abs=1e-4)
    # mismatch = the share of sampled tokens that are not the model's own greedy choice
    non_greedy = tokens = 0
    for out in outputs:
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():
            greedy = student(input_ids=ids, attention_mask=attention).logits[:, out["prompt_ids"].size(1) - 1 : -1].argmax(-1)
        mask = out["completion_mask"].bool()
        non_greedy += int(((greedy != out["completion_ids"]) & mask).sum())
        tokens += int(mask.sum())
    assert 0 < non_greedy < tokens
    assert report["mismatch_ratio"] == pytest.approx(non_greedy / tokens)
    # the same model finishes the same prefixes the same way
    assert report["teacher_prefix_accuracy"] == report["student_prefix_accuracy"]


def run_command(command: str, out: Path, *argv: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*COMMANDS[command], *argv, "--output_dir", str(out)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_quick_demo_runs_through_the_command_offline(tmp_path, command):
    from tgpo_trl.demo.build import build_demo_models

    build_demo_models(size="quick", progress=False)  # cached: the run below measures, it does not build
    out = tmp_path / "report"
    started = time.perf_counter()
    result = run_command(command, out, "--demo_size", "quick", "--gap_num_prompts", "8")
    seconds = time.perf_counter() - started
    assert seconds < 60, seconds
    report = json.loads((out / "gap_report.json").read_text())
    assert report["verdict"]["text"] in result.stdout
    assert report["settings"]["prompts"] == 8 and report["settings"]["rollouts"] == 64
    assert set(report["teacher_prefix_accuracy"]) == {"0.25", "0.5", "0.75"}
    markdown = (out / "gap_report.md").read_text()
    assert "## Verdict" in markdown and "gap/aligned_ratio" in markdown
    for name in ("gap_log_ratio_histogram.png", "gap_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_the_python_entry_measures_what_the_command_measures(tmp_path, one_torch_thread):
    """`measure_gap` on a trainer built in this process, with the command's settings, writes the command's report: the
    command is parsing, one call and writing."""
    from tgpo_trl.demo.build import build_demo_models

    build_demo_models(size="quick", progress=False)
    argv = ["--demo_size", "quick", "--gap_num_prompts", "4", "--gap_prefix_fractions", "0.5"]
    run_command("script", tmp_path / "command", *argv)
    command = json.loads((tmp_path / "command" / R.REPORT_JSON).read_text())

    script_args, training_args, model_args = script_module.parse_args([*argv, "--output_dir", str(tmp_path / "py")])
    reward_funcs = script_module.validate(script_args, training_args, model_args)
    dataset, tokenizer = script_module.demo_inputs(script_args, training_args, model_args)
    trainer = script_module.build_trainer(training_args, model_args, reward_funcs, dataset, tokenizer)
    report = R.measure_gap(trainer, dataset, script_args.options())
    report.write(tmp_path / "py")
    python = json.loads((tmp_path / "py" / R.REPORT_JSON).read_text())
    assert python["settings"]["rollouts"] == command["settings"]["rollouts"] == 32
    assert python["settings"]["completion_tokens"] == command["settings"]["completion_tokens"]
    for name in (*G.TOKEN_METRICS, "student_accuracy", "teacher_prefix_accuracy", "student_prefix_accuracy"):
        assert python[name] == pytest.approx(command[name], abs=1e-6), name
    assert python["verdict"]["text"] == command["verdict"]["text"]


def test_cuts_move_back_to_where_a_teacher_token_starts():
    """The byte-level teacher worked by hand in test_cross_tokenizer.py: ' ca' f é ' ' 😀 ' ' 12 + 34 = 46, written by a
    character student; a cut inside ' ca', '12' or '34' moves back to where that teacher token starts."""
    #       position:  0   1   2  3  4  5  6  7  8   9  10  11  12  13  14 15 16
    starts = torch.tensor([[0, -1, -1, 1, 2, 3, 4, 7, 8, -1, 9, 10, -1, 11, 12, 13, 14]]) >= 0
    cuts = [0, 1, 2, 3, 8, 9, 10, 12, 16, 30]
    moved = [G.back_to_teacher_token_starts([cut], starts)[0] for cut in cuts]
    assert moved == [0, 0, 0, 3, 8, 8, 10, 11, 16, 16]


@pytest.fixture(scope="module")
def cross_tokenizer_pair():
    """The quick demo's student and its teacher rebuilt with a byte-level BPE that merges digits (cached builds)."""
    from tgpo_trl.demo.build import build_cross_tokenizer_teacher, build_demo_models

    models = build_demo_models(size="quick", progress=False)
    return models, build_cross_tokenizer_teacher(size="quick", progress=False)


@pytest.mark.parametrize("rule", ["sync", "continuation"])
def test_with_another_tokenizer_the_prefix_test_cuts_by_the_rule(tmp_path, cross_tokenizer_pair, rule,
                                                                 one_torch_thread):
    """Under 'continuation' the teacher finishes prefixes that end where one of its tokens starts (the prefix's own
    teacher encoding is the start of the rollout's), as its continuation targets are predicted there; under 'sync' the
    cut is the plain share of the student's tokens, which ends inside a teacher token at least once here."""
    from transformers import AutoTokenizer

    from tgpo_trl.demo.run import TRAIN_SEED
    from tgpo_trl.demo.task import build_dataset

    models, teacher_dir = cross_tokenizer_pair
    tokenizer = AutoTokenizer.from_pretrained(models.tokenizer)
    dataset = build_dataset(6, TRAIN_SEED, "train")
    trainer = conftest.make_trainer(tmp_path, str(models.student_small_gap), None, tokenizer, dataset,
                                    reward_funcs=has_one, teacher_model_name_or_path=str(teacher_dir),
                                    cross_tokenizer_targets=rule, max_completion_length=40, temperature=0.7)
    heads = []
    finish = R.Measurement.finish

    def recording(self, role, examples, prompt_ids, row_heads, *args):
        heads.extend((role, list(head)) for head in row_heads)
        return finish(self, role, examples, prompt_ids, row_heads, *args)

    R.Measurement.finish = recording
    try:
        report, outputs = measure(trainer, dataset, gap_prefix_fractions=[0.3, 0.6])
    finally:
        R.Measurement.finish = finish
    assert report["settings"]["cross_tokenizer_targets"] == rule
    assert report["verdict"]["cross_tokenizer_targets"] == rule
    alignment = trainer.teacher_scoring.alignment
    encode = alignment.teacher_tokenizer
    eos = set(trainer.eos_token_ids)
    rollouts = [[t for t in ids[: int(n)] if t not in eos] for out in outputs
                for ids, n in zip(out["completion_ids"].tolist(), out["completion_mask"].sum(-1).tolist())]
    teacher_heads = [head for role, head in heads if role == "teacher"]
    assert teacher_heads == [head for role, head in heads if role == "student"]  # both finish the same prefixes
    ends_inside, moved = 0, 0
    for head in teacher_heads:
        rollout = next(r for r in rollouts if r[: len(head)] == head)
        plain = {int(len(rollout) * f) for f in (0.3, 0.6)}
        moved += len(head) not in plain
        head_ids = encode(alignment.student.text(head), add_special_tokens=False)["input_ids"]
        full_ids = encode(alignment.student.text(rollout), add_special_tokens=False)["input_ids"]
        ends_inside += head_ids != full_ids[: len(head_ids)]
    if rule == "continuation":
        assert ends_inside == 0 and moved > 0 and report["settings"]["prefix_cuts"] == "teacher_token_starts"
    else:
        assert ends_inside > 0 and moved == 0 and report["settings"]["prefix_cuts"] == "student_tokens"


# The benchmark's regimes as this report measured them (docs/gap_report.md), and what won there
SMALL_GAP = {"reverse_kl": 1.04, "mismatch_ratio": 0.155, "guidance_loss": 0.274, "negative_feedback": 0.12,
             "off_support_ratio": 0.01, "teacher_prefix_accuracy": {"0.25": 0.44, "0.5": 0.12, "0.75": 0.07},
             "student_prefix_accuracy": {"0.25": 0.13, "0.5": 0.09, "0.75": 0.06}}
LARGE_GAP = {"reverse_kl": 4.76, "mismatch_ratio": 0.411, "guidance_loss": 3.04, "negative_feedback": 0.34,
             "off_support_ratio": 0.31, "teacher_prefix_accuracy": {"0.25": 0.70, "0.5": 0.32, "0.75": 0.14},
             "student_prefix_accuracy": {"0.25": 0.16, "0.5": 0.13, "0.75": 0.13}}
ABLATION = {"reverse_kl": 5.05, "mismatch_ratio": 0.449, "guidance_loss": 5.2, "negative_feedback": 0.37,
            "off_support_ratio": 0.32, "teacher_prefix_accuracy": {"0.25": 0.51, "0.5": 0.18, "0.75": 0.14},
            "student_prefix_accuracy": {"0.25": 0.18, "0.5": 0.12, "0.75": 0.13}}


def test_the_verdict_classifies_the_benchmark_regimes_as_the_benchmark_found_them():
    small = G.gap_verdict(SMALL_GAP, guidance_coef=1.0)
    assert small["gap"] == "small" and small["suggested_method"] == "tgpo" and small["suggested_guidance"] == "tgpo"
    assert small["tgpo_target_informative"] and small["tgpo_target_reachable"]
    assert not small["rkl_uninformative_negative_feedback"] and small["suggested_guidance_coef"] == 1.0

    large = G.gap_verdict(LARGE_GAP, guidance_coef=1.0)
    assert large["gap"] == "large" and large["suggested_method"] == "tgpo"
    assert large["suggested_guidance"] == "tgpo_topk" and large["tgpo_target_reachable"]
    assert large["rkl_uninformative_negative_feedback"] and not large["rkl_collapse_risk"]

    ablation = G.gap_verdict(ABLATION, guidance_coef=1.0)
    assert ablation["gap"] == "large" and not ablation["tgpo_target_reachable"]
    assert ablation["suggested_method"] == "sft_warmup" and ablation["suggested_guidance"] == "none"
    assert ablation["rkl_collapse_risk"] and "supervised warm-up on teacher outputs" in ablation["text"]

    # The first demo build: the teacher finished none of the student's prefixes, and GRPO won the pilots
    first = G.gap_verdict({**LARGE_GAP, "teacher_prefix_accuracy": {"0.25": 0.0, "0.5": 0.0, "0.75": 0.0}}, 1.0)
    assert first["tgpo_target_informative"] is False and first["suggested_method"] == "grpo"

    # The cross-tokenizer teacher: a small gap whose teacher finishes the prefixes no better; TGPO fell to 0%, OPD won
    cross = G.gap_verdict({"reverse_kl": 0.76, "mismatch_ratio": 0.126, "guidance_loss": 0.25, "negative_feedback": 0.08,
                           "teacher_prefix_accuracy": {"0.25": 0.125, "0.5": 0.094, "0.75": 0.094},
                           "student_prefix_accuracy": {"0.25": 0.141, "0.5": 0.078, "0.75": 0.125}}, 1.0)
    assert cross["gap"] == "small" and cross["tgpo_target_informative"] is False
    assert cross["suggested_method"] == "opd" and cross["suggested_guidance"] == "opd"


# The cross-tokenizer pair (the full demo's small-gap student, its teacher rebuilt with a BPE) as this report measured it
# under each rule, 200 prompts x 2 prefix rollouts (docs/gap_report.md), and what the benchmark found under each:
# 'sync': tgpo 0.2%, tgpo_topk 0%, tgpo_sample 2.8%, OPD 16.0%; 'continuation': tgpo 28.3%, OPD 16.0%
CROSS_SYNC = {"reverse_kl": 0.759, "mismatch_ratio": 0.126, "guidance_loss": 0.234, "negative_feedback": 0.079,
              "off_support_ratio": 0.015, "aligned_ratio": 0.735,
              "teacher_prefix_accuracy": {"0.25": 0.193, "0.5": 0.105, "0.75": 0.045},
              "student_prefix_accuracy": {"0.25": 0.11, "0.5": 0.075, "0.75": 0.052}}
CROSS_CONTINUATION = {**CROSS_SYNC, "mismatch_ratio": 0.155, "guidance_loss": 0.313, "off_support_ratio": 0.018,
                      "aligned_ratio": 0.982, "teacher_prefix_accuracy": {"0.25": 0.28, "0.5": 0.105, "0.75": 0.048},
                      "student_prefix_accuracy": {"0.25": 0.113, "0.5": 0.075, "0.75": 0.052}}


def test_the_verdict_reads_the_cross_tokenizer_rule():
    sync = G.gap_verdict(CROSS_SYNC, 1.0, cross_tokenizer_targets="sync")
    assert sync["tgpo_target_informative"] is False and sync["suggested_guidance"] == "opd"
    assert sync["cross_tokenizer_targets"] == "sync" and sync["suggested_cross_tokenizer_targets"] == "continuation"
    assert "74% of the completion tokens get a teacher target" in sync["text"]
    assert "run this report again with cross_tokenizer_targets='continuation'" in sync["text"]

    continuation = G.gap_verdict(CROSS_CONTINUATION, 1.0, cross_tokenizer_targets="continuation")
    assert continuation["tgpo_target_informative"] and continuation["suggested_method"] == "tgpo"
    assert continuation["suggested_guidance"] == "tgpo" and continuation["suggested_cross_tokenizer_targets"] == (
        "continuation")
    assert "where a teacher token starts" in continuation["text"] and "28.3%" in continuation["text"]

    # a pair TGPO fits under 'sync' is still pointed to 'continuation'; an unreachable one is not (no guided method)
    fits = G.gap_verdict({**SMALL_GAP, "aligned_ratio": 0.9}, 1.0, cross_tokenizer_targets="sync")
    assert fits["suggested_method"] == "tgpo" and fits["suggested_cross_tokenizer_targets"] == "continuation"
    assert "use cross_tokenizer_targets='continuation'" in fits["text"]
    unreachable = G.gap_verdict(ABLATION, 1.0, cross_tokenizer_targets="sync")
    assert unreachable["suggested_cross_tokenizer_targets"] == "sync" and "continuation" not in unreachable["text"]

    # a shared vocabulary: no rule, nothing said about one
    shared = G.gap_verdict(SMALL_GAP, 1.0)
    assert shared["cross_tokenizer_targets"] is None and shared["suggested_cross_tokenizer_targets"] is None
    assert "another tokenizer" not in shared["text"]


def test_accumulators_merge_like_one_and_shards_cover_every_prompt():
    torch.manual_seed(0)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[2, 4:] = 0
    stats = {name: (torch.rand(6, 7) * 3, mask.bool() & (torch.rand(6, 7) > 0.2)) for name in G.TOKEN_METRICS}
    whole = G.GapAccumulator()
    whole.update(stats, mask)
    parts = [G.GapAccumulator(), G.GapAccumulator()]
    for part, rows in zip(parts, (slice(0, 2), slice(2, 6))):
        part.update({k: (v[rows], m[rows]) for k, (v, m) in stats.items()}, mask[rows])
    merged = G.GapAccumulator.merge([p.state() for p in parts])
    for name in G.TOKEN_METRICS:
        a, b = whole.summary(name), merged.summary(name)
        assert a["mean"] == pytest.approx(b["mean"]) and a["histogram"] == b["histogram"]
        assert a["by_position"] == pytest.approx(b["by_position"]) and a["quantiles"] == b["quantiles"]
        values, where = stats[name]
        assert a["mean"] == pytest.approx(float(values[where].double().mean()))

    dataset = Dataset.from_dict({"prompt": [f"p{i}" for i in range(7)]})
    shards = [R.shard(dataset, 3, rank, per_batch=2) for rank in range(3)]
    assert len({len(rows) for rows, _ in shards}) == 1  # the same number of generation batches everywhere
    real = [row["prompt"] for rows, flags in shards for row, flag in zip(rows, flags) if flag]
    assert real == [f"p{i}" for i in range(7)]


@pytest.mark.parametrize("argv, field", [
    (["--gap_num_prompts", "0"], "gap_num_prompts"),
    (["--gap_prefix_fractions", "0.5", "1.5"], "gap_prefix_fractions"),
    (["--model_name_or_path", "some/student", "--dataset_name", "x", "--bf16", "false", "--use_cpu", "true"],
     "teacher_model_name_or_path"),
    (["--model_name_or_path", "some/student", "--teacher_model_name_or_path", "some/teacher", "--teacher_server_url",
      "http://localhost:8001", "--dataset_name", "x", "--bf16", "false", "--use_cpu", "true"], "teacher_server_url"),
    (["--demo_size", "quick", "--guidance_top_k", "0"], "guidance_top_k"),
])
def test_bad_input_fails_before_any_model_loads(monkeypatch, argv, field):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(script_module, "build_trainer", no_models)
    monkeypatch.setattr(script_module, "demo_inputs", no_models)
    with pytest.raises(SystemExit) as error:
        script_module.cli(argv)
    assert str(error.value).startswith("gap_report.py: error:") and field in str(error.value)


def test_the_python_entry_refuses_a_trainer_without_a_teacher_in_process(tmp_path, student, tokenizer, dataset):
    trainer = conftest.make_trainer(tmp_path, student, None, tokenizer, dataset, guidance="none")
    with pytest.raises(ValueError, match="needs the teacher in process.*teacher_model_name_or_path"):
        R.measure_gap(trainer, dataset)
    with pytest.raises(ValueError, match="gap_prefix_rollouts"):
        R.GapReportOptions(gap_prefix_rollouts=0)


def test_tgpo_gap_report_stops_bad_input_in_one_line_naming_the_command(tmp_path, monkeypatch):
    """A field's constraint is checked by the launched script (with the launch's world size), before any model loads;
    a flag that is no field and no launch option stops `tgpo` before it launches anything."""
    result = subprocess.run([*COMMANDS["tgpo"], "--demo_size", "quick", "--gap_num_prompts", "0", "--output_dir",
                             str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "tgpo gap-report: error: `gap_num_prompts` must be >= 1, got 0." in result.stderr

    monkeypatch.setattr("accelerate.commands.launch.launch_command", pytest.fail)
    with pytest.raises(SystemExit) as error:
        tgpo_trl.cli.main(["gap-report", "--gap_num_promts", "8"])
    assert str(error.value).startswith("tgpo gap-report: error: unrecognized arguments: --gap_num_promts 8")


def test_two_processes_measure_shards_and_gather_what_one_process_measures(tmp_path):
    """At a temperature near 0 the rollouts are (nearly) the greedy ones, whatever the process and seed: 2 processes,
    each with a shard (4 + 3 prompts, the second padded), must report what 1 process reports. Nearly: another batch
    composition pads the rows differently, and the float noise flips a few near-tied tokens of these weak quick models
    (5 of ~2,200 here), so tokens and means are compared to 1% and 3%; a lost or doubled shard is off by ~50%. The 2
    processes are launched by `tgpo gap-report`, accelerate's options among the fields."""
    from tgpo_trl.demo.build import build_demo_models

    build_demo_models(size="quick", progress=False)
    common = ["--demo_size", "quick", "--gap_num_prompts", "7", "--temperature", "0.001", "--gap_prompts_per_batch", "2"]
    reports = []
    two_processes = ["--config_file", str(ROOT / "recipes" / "accelerate" / "ddp_cpu_2proc.yaml"),
                     "--main_process_port", str(conftest_free_port()), "--ddp_backend", "gloo"]
    for command in ([*COMMANDS["script"], *common], [*COMMANDS["tgpo"], *common[:2], *two_processes, *common[2:]]):
        out = tmp_path / f"run{len(reports)}"
        command = [*command, "--output_dir", str(out)]
        result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((out / "gap_report.json").read_text()))
    one, two = reports
    assert (one["settings"]["processes"], two["settings"]["processes"]) == (1, 2)
    for key in ("prompts", "rollouts", "prefix_rollouts"):
        assert one["settings"][key] == two["settings"][key] == {"prompts": 7, "rollouts": 56, "prefix_rollouts": 7}[key]
    assert two["settings"]["completion_tokens"] == pytest.approx(one["settings"]["completion_tokens"], rel=0.01)
    for name in (*G.TOKEN_METRICS, "student_accuracy"):
        assert two[name] == pytest.approx(one[name], rel=0.03, abs=0.02), name
    for key in ("teacher_prefix_accuracy", "student_prefix_accuracy"):
        assert two[key] == pytest.approx(one[key], abs=1 / 7 + 1e-9), key


def conftest_free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
