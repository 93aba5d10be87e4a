"""
The guidance terms of TGPO and of its baselines, the coefficient schedule, and how a per-token term is reduced.

Every function is pure: tensors in, tensors out. Teacher inputs are detached log-probabilities (the teacher is never
differentiated); student inputs carry gradients. Per-token functions return a `(B, T)` tensor that `aggregate` reduces
like the policy term of the chosen GRPO `loss_type`.

Notation: `p_s` is the student, `p_T` the teacher, `y_t` the sampled token at completion position `t`, `s_t` its prefix.
"""

import torch


def tgpo_hard(student_logps_teacher_argmax: torch.Tensor) -> torch.Tensor:
    r"""
    TGPO (hard label): `G_t = -log p_s(yhat_t | s_t)` with `yhat_t = argmax_v p_T(v | s_t)`.

    The teacher's prediction on the student's own prefix is a directional target: it says where probability mass
    should go, also where `yhat_t == y_t`. Input: `log p_s(yhat_t)`, `(B, T)`.
    """
    return -student_logps_teacher_argmax


def tgpo_sample(student_logps_teacher_sample: torch.Tensor) -> torch.Tensor:
    r"""
    TGPO-MC: `G_t = -log p_s(v_t | s_t)` with `v_t ~ p_T(. | s_t)` at temperature 1. Input: `log p_s(v_t)`, `(B, T)`.
    """
    return -student_logps_teacher_sample


def _renormalize(logps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    # log q(v) = log p(v) - log sum_{u in top-k} p(u): the distribution restricted to the k kept tokens (the slots of
    # `mask`, when given: across tokenizers, merged or unmapped teacher entries leave slots empty)
    if mask is None:
        return logps - torch.logsumexp(logps, dim=-1, keepdim=True)
    kept = logps.masked_fill(~mask, -1e4)  # finite: a row with no kept slot must not give NaN gradients
    return (logps - torch.logsumexp(kept, dim=-1, keepdim=True)).masked_fill(~mask, 0.0)


def _slot_sum(terms: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return (terms if mask is None else terms.masked_fill(~mask, 0.0)).sum(-1)


def tgpo_topk(
    student_topk_logps: torch.Tensor, teacher_topk_logps: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""
    Soft TGPO: `G_t = sum_{v in topk(p_T)} q_T(v) (log q_T(v) - log p_s(v))`.

    `q_T` is the teacher renormalised on its top-k; `log p_s` is the student's full-vocabulary log-softmax (so mass the
    student puts outside the teacher's top-k is also pulled back). Inputs `(B, T, K)`, gathered at the teacher's
    top-k ids; `mask` `(B, T, K)`, optional, keeps only some slots.
    """
    log_q_teacher = _renormalize(teacher_topk_logps, mask)
    return _slot_sum(log_q_teacher.exp() * (log_q_teacher - student_topk_logps), mask)


def rkl_topk(
    student_topk_logps: torch.Tensor, teacher_topk_logps: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""
    Reverse KL on the teacher's top-k: `G_t = sum_v q_s(v) (log q_s(v) - log q_T(v))`, both renormalised on the
    teacher's top-k ids. Inputs `(B, T, K)`; `mask` `(B, T, K)`, optional, keeps only some slots.
    """
    log_q_student = _renormalize(student_topk_logps, mask)
    log_q_teacher = _renormalize(teacher_topk_logps, mask)
    return _slot_sum(log_q_student.exp() * (log_q_student - log_q_teacher), mask)


def rkl_k3(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    r"""
    k3 estimate of `KL(p_s || p_T)` at the sampled token: `G_t = exp(-r_t) - 1 + r_t`, `r_t = log p_s(y_t) - log p_T(y_t)`.
    Inputs `(B, T)`.
    """
    log_ratio = student_logps - teacher_logps
    return torch.exp(-log_ratio) - 1 + log_ratio


def kdrl_k2(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    r"""
    KDRL's k2 penalty at the sampled token: `G_t = 0.5 r_t^2`, `r_t = log p_s(y_t) - log p_T(y_t)`. Inputs `(B, T)`.
    """
    return 0.5 * (student_logps - teacher_logps).square()


def opd_advantages(teacher_logps: torch.Tensor, old_logps: torch.Tensor, coef: float) -> torch.Tensor:
    r"""
    Reverse-KL on-policy distillation: per-token advantage `A_t = lambda_k (log p_T(y_t) - log p_old(y_t))`.

    Every token the teacher finds less likely than the student does is pushed down; under a large gap that is nearly
    every token, with nothing saying where the mass should go (the failure TGPO addresses). Inputs `(B, T)`.
    """
    return coef * (teacher_logps - old_logps)


def guidance_coef(step: int, coef: float, schedule: str, decay_steps: int) -> float:
    """
    `lambda_k` for the 1-based optimizer step `k`: `lambda_0 * max(0, 1 - (k - 1) / D)` ("linear") or `lambda_0`
    ("constant").
    """
    if schedule == "constant":
        return coef
    if schedule == "linear":
        return coef * max(0.0, 1.0 - (step - 1) / decay_steps)
    raise ValueError(f"Unknown guidance schedule: {schedule!r}.")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int,
    accumulation_steps: float,
    num_items: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Reduce a `(B, T)` per-token term exactly like GRPO reduces its policy term for `loss_type`, so that the guidance and
    the policy term keep their relative weight whatever the batch layout, and gradient accumulation over
    `accumulation_steps` micro-batches (and data parallelism) give the gradient of one large batch.

    `num_items` is the token normaliser of the token-sum losses (`"dapo"`, `"cispo"`, `"vespo"`): the number of loss
    tokens of one accumulation window on this process.
    """
    mask = mask.to(per_token.dtype)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "luspo":
        loss = (per_token * mask).sum(-1).mean()
    elif loss_type in ("dapo", "cispo", "vespo"):
        if num_items is None:
            raise ValueError(f"`num_items` is required for loss_type={loss_type!r}.")
        return (per_token * mask).sum() / num_items
    else:
        raise ValueError(f"Unknown loss type: {loss_type!r}.")
    return loss / accumulation_steps
