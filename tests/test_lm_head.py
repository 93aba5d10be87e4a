"""The student's extra log-probability columns and the teacher's chunked scoring, against full-vocabulary references."""

import pytest
import torch

from tgpo_trl import lm_head
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.utils import add_fused_lm_head

from tgpo_trl.lm_head import GatheredLogits, StudentLogProbs, score_rows


def reference_logits(hidden, weight, bias, temperature, scale, softcap):
    z = (hidden @ weight.t() + (0 if bias is None else bias)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


@pytest.mark.parametrize("with_bias", [False, True])
def test_gathered_logits_and_gradients_match_the_dense_projection(monkeypatch, with_bias):
    monkeypatch.setattr(lm_head, "GATHER_CHUNK_ELEMENTS", 30)  # 1 row of 4 ids x 6 per chunk: ragged chunks
    torch.manual_seed(0)
    n, h, v, c = 10, 6, 23, 4
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True) if with_bias else None
    ids = torch.randint(0, v, (n, c))
    ids[:, 1] = ids[:, 0]  # a repeated id must count twice in the gradient
    ids[3] = ids[2]  # and an id shared by two rows
    upstream = torch.randn(n, c, dtype=torch.float64)

    raw = GatheredLogits.apply(hidden, weight, bias, ids, torch.float64)
    (raw * upstream).sum().backward()
    grads = [p.grad.clone() for p in (hidden, weight, bias) if p is not None]
    for p in (hidden, weight, bias):
        if p is not None:
            p.grad = None
    reference = (hidden @ weight.t() + (0 if bias is None else bias)).gather(-1, ids)
    (reference * upstream).sum().backward()

    assert torch.allclose(raw.double(), reference, atol=1e-10)
    for grad, p in zip(grads, [p for p in (hidden, weight, bias) if p is not None], strict=True):
        assert torch.allclose(grad, p.grad, atol=1e-10), (grad - p.grad).abs().max()


def test_gathered_logits_with_no_row():
    hidden = torch.zeros(0, 4, requires_grad=True)
    raw = GatheredLogits.apply(hidden, torch.randn(9, 4), None, torch.zeros(0, 3, dtype=torch.long), torch.float32)
    raw.sum().backward()
    assert raw.shape == (0, 3) and hidden.grad.shape == (0, 4)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_extra_column_from_the_policy_column_is_log_softmax(softcap):
    """`log p(c) = log p(y) + z_c - z_y` with the model's transform: exact, and so is its gradient."""
    torch.manual_seed(1)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64)
    y, c = torch.randint(0, 13, (7,)), torch.randint(0, 13, (7,))
    log_probs = torch.log_softmax(reference_logits(hidden, weight, None, 0.7, 1.3, softcap), dim=-1)
    z = lm_head.transform_logits(hidden @ weight.t(), 1.3, softcap, 1 / 0.7)
    derived = log_probs.gather(-1, y[:, None]) + z.gather(-1, c[:, None]) - z.gather(-1, y[:, None])
    expected = log_probs.gather(-1, c[:, None])
    assert torch.allclose(derived, expected, atol=1e-12)
    (grad,) = torch.autograd.grad(derived.sum(), hidden, retain_graph=True)
    (ref_grad,) = torch.autograd.grad(expected.sum(), hidden)
    assert torch.allclose(grad, ref_grad, atol=1e-12)


def test_student_extra_logprobs_and_gradients_match_the_models_own_logits():
    """Through TRL's fused head and the hook on the backbone: the gathered columns are the model's log-softmax."""
    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=31, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).double().eval()
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    student = StudentLogProbs(model, temperature=0.7, cast_lm_head_to_fp32=False)
    batch, prompt, completion, k = 3, 4, 5, 2
    input_ids = torch.randint(0, 31, (batch, prompt + completion))
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[1, -2:] = -100  # padding at the end of one completion
    extra_ids = torch.randint(0, 31, (batch, completion, k))

    with student.gather(extra_ids) as gathered:
        output = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    label_logps, extra_logps = gathered.result
    upstream = torch.randn(batch, completion, k + 1, dtype=torch.float64)
    loss = (torch.cat([label_logps.unsqueeze(-1), extra_logps], -1) * upstream).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    log_probs = torch.log_softmax(model(input_ids=input_ids).logits[:, prompt - 1 : -1] / 0.7, dim=-1)
    valid = (labels[:, prompt:] != -100).unsqueeze(-1)
    expected_extra = log_probs.gather(-1, extra_ids) * valid
    expected_label = log_probs.gather(-1, input_ids[:, prompt:, None]).squeeze(-1) * valid.squeeze(-1)
    assert torch.allclose(output.log_probs[:, -completion:], label_logps)
    # TRL's head accumulates its log-partition in fp32 whatever the model's dtype
    assert torch.allclose(label_logps.double(), expected_label, atol=1e-5)
    assert torch.allclose(extra_logps.double(), expected_extra, atol=1e-5)
    expected_loss = (torch.cat([expected_label.unsqueeze(-1), expected_extra], -1) * upstream).sum()
    ref_grads = torch.autograd.grad(expected_loss, list(model.parameters()), allow_unused=True)
    for grad, ref in zip(grads, ref_grads, strict=True):
        if ref is None:
            assert grad is None or not grad.any()
        else:
            assert torch.allclose(grad, ref, atol=1e-5)


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
