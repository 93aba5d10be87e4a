"""TGPOTrainer: logged metrics against an independent recomputation, the guidance gradient, schedule, teacher rules."""

import math

import pytest
import torch
from conftest import length_reward, make_config, make_trainer, train_logs
from trl import GRPOTrainer

from tgpo_trl import TGPOConfig, TGPOTrainer
from tgpo_trl import guidance as G


def full_logps(model, inputs, vocab_size=None):
    """`log softmax` over the full vocabulary at every completion position, from the model's ordinary logits."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][:, -inputs["completion_ids"].size(1) :]
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return torch.log_softmax(logits.float(), dim=-1)


def reference_terms(trainer, inputs):
    """The guidance term and gap metrics recomputed from full logits (nothing shared with the trainer's path)."""
    student = full_logps(trainer.model, inputs)
    teacher = full_logps(trainer.teacher_model, inputs, trainer.teacher_vocab_size)
    y = inputs["completion_ids"]
    s_y, t_y = student.gather(-1, y[..., None])[..., 0], teacher.gather(-1, y[..., None])[..., 0]
    k = trainer.args.guidance_top_k
    top = teacher.topk(k, dim=-1)
    s_top = student.gather(-1, top.indices)
    per_token = {
        "tgpo": -student.gather(-1, teacher.argmax(-1, keepdim=True))[..., 0],
        "tgpo_sample": -student.gather(-1, inputs.get("teacher_sample", y)[..., None])[..., 0],
        "tgpo_topk": G.tgpo_topk(s_top, top.values),
        "rkl_topk": G.rkl_topk(s_top, top.values),
        "rkl_k3": G.rkl_k3(s_y, t_y),
        "kdrl": G.kdrl_k2(s_y, t_y),
        "opd": s_y - t_y,
    }[trainer.guidance]
    mask = inputs["completion_mask"].float()

    def mean(x):
        return ((x * mask).sum() / mask.sum()).item()

    return {
        "per_token": per_token,
        "mask": mask,
        "guidance/loss": mean(per_token),
        "gap/reverse_kl": mean(s_y - t_y),
        "gap/mismatch_ratio": mean((teacher.argmax(-1) != y).float()),
    }


def record_references(trainer):
    records = []
    compute_loss = trainer.compute_loss

    def wrapped(model, inputs, *args, **kwargs):
        with torch.no_grad():
            records.append(reference_terms(trainer, inputs))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = wrapped
    return records


@pytest.mark.parametrize("mode", ["tgpo", "tgpo_sample", "tgpo_topk", "rkl_topk", "rkl_k3", "kdrl", "opd"])
def test_logged_guidance_and_gap_match_recomputation(tmp_path, student, teacher, tokenizer, dataset, mode):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance=mode, max_steps=1,
                           use_task_reward=False, guidance_top_k=4, loss_type="grpo", guidance_schedule="constant")
    records = record_references(trainer)
    (log,) = train_logs(trainer)
    (ref,) = records
    for key in ("guidance/loss", "gap/reverse_kl", "gap/mismatch_ratio"):
        assert log[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    assert log["guidance/coef"] == 0.5
    if mode != "opd":
        # without the task reward the policy term is zero: the loss is lambda times the guidance, reduced like "grpo"
        expected = 0.5 * G.aggregate(ref["per_token"], ref["mask"], "grpo", 8, 1.0).item()
        assert log["loss"] == pytest.approx(expected, rel=1e-4)


def fixed_inputs(trainer, dataset):
    """One scored generation batch, produced the way training produces it."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = [dataset[i // trainer.num_generations] for i in range(trainer.args.per_device_train_batch_size)]
    return trainer._generate_and_score_completions(batch)


def loss_and_grads(trainer, inputs, compute_loss):
    trainer.model.zero_grad()
    loss = compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def test_guidance_gradient_is_lambda_times_the_guidance_gradient(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, loss_type="bnpo")
    inputs = fixed_inputs(trainer, dataset)
    assert inputs["advantages"].abs().sum() > 0  # the policy term is live too

    _, with_guidance = loss_and_grads(trainer, inputs, trainer.compute_loss)
    trainer.guidance = "none"
    _, without_guidance = loss_and_grads(trainer, inputs, trainer.compute_loss)

    trainer.model.zero_grad()
    trainer.guidance = "tgpo"
    terms = reference_terms(trainer, inputs)
    (0.5 * G.aggregate(terms["per_token"], terms["mask"], "bnpo", 8, 1.0)).backward()
    reference = [p.grad for p in trainer.model.parameters() if p.grad is not None]

    difference = [a - b for a, b in zip(with_guidance, without_guidance, strict=True)]
    assert max(d.abs().max().item() for d in difference) > 1e-4  # the guidance does move the student
    for diff, ref_grad in zip(difference, reference, strict=True):
        assert torch.allclose(diff, ref_grad, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("mode", ["tgpo", "tgpo_sample", "tgpo_topk", "rkl_topk", "rkl_k3", "kdrl"])
def test_vllm_importance_sampling_ratio_weights_the_sampled_token_terms_only(tmp_path, student, teacher, tokenizer,
                                                                             dataset, mode):
    """With vLLM's rollouts TRL adds a per-token `importance_sampling_ratio` to the batch. The terms of the sampled
    token (`rkl_k3`, `kdrl`) are weighted by it; the target modes' terms depend on the prefix alone and are not.
    Without a task reward the policy term is zero, so the loss is the guidance term alone."""
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance=mode, use_task_reward=False,
                           loss_type="bnpo", guidance_top_k=4)
    inputs = fixed_inputs(trainer, dataset)
    torch.manual_seed(1)
    ratio = 0.25 + 1.5 * torch.rand(inputs["completion_ids"].shape)
    loss, _ = loss_and_grads(trainer, {**inputs, "importance_sampling_ratio": ratio}, trainer.compute_loss)
    logged = trainer._metrics["train"]["guidance/loss"][-1]
    terms = reference_terms(trainer, inputs)
    weight = ratio if mode in ("rkl_k3", "kdrl") else torch.ones_like(ratio)
    expected = 0.5 * G.aggregate(terms["per_token"] * weight, terms["mask"], "bnpo", 8, 1.0)
    unweighted = 0.5 * G.aggregate(terms["per_token"], terms["mask"], "bnpo", 8, 1.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    if mode in ("rkl_k3", "kdrl"):
        assert abs(expected.item() - unweighted.item()) > 1e-3 * abs(unweighted.item())  # the weights matter here
    assert logged == pytest.approx(terms["guidance/loss"], rel=1e-4, abs=1e-6)  # the metric stays unweighted


def test_guidance_none_is_exactly_grpo(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance="none")
    inputs = fixed_inputs(trainer, dataset)
    loss, grads = loss_and_grads(trainer, inputs, trainer.compute_loss)
    # GRPO's own loss, through TRL's fused LM head (the teacher's gathers are not active outside TGPO's compute_loss)
    grpo_loss, grpo_grads = loss_and_grads(trainer, inputs, lambda m, x: GRPOTrainer.compute_loss(trainer, m, x))
    assert loss.item() == pytest.approx(grpo_loss.item(), rel=1e-5, abs=1e-7)
    for a, b in zip(grads, grpo_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "schedule, expected", [("linear", [0.5, 1 / 3, 1 / 6, 0.0, 0.0]), ("constant", [0.5] * 5)]
)
def test_schedule_is_logged_step_by_step(tmp_path, student, teacher, tokenizer, dataset, schedule, expected):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, max_steps=5, guidance_schedule=schedule,
                           guidance_decay_steps=3)
    coefs = [row["guidance/coef"] for row in train_logs(trainer)]
    assert coefs == pytest.approx(expected)


def test_teacher_is_frozen_outside_the_optimizer_and_unchanged(tmp_path, student, teacher, tokenizer, dataset):
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance_coef=1.0)
    train_logs(trainer)
    assert trainer.teacher_model is teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert all(torch.equal(v, before_teacher[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, before_student[k]) for k, v in trainer.model.state_dict().items())


def test_padded_teacher_vocabulary_never_targets_padding_rows(tmp_path, student, teacher, tokenizer, dataset):
    with torch.no_grad():
        teacher.lm_head.weight[len(tokenizer):] = 50.0 * teacher.lm_head.weight[len(tokenizer):].sign()
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance="tgpo_topk", guidance_top_k=5)
    assert trainer.teacher_vocab_size == len(tokenizer)
    inputs = fixed_inputs(trainer, dataset)
    assert inputs["teacher_argmax"].max() < len(tokenizer)
    assert inputs["teacher_topk_ids"].max() < len(tokenizer)
    assert inputs["teacher_topk_ids"].shape[-1] == 5


@pytest.mark.parametrize("mode", ["tgpo", "kdrl", "rkl_k3"])
def test_a_sampled_token_of_probability_zero_keeps_its_target_and_the_gradient_finite(tmp_path, student, teacher,
                                                                                       tokenizer, dataset, mode):
    """The teacher's target at a prefix does not depend on the token the student sampled there: where the teacher gives
    that token probability 0, `log p_T(y_t)` is undefined (left out of the modes that read it, with no NaN sent back
    through them) but the target stays."""
    from real_vllm import minus_inf_row

    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance=mode, loss_type="bnpo")
    torch.manual_seed(0)
    inputs = fixed_inputs(trainer, dataset)
    mask = inputs["completion_mask"].bool()
    zero = inputs["completion_ids"][mask][0].item()
    minus_inf_row(teacher, zero)
    scores = trainer.score_with_teacher(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                        inputs["completion_mask"])
    at_zero = mask & (inputs["completion_ids"] == zero)
    assert at_zero.any() and (mask & ~at_zero).any()
    assert not scores.valid[at_zero].any() and scores.valid[mask & ~at_zero].all()
    assert scores.aligned[mask].all() and torch.isfinite(scores.logps).all()
    reference = full_logps(teacher, inputs, trainer.teacher_vocab_size)
    assert torch.equal(scores.argmax[mask], reference.argmax(-1)[mask])
    assert torch.isinf(reference.gather(-1, inputs["completion_ids"][..., None])[..., 0][at_zero]).all()
    inputs.update({key: value & mask if value.dtype == torch.bool and value.dim() == 2 else value
                   for key, value in scores.as_dict().items()})
    loss, grads = loss_and_grads(trainer, inputs, trainer.compute_loss)
    assert torch.isfinite(loss) and all(torch.isfinite(grad).all() for grad in grads)


def test_teacher_loaded_from_path_with_its_tokenizer(tmp_path, student, teacher, tokenizer, dataset):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    args = make_config(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"), max_steps=1)
    trainer = TGPOTrainer(model=student, reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    assert torch.equal(trainer.teacher_model.lm_head.weight, teacher.lm_head.weight)
    assert math.isfinite(train_logs(trainer)[0]["guidance/loss"])


def test_differently_mapped_teacher_tokenizer_turns_on_cross_tokenizer_scoring(
    tmp_path, student, teacher, tokenizer, dataset
):
    from tgpo_trl.demo.tokenizer import CHARACTERS, build_char_tokenizer

    shifted = build_char_tokenizer(CHARACTERS + ["~"])  # '~' sorts after every other character: no id moves
    reordered = build_char_tokenizer([c for c in CHARACTERS if c != "0"])  # every id after '0' moves
    teacher.save_pretrained(tmp_path / "teacher")
    reordered.save_pretrained(tmp_path / "teacher")
    args = make_config(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"))
    trainer = TGPOTrainer(model=student, reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    assert trainer.teacher_scoring.cross_tokenizer
    assert trainer.teacher_vocab_size == len(reordered)  # the teacher scores its own ids, not its padding rows
    # a teacher tokenizer that only adds tokens keeps the shared-vocabulary path
    shared = TGPOTrainer(model=student, reward_funcs=length_reward, args=make_config(tmp_path), train_dataset=dataset,
                         processing_class=tokenizer, teacher_model=teacher, teacher_processing_class=shifted)
    assert not shared.teacher_scoring.cross_tokenizer


def test_teacher_path_that_does_not_exist(tmp_path, student, tokenizer, dataset):
    args = make_config(tmp_path, teacher_model_name_or_path=str(tmp_path / "no-such-teacher"))
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        TGPOTrainer(model=student, reward_funcs=length_reward, args=args, train_dataset=dataset,
                    processing_class=tokenizer)


def test_guidance_that_needs_a_teacher_without_one(tmp_path, student, tokenizer, dataset):
    with pytest.raises(ValueError, match="needs a teacher"):
        TGPOTrainer(model=student, reward_funcs=length_reward, args=make_config(tmp_path), train_dataset=dataset,
                    processing_class=tokenizer)


def test_plain_grpo_without_teacher_trains(tmp_path, student, tokenizer, dataset):
    trainer = TGPOTrainer(model=student, reward_funcs=length_reward, args=make_config(tmp_path, guidance="none"),
                          train_dataset=dataset, processing_class=tokenizer)
    logs = train_logs(trainer)
    assert trainer.teacher_model is None and "gap/reverse_kl" not in logs[0]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("guidance", "tgpo_hard", "`guidance` must be one of"),
        ("guidance_coef", -0.1, "`guidance_coef` must be >= 0"),
        ("guidance_coef", float("nan"), "`guidance_coef` must be >= 0"),
        ("guidance_schedule", "cosine", "`guidance_schedule` must be one of"),
        ("guidance_decay_steps", 0, "`guidance_decay_steps` must be > 0"),
        ("guidance_top_k", 0, "`guidance_top_k` must be >= 1"),
    ],
)
def test_invalid_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TGPOConfig(output_dir="unused", use_cpu=True, **{field: value})


def test_nothing_to_train_is_refused():
    with pytest.raises(ValueError, match="use_task_reward"):
        TGPOConfig(output_dir="unused", use_cpu=True, guidance="none", use_task_reward=False)


def test_args_must_be_a_tgpo_config(tmp_path, student, teacher, tokenizer, dataset):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="TGPOConfig"):
        TGPOTrainer(model=student, args=GRPOConfig(str(tmp_path), use_cpu=True), train_dataset=dataset,
                    processing_class=tokenizer, teacher_model=teacher, reward_funcs=length_reward)


def test_model_card_names_tgpo_and_cites_the_paper(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset)
    trainer.create_model_card(model_name="tiny-tgpo")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "TGPO" in card and "2605.13230" in card and "Teacher-Guided Policy Optimization" in card
    assert "- tgpo" in card and "- trl" in card
