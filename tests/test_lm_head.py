"""The tiled multi-target LM head and the teacher's chunked scoring, against full-vocabulary references."""

import pytest
import torch

from tgpo_trl import lm_head
from tgpo_trl.lm_head import MultiTargetLogProb, score_rows


def reference_logits(hidden, weight, bias, temperature, scale, softcap):
    z = (hidden @ weight.t() + (0 if bias is None else bias)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


@pytest.fixture
def small_tiles(monkeypatch):
    # Several position and vocabulary tiles, with ragged last tiles, on a small problem
    monkeypatch.setattr(lm_head, "TOKEN_CHUNK_SIZE", 3)
    monkeypatch.setattr(lm_head, "VOCAB_CHUNK_SIZE", 7)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_multi_target_logprobs_and_gradients_match_full_log_softmax(small_tiles, softcap, with_bias):
    torch.manual_seed(0)
    n, h, v, c = 10, 6, 23, 4
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n, c))
    targets[:, 1] = targets[:, 0]  # a repeated column must count twice in the gradient
    upstream_logp, upstream_entropy = torch.randn(n, c), torch.randn(n)

    logps, entropy = MultiTargetLogProb.apply(hidden, weight, bias, targets, 0.7, 1.3, softcap)
    ((logps * upstream_logp).sum() + (entropy * upstream_entropy).sum()).backward()
    grads = [p.grad.clone() for p in (hidden, weight, bias) if p is not None]
    for p in (hidden, weight, bias):
        if p is not None:
            p.grad = None

    log_probs = torch.log_softmax(reference_logits(hidden, weight, bias, 0.7, 1.3, softcap), dim=-1)
    ref_logps = log_probs.gather(-1, targets)
    ref_entropy = -(log_probs.exp() * log_probs).sum(-1)
    ((ref_logps * upstream_logp).sum() + (ref_entropy * upstream_entropy).sum()).backward()
    ref_grads = [p.grad for p in (hidden, weight, bias) if p is not None]

    assert torch.allclose(logps.double(), ref_logps, atol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy, atol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(grad, ref, atol=1e-4)


def test_multi_target_logprobs_with_no_row():
    hidden = torch.zeros(0, 4, requires_grad=True)
    logps, entropy = MultiTargetLogProb.apply(hidden, torch.randn(9, 4), None, torch.zeros(0, 3, dtype=torch.long),
                                              1.0, 1.0, None)
    assert logps.shape == (0, 3) and entropy.shape == (0,)


@pytest.mark.parametrize("top_k", [0, 3])
def test_teacher_scores_match_full_log_softmax_restricted_to_shared_vocab(monkeypatch, top_k):
    monkeypatch.setattr(lm_head, "TEACHER_CHUNK_ELEMENTS", 40)  # two rows of 20 ids per chunk
    torch.manual_seed(0)
    n, h, rows, shared = 9, 5, 26, 20  # 6 padding rows beyond the shared vocabulary
    hidden, weight = torch.randn(n, h), torch.randn(rows, h)
    weight[shared:] += 100  # padding rows the teacher would otherwise prefer: they must never be a target
    labels = torch.randint(0, shared, (n,))
    scores = score_rows(hidden, weight, None, labels, shared, 1.0, None, top_k=top_k, sample=True,
                        generator=torch.Generator().manual_seed(0))

    log_probs = torch.log_softmax(hidden @ weight[:shared].t(), dim=-1)
    assert torch.allclose(scores.logps, log_probs.gather(-1, labels[:, None]).squeeze(-1), atol=1e-5)
    assert torch.equal(scores.argmax, log_probs.argmax(-1))
    assert scores.valid.all()
    assert scores.sample.shape == (n,) and (scores.sample < shared).all()
    if top_k:
        top = log_probs.topk(top_k, dim=-1)
        assert torch.equal(scores.topk_ids, top.indices)
        assert torch.allclose(scores.topk_logps, top.values, atol=1e-5)
    else:
        assert scores.topk_ids is None


def test_teacher_sample_follows_the_teacher_distribution():
    # one position, teacher probabilities 0.8 / 0.2 over a 2-token vocabulary
    weight = torch.tensor([[0.0], [1.0]])
    hidden = torch.full((4000, 1), -torch.log(torch.tensor(4.0)).item())
    scores = score_rows(hidden, weight, None, torch.zeros(4000, dtype=torch.long), 2, 1.0, None, sample=True,
                        generator=torch.Generator().manual_seed(0))
    assert scores.sample.float().mean().item() == pytest.approx(0.2, abs=0.03)


def test_non_finite_teacher_rows_are_flagged_and_zeroed():
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 3), torch.randn(8, 3)
    hidden[1, 0] = float("nan")
    hidden[2, 0] = float("inf")
    scores = score_rows(hidden, weight, None, torch.tensor([0, 1, 2, 3]), 8, 1.0, None, top_k=2)
    assert scores.valid.tolist() == [True, False, False, True]
    assert torch.isfinite(scores.logps).all() and torch.isfinite(scores.topk_logps).all()
