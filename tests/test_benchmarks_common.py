"""`benchmarks/common.py`: the statistics, the command-line settings, the memory budget and the step harness that the
speed, GPU and method benchmarks share, against hand computations."""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest

common = conftest.load_script(Path(__file__).resolve().parent.parent / "benchmarks" / "common.py")


def test_mean_std_skips_nan_and_uses_the_sample_deviation():
    # 1, 2 and 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9 over n - 1 = 2 gives a variance of 7/3
    stats = common.mean_std([1.0, float("nan"), 2.0, 4.0])
    assert stats["n"] == 3 and stats["min"] == 1.0 and stats["max"] == 4.0
    assert stats["mean"] == pytest.approx(7 / 3)
    assert stats["std"] == pytest.approx(math.sqrt(7 / 3))
    assert common.mean_std([0.5])["std"] == 0.0
    empty = common.mean_std([float("nan")])
    assert empty["n"] == 0 and all(math.isnan(empty[key]) for key in ("mean", "std", "min", "max"))


def test_summary_takes_the_median_and_keeps_the_samples_in_order():
    values = [3.0, 1.0, 10.0, 2.0]
    assert common.summary(values) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4, "samples": [3.0, 1.0, 10.0, 2.0]}


@dataclass(frozen=True)
class Settings:
    batch: int = 8
    num_generations: int = 4
    student: str = "tiny"
    rate: float = 0.5


def parse(*argv):
    parser = common.argument_parser("A benchmark.\n\nMore.")
    common.add_settings_arguments(parser, Settings(), Settings(batch=2, num_generations=1))
    return common.settings_from_args(parser, parser.parse_args(list(argv)), Settings())


def test_settings_flags_keep_the_field_types_and_refuse_a_batch_of_partial_groups():
    assert parse() == Settings()
    assert parse("--batch", "12", "--student", "qwen", "--rate", "0.25") == Settings(batch=12, student="qwen", rate=0.25)
    assert parse("--num-generations", "2").num_generations == 2
    with pytest.raises(SystemExit):
        parse("--batch", "6")  # 6 sequences are not whole groups of 4


def test_memory_budget_is_the_teacher_plus_a_quarter_of_the_logits_tensor():
    settings = SimpleNamespace(batch=2, completion_length=4, vocab=1000)
    assert common.logits_tensor_bytes(settings) == 2 * 4 * 1000 * 4
    assert common.memory_budget(100, settings) == 100 + 0.25 * 32_000


def test_report_files_and_check_lines(tmp_path):
    result = {"wall_time_s": 12.4, "checks": {"x": 1}}
    line = common.write_report(tmp_path / "out", "speed", result, "# Title\n")
    assert (tmp_path / "out" / "speed.json").read_text() == json.dumps(result, indent=2) + "\n"
    assert (tmp_path / "out" / "speed.md").read_text() == "# Title\n"
    assert line.endswith("speed.json and " + str(tmp_path / "out" / "speed.md") + " (12 s of measurement)")
    assert common.check_line("a", {"value": 1.5, "target": 1.25, "pass": False}) == "  a: 1.500 (target <= 1.25): FAIL"


def test_setup_pads_the_tokenizer_to_the_vocabulary_and_never_samples_special_tokens():
    settings = SimpleNamespace(batch=4, prompt_length=3, completion_length=5, vocab=200, seed=0)
    setup = common.Setup(settings)
    assert len(setup.tokenizer) == 200
    assert setup.completion_ids.shape == (4, 5) and setup.prompt_ids.shape == (4, 3)
    assert int(min(setup.prompt_ids.min(), setup.completion_ids.min())) >= len(common.SPECIAL_TOKENS)
    prompts, completions = setup.fixed_rows(2)
    assert completions == setup.completion_ids[:2].tolist() and len(prompts) == 2
    with pytest.raises(RuntimeError, match="fixed rollouts"):
        setup.fixed_rows(5)
    with pytest.raises(ValueError, match="--vocab must be at least"):
        common.Setup(SimpleNamespace(**{**vars(settings), "vocab": 10}))


def test_run_steps_returns_only_the_times_of_this_run(monkeypatch):
    clock = iter([0.0, 1.0, 5.0, 7.0, 10.0, 10.5])  # steps of 1 s, then 2 s and 0.5 s
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    recorder = common.StepRecorder()

    class Trainer:
        args = SimpleNamespace(max_steps=None)

        def train(self):
            for _ in range(self.args.max_steps):
                recorder.on_step_begin(None, None, None)
                recorder.on_step_end(None, None, None)

    trainer = Trainer()
    assert common.run_steps(trainer, recorder, 1) == [1.0]
    assert common.run_steps(trainer, recorder, 2) == [2.0, 0.5]
    assert recorder.times == [1.0, 2.0, 0.5]
