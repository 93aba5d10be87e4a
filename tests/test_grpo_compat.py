"""Everything GRPOTrainer does keeps working under TGPOTrainer, with the guidance live."""

import math

import pytest
import torch
from conftest import digit_reward, length_reward, make_trainer, train_logs
from datasets import Dataset
from peft import LoraConfig


def assert_trains(trainer, logs, *, student_params=None):
    """Finite losses, the TGPO metrics next to GRPO's, and a student that moved."""
    for row in logs:
        assert math.isfinite(row["loss"])
        for key in ("guidance/loss", "guidance/coef", "gap/reverse_kl", "gap/mismatch_ratio", "entropy"):
            assert math.isfinite(row[key]), key
        assert row["guidance/loss"] > 0  # the guidance is live, not silently zeroed
    assert math.isfinite(logs[0]["reward"])  # rewards are logged on the steps that generate
    if student_params is not None:
        after = dict(trainer.model.named_parameters())
        assert any(not torch.equal(before, after[name]) for name, before in student_params.items())


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_standard_text_dataset(tmp_path, student, teacher, tokenizer):
    dataset = Dataset.from_dict({"prompt": [f"<|user|>{i}+{i}=<eos><|assistant|>" for i in range(16)]})
    before = snapshot(student)
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset)
    assert_trains(trainer, train_logs(trainer), student_params=before)


def test_several_weighted_reward_functions(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, reward_funcs=[length_reward, digit_reward],
                           reward_weights=[1.0, 0.5])
    logs = train_logs(trainer)
    assert_trains(trainer, logs)
    for row in logs:
        weighted = row["rewards/length_reward/mean"] + 0.5 * row["rewards/digit_reward/mean"]
        assert row["reward"] == pytest.approx(weighted, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_every_loss_type(tmp_path, student, teacher, tokenizer, dataset, loss_type):
    before = snapshot(student)
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, loss_type=loss_type)
    assert_trains(trainer, train_logs(trainer), student_params=before)


def test_num_iterations_steps_per_generation_and_accumulation(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, steps_per_generation=4, num_iterations=2, max_steps=4)
    scored = []
    score = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda batch: scored.append(len(batch)) or score(batch)
    logs = train_logs(trainer)
    assert_trains(trainer, logs)
    # 4 steps x 2 micro-batches = 8 micro-batches; one generation (and teacher pass) serves 4 x 2 iterations of them
    assert scored == [16]
    assert len(logs) == 4


def test_evaluation_logs_guidance(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, per_device_eval_batch_size=8,
                           eval_strategy="steps", eval_steps=2, max_steps=2,
                           trainer_kwargs={"eval_dataset": dataset.select(range(4))})
    trainer.train()
    (evaluation,) = [row for row in trainer.state.log_history if "eval_loss" in row]
    for key in ("eval_guidance/loss", "eval_gap/reverse_kl", "eval_gap/mismatch_ratio"):
        assert math.isfinite(evaluation[key])


def test_reference_model_kl(tmp_path, student, teacher, tokenizer, dataset):
    # GRPO builds the reference model from the policy's path
    student.save_pretrained(tmp_path / "student")
    trainer = make_trainer(tmp_path, str(tmp_path / "student"), teacher, tokenizer, dataset, beta=0.1, max_steps=3)
    logs = train_logs(trainer)
    assert_trains(trainer, logs)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.teacher_model
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logs[-1]["kl"] > 0


def test_mask_truncated_completions_with_every_completion_truncated(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, mask_truncated_completions=True,
                           max_completion_length=3, generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id]})
    scored = []
    score = trainer._generate_and_score_completions

    def recording(batch):
        output = score(batch)
        scored.append(output["completion_mask"].sum().item())
        return output

    trainer._generate_and_score_completions = recording
    logs = train_logs(trainer)
    assert scored and all(count == 0 for count in scored)  # EOS is suppressed: every completion is truncated
    for row in logs:
        assert math.isfinite(row["loss"]) and row["guidance/loss"] == 0.0


def test_lora_student_trains_only_adapters(tmp_path, student, teacher, tokenizer, dataset):
    base_before = snapshot(student)
    teacher_before = snapshot(teacher)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, learning_rate=1e-2,
                           trainer_kwargs={"peft_config": peft_config})
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    lora_before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert_trains(trainer, train_logs(trainer))

    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[name], value) for name, value in lora_before.items())
    base = trainer.model.get_base_model()
    for name, value in base_before.items():
        module_name = name.rsplit(".", 1)[0]
        merged_name = f"{module_name}.base_layer.{name.rsplit('.', 1)[1]}"
        current = dict(base.named_parameters()).get(name, dict(base.named_parameters()).get(merged_name))
        assert torch.equal(current, value), name
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())


def test_externally_generated_completions_are_guided(tmp_path, student, teacher, tokenizer, dataset):
    """`rollout_func` stands for any external generator (vLLM server or colocate): completions arrive as ids."""
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))

    def rollout_func(prompts, trainer):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        # the sampler already repeats each prompt num_generations times: one completion per row
        completion_ids = [[digits[(i + j) % 10] for j in range(3)] + [tokenizer.eos_token_id]
                          for i in range(len(prompts))]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": [[-1.0] * len(c) for c in completion_ids]}

    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, trainer_kwargs={"rollout_func": rollout_func})
    seen = []
    score = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda batch: seen.append(score(batch)) or seen[-1]
    assert_trains(trainer, train_logs(trainer))
    assert seen[0]["completion_ids"][0, :3].tolist() == digits[:3]
    assert seen[0]["teacher_argmax"].shape == seen[0]["completion_ids"].shape
