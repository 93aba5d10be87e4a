"""Each guidance function against values computed by hand, the schedule, and the loss-type reduction."""

import math

import pytest
import torch

from tgpo_trl import guidance as G


def test_tgpo_hard_is_cross_entropy_to_teacher_argmax():
    student_logps_at_argmax = torch.log(torch.tensor([[0.5, 0.25]]))
    assert torch.allclose(G.tgpo_hard(student_logps_at_argmax), torch.tensor([[math.log(2), math.log(4)]]))


def test_tgpo_sample_is_cross_entropy_to_the_sampled_teacher_token():
    assert torch.allclose(G.tgpo_sample(torch.log(torch.tensor([[0.1]]))), torch.tensor([[math.log(10)]]))


def test_tgpo_topk_renormalises_the_teacher_and_uses_the_full_student():
    # teacher top-2 probabilities 0.6, 0.2 -> q_T = 0.75, 0.25; student probabilities there 0.5, 0.1
    teacher = torch.log(torch.tensor([[[0.6, 0.2]]]))
    student = torch.log(torch.tensor([[[0.5, 0.1]]]))
    expected = 0.75 * (math.log(0.75) - math.log(0.5)) + 0.25 * (math.log(0.25) - math.log(0.1))
    assert G.tgpo_topk(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_rkl_topk_renormalises_both_sides():
    teacher = torch.log(torch.tensor([[[0.6, 0.2]]]))  # q_T = 0.75, 0.25
    student = torch.log(torch.tensor([[[0.1, 0.3]]]))  # q_s = 0.25, 0.75
    expected = 0.25 * (math.log(0.25) - math.log(0.75)) + 0.75 * (math.log(0.75) - math.log(0.25))
    assert G.rkl_topk(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_rkl_topk_and_tgpo_topk_vanish_when_student_matches_teacher_on_topk():
    logps = torch.log(torch.tensor([[[0.3, 0.2, 0.1]]]))
    assert G.rkl_topk(logps, logps).abs().item() < 1e-6
    # the forward version still penalises the mass the student puts outside the top-k (it is a full-vocab log p_s)
    assert G.tgpo_topk(logps, logps).item() == pytest.approx(-math.log(0.6), rel=1e-5)


def test_rkl_k3_and_kdrl_k2_at_the_sampled_token():
    student, teacher = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-3.0, -2.0]])
    r = torch.tensor([[2.0, 0.0]])
    assert torch.allclose(G.rkl_k3(student, teacher), torch.exp(-r) - 1 + r)
    assert torch.allclose(G.kdrl_k2(student, teacher), torch.tensor([[2.0, 0.0]]))
    assert G.rkl_k3(teacher, student)[0, 0].item() == pytest.approx(math.exp(2) - 1 - 2)


def test_opd_advantage_is_scaled_teacher_minus_old_logp():
    advantages = G.opd_advantages(torch.tensor([[-1.0, -5.0]]), torch.tensor([[-2.0, -1.0]]), coef=0.5)
    assert torch.allclose(advantages, torch.tensor([[0.5, -2.0]]))


@pytest.mark.parametrize(
    "step, expected", [(1, 0.4), (2, 0.3), (3, 0.2), (4, 0.1), (5, 0.0), (9, 0.0)]
)
def test_linear_schedule_reaches_zero_after_decay_steps(step, expected):
    assert G.guidance_coef(step, 0.4, "linear", decay_steps=4) == pytest.approx(expected)


def test_constant_schedule_and_unknown_schedule():
    assert G.guidance_coef(1000, 0.4, "constant", decay_steps=4) == 0.4
    with pytest.raises(ValueError, match="schedule"):
        G.guidance_coef(1, 0.4, "cosine", decay_steps=4)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (2.0 + 4.0) / 2),  # mean of sequence means
        ("sapo", (2.0 + 4.0) / 2),
        ("bnpo", 10.0 / 4),  # token mean
        ("dr_grpo", 10.0 / (2 * 8)),  # sum / (B * max_completion_length)
        ("luspo", (6.0 + 4.0) / 2),  # mean of sequence sums
        ("dapo", 10.0 / 5),  # sum / num_items
        ("cispo", 10.0 / 5),
        ("vespo", 10.0 / 5),
    ],
)
def test_aggregate_matches_the_policy_reduction_of_each_loss_type(loss_type, expected):
    loss = G.aggregate(PER_TOKEN, MASK, loss_type, max_completion_length=8, accumulation_steps=2.0,
                       num_items=torch.tensor(5.0))
    token_sum_loss = loss_type in ("dapo", "cispo", "vespo")  # already normalised per accumulation window
    assert loss.item() == pytest.approx(expected if token_sum_loss else expected / 2)


def test_aggregate_of_token_sum_losses_over_micro_batches_equals_the_full_batch():
    per_token = torch.rand(6, 5, requires_grad=True)
    mask = (torch.rand(6, 5) > 0.3).int()
    full = G.aggregate(per_token, mask, "dapo", 5, 1.0, num_items=mask.sum().float())
    # two micro-batches of an accumulation window share the window's token count
    halves = sum(
        G.aggregate(per_token[rows], mask[rows], "dapo", 5, 2.0, num_items=mask.sum().float())
        for rows in (slice(0, 3), slice(3, 6))
    )
    assert halves.item() == pytest.approx(full.item(), rel=1e-6)


def test_aggregate_rejects_unknown_loss_type_and_missing_token_count():
    with pytest.raises(ValueError, match="loss type"):
        G.aggregate(PER_TOKEN, MASK, "ppo", 8, 1.0)
    with pytest.raises(ValueError, match="num_items"):
        G.aggregate(PER_TOKEN, MASK, "dapo", 8, 1.0)
