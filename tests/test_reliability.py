"""
Reliability (issue 6): bad inputs fail before the first optimizer step and name the culprit, a broken teacher never
reaches the student, a killed run resumes where it stopped, and degenerate batches train without NaN.

The config errors (unknown guidance, coef, schedule, decay steps, top-k, nothing to train), a guidance without a
teacher, a teacher path that does not exist and a differently mapped teacher tokenizer are tested in test_trainer.py;
see docs/reliability.md for the whole list.
"""

import asyncio
import conftest
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import length_reward, make_config, make_trainer, train_logs
from datasets import Dataset

from tgpo_trl import TGPOConfig, TGPOTrainer
from tgpo_trl import trainer as trainer_module


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Subprocesses likewise
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, before):
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def assert_finite_run(trainer, logs):
    """Every logged number and every student weight is finite."""
    for row in logs:
        for key, value in row.items():
            if isinstance(value, float):  # TRL logs None for a min/max over no token
                assert math.isfinite(value), (row["step"], key, value)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ---------------------------------------------------------------------------------------------- bad inputs


def test_teacher_hub_id_that_does_not_exist(tmp_path, student, tokenizer, dataset):
    args = make_config(tmp_path, teacher_model_name_or_path="no-such-org/no-such-teacher")
    with pytest.raises(ValueError, match="teacher_model_name_or_path='no-such-org/no-such-teacher'"):
        TGPOTrainer(model=student, reward_funcs=length_reward, args=args, train_dataset=dataset,
                    processing_class=tokenizer)


@pytest.mark.parametrize(
    "train, eval_, message",
    [
        ({"question": ["1+2="] * 8}, None, r"`train_dataset` has no `prompt` column \(its columns: \['question'\]\)"),
        ({"prompt": []}, None, r"`train_dataset` is empty \(0 rows\)"),
        ({"prompt": ["1+2="] * 8}, {"held_out": {"problem": ["1+2="]}}, r"`eval_dataset\['held_out'\]` has no `prompt`"),
    ],
)
def test_malformed_dataset_fails_at_construction(tmp_path, student, tokenizer, train, eval_, message):
    # An unloadable teacher path: the dataset is checked first, before the teacher is loaded
    args = make_config(tmp_path, teacher_model_name_or_path=str(tmp_path / "no-such-teacher"))
    eval_dataset = {name: Dataset.from_dict(columns) for name, columns in eval_.items()} if eval_ else None
    with pytest.raises(ValueError, match=message):
        TGPOTrainer(model=student, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_dict(train),
                    eval_dataset=eval_dataset, processing_class=tokenizer)


def test_num_generations_must_divide_the_batch():
    # TRL's own check, inherited by TGPOConfig
    with pytest.raises(ValueError, match=r"must be divisible by num_generations \(3\)"):
        TGPOConfig(output_dir="unused", use_cpu=True, per_device_train_batch_size=8, num_generations=3)


def failing_reward(completions, **kwargs):
    raise ZeroDivisionError("division by zero")


async def failing_async_reward(completions, **kwargs):
    await asyncio.sleep(0)
    raise KeyError("answer")


@pytest.mark.parametrize("reward, name, cause", [(failing_reward, "failing_reward", ZeroDivisionError),
                                                 (failing_async_reward, "failing_async_reward", KeyError)])
def test_reward_function_that_raises_is_named(tmp_path, student, teacher, tokenizer, dataset, reward, name, cause):
    before = snapshot(student)
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, reward_funcs=[length_reward, reward])
    with pytest.raises(RuntimeError, match=f"Reward function '{name}' raised {cause.__name__}") as error:
        trainer.train()
    assert isinstance(error.value.__cause__, cause)
    assert trainer.state.global_step == 0
    assert_unchanged(student, before)
    assert trainer.reward_funcs[1] is reward  # the wrapping lasts only for the call


# ---------------------------------------------------------------------------------------------- a broken teacher


def poison_teacher(monkeypatch, teacher, rows):
    """
    Write NaN into the teacher's final hidden states (after its last norm) of `rows`, at the positions that predict the
    completion's last three tokens, and return, per generation batch, how many (unpadded) completion tokens that poisons.
    """
    poisoned = []

    def hook(module, args, output):
        output = output.clone()
        output[rows, -4:-1] = float("nan")  # the hidden state at index i predicts the token at i + 1
        return output

    def recording_score(*args, **kwargs):
        completion_mask = args[4]
        assert completion_mask.size(1) >= 3
        poisoned.append(completion_mask[rows, -3:].sum().item())
        return score_completions(*args, **kwargs)

    score_completions = trainer_module.score_completions
    monkeypatch.setattr(trainer_module, "score_completions", recording_score)
    teacher.model.norm.register_forward_hook(hook)
    return poisoned


@pytest.mark.parametrize("mode", ["tgpo", "tgpo_topk", "opd"])
def test_non_finite_teacher_tokens_are_skipped_and_counted(
    tmp_path, monkeypatch, student, teacher, tokenizer, dataset, mode
):
    poisoned = poison_teacher(monkeypatch, teacher, slice(0, None, 2))
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance=mode, guidance_top_k=4)
    before = snapshot(student)
    logs = train_logs(trainer)
    assert len(poisoned) == len(logs) == 2 and all(count > 0 for count in poisoned)
    assert [row["guidance/skipped_tokens"] for row in logs] == poisoned
    assert_finite_run(trainer, logs)
    assert any(not torch.equal(value, before[key]) for key, value in student.state_dict().items())


@pytest.mark.parametrize("breakage", ["nan_weight", "inf_activations"])
def test_teacher_without_any_finite_output_stops_before_the_first_step(
    tmp_path, student, teacher, tokenizer, dataset, breakage
):
    with torch.no_grad():
        if breakage == "nan_weight":  # a broken checkpoint: one NaN in the output head spoils every logit row
            teacher.lm_head.weight[0, 0] = float("nan")
        else:  # activations past the dtype's range (a half-precision overflow): logits of inf - inf
            teacher.model.norm.weight.fill_(float("inf"))
    before = snapshot(student)
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset)
    with pytest.raises(FloatingPointError, match="teacher produced non-finite outputs"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert_unchanged(student, before)


# ---------------------------------------------------------------------------------------------- degenerate batches


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


@pytest.mark.parametrize("case", ["long_all_truncated", "only_eos", "all_truncated_and_masked", "equal_rewards"])
def test_degenerate_batches_train_without_nan(tmp_path, student, teacher, tokenizer, dataset, case):
    eos = tokenizer.eos_token_id
    everything_but_eos = [i for i in range(len(tokenizer)) if i != eos]
    settings = {
        # 8 x 200 = 1,600 completion positions per batch, every completion truncated
        "long_all_truncated": {"max_completion_length": 200, "generation_kwargs": {"suppress_tokens": [eos]},
                               "max_steps": 1},
        "only_eos": {"generation_kwargs": {"suppress_tokens": everything_but_eos}},
        "all_truncated_and_masked": {"generation_kwargs": {"suppress_tokens": [eos]}, "mask_truncated_completions": True},
        "equal_rewards": {},
    }[case]
    reward = constant_reward if case == "equal_rewards" else length_reward
    before = snapshot(student)
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, reward_funcs=reward, **settings)
    logs = train_logs(trainer)
    assert_finite_run(trainer, logs)
    changed = any(not torch.equal(value, before[key]) for key, value in student.state_dict().items())
    for row in logs:
        if case == "long_all_truncated":
            assert row["completions/min_length"] == 200 and row["completions/clipped_ratio"] == 1.0
        elif case == "only_eos":
            assert row["completions/max_length"] == 1
        elif case == "all_truncated_and_masked":
            assert row["completions/clipped_ratio"] == 1.0 and row["loss"] == 0.0 and row["grad_norm"] == 0.0
        else:
            assert row["reward_std"] == 0.0 and row["frac_reward_zero_std"] == 1.0
    # with every token masked nothing trains; otherwise the guidance moves the student even with zero advantages
    assert changed == (case != "all_truncated_and_masked")


# ---------------------------------------------------------------------------------------------- interruption

TRAINING_SCRIPT = textwrap.dedent('''\
    """A small TGPO run that checkpoints every 3 steps; `hang` blocks it at step 5 so it can be killed there."""
    import json
    import os
    import sys
    import time

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from tgpo_trl import CHECKPOINTING_FIELD, TGPOConfig, TGPOTrainer
    from tgpo_trl.demo.models import tiny_qwen2
    from tgpo_trl.demo.tokenizer import build_char_tokenizer

    MAX_STEPS, SAVE_STEPS, HANG_AT = 8, 3, 5


    def reward(completions, **kwargs):
        return [len(c[0]["content"]) / 10 for c in completions]


    class Record(TrainerCallback):
        def __init__(self, log_path, hang):
            self.log_path, self.hang = log_path, hang

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "guidance/coef" in logs:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "coef": logs["guidance/coef"],
                                        "reward": logs["reward"], "loss": logs["loss"]}) + "\\n")

        def on_step_end(self, args, state, control, **kwargs):
            if self.hang and state.global_step == HANG_AT:  # between checkpoint 3 and checkpoint 6
                open(self.log_path + ".hanging", "w").close()
                while True:
                    time.sleep(1)


    def main(output_dir, log_path, mode):
        tokenizer = build_char_tokenizer()
        student = tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0)
        teacher = tiny_qwen2(tokenizer, hidden_size=48, num_layers=2, seed=1, vocab_size=len(tokenizer) + 7)
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i + 1}="}] for i in range(16)]})
        args = TGPOConfig(
            output_dir=output_dir, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
            max_steps=MAX_STEPS, learning_rate=1e-3, report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True,
            seed=0, bf16=False, **{CHECKPOINTING_FIELD: False}, save_strategy="steps", save_steps=SAVE_STEPS,
            guidance_coef=0.6, guidance_schedule="linear", guidance_decay_steps=6,
        )
        trainer = TGPOTrainer(model=student, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, teacher_model=teacher,
                              callbacks=[Record(log_path, hang=mode == "hang")])
        trainer.train(resume_from_checkpoint=mode == "resume")
        torch.save(trainer.model.state_dict(), os.path.join(output_dir, "final.pt"))
        with open(os.path.join(output_dir, "final_step.json"), "w") as f:
            json.dump(trainer.state.global_step, f)


    if __name__ == "__main__":
        main(*sys.argv[1:])
''')


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_script(script, *args, timeout=300):
    result = subprocess.run([sys.executable, str(script), *map(str, args)], check=False, capture_output=True,
                            text=True, timeout=timeout, env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def test_killed_run_resumes_the_guidance_schedule_from_its_checkpoint(tmp_path):
    script = tmp_path / "train_tgpo.py"
    script.write_text(TRAINING_SCRIPT)
    out, log = tmp_path / "interrupted", tmp_path / "interrupted.jsonl"

    # 1. A real training process, killed (SIGKILL: no cleanup, no final save) after checkpoint 3, at step 5
    stderr = tmp_path / "interrupted.stderr"
    with open(stderr, "w") as stderr_file:
        process = subprocess.Popen([sys.executable, str(script), str(out), str(log), "hang"],
                                   stdout=subprocess.DEVNULL, stderr=stderr_file, env=SUBPROCESS_ENV)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(f"{log}.hanging"):
            assert process.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, "the training process never reached step 5"
            time.sleep(0.2)
    finally:  # never leave the process behind, blocked at step 5
        process.send_signal(signal.SIGKILL)
        returncode = process.wait(timeout=60)
    assert returncode == -signal.SIGKILL
    assert [name for name in os.listdir(out) if name.startswith("checkpoint")] == ["checkpoint-3"]  # between two
    checkpoint = out / "checkpoint-3"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "model.safetensors"):
        assert (checkpoint / name).exists(), name
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3
    before_kill = read_log(log)
    assert [row["step"] for row in before_kill] == [1, 2, 3, 4]  # step 4 ran, and is lost with the process

    # 2. A new process resumes from the last checkpoint
    os.remove(log)
    run_script(script, out, log, "resume")
    resumed = read_log(log)
    assert [row["step"] for row in resumed] == [4, 5, 6, 7, 8]
    assert json.loads((out / "final_step.json").read_text()) == 8
    # lambda_k = 0.6 * max(0, 1 - (k - 1) / 6): the resumed run continues at k = 4, not at k = 1
    expected = [0.6 * max(0.0, 1 - (k - 1) / 6) for k in range(1, 9)]
    assert [row["coef"] for row in before_kill + resumed] == pytest.approx(expected[:4] + expected[3:])
    # the step that was lost is replayed exactly: same rollouts (RNG), same loss (weights, optimizer, schedule)
    assert resumed[0] == pytest.approx(before_kill[3])

    # 3. The checkpoint holds everything: an uninterrupted run in this process ends at the same weights
    module = conftest.load_script(script)
    module.main(str(tmp_path / "uninterrupted"), str(tmp_path / "uninterrupted.jsonl"), "full")
    uninterrupted = read_log(tmp_path / "uninterrupted.jsonl")
    assert len(uninterrupted) == 8
    for row, reference_row in zip(before_kill[:3] + resumed, uninterrupted, strict=True):
        assert row == pytest.approx(reference_row)
    final = torch.load(out / "final.pt")
    reference = torch.load(tmp_path / "uninterrupted" / "final.pt")
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6)
