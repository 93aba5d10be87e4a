"""
Log-probabilities at several token ids per position from one tiled LM-head pass, for the student and the teacher.

TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) scores one label per position. TGPO needs, from the *same*
student forward, the log-probability of the sampled token (policy term) and of the teacher's tokens (guidance): a
second forward would double the student's cost and, under ZeRO-3, breaks DeepSpeed's gradient bucketing. So the
student's fused forward is extended here to gather `1 + K` columns per position while computing the log-partition
once, and the teacher gets a no-grad scoring forward that keeps only what the guidance needs.

Neither path ever holds a `(batch, length, vocab)` tensor: logits exist one `(rows, vocab chunk)` tile at a time.
"""

import functools
import math
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx


# Tile of the student kernel: 1024 positions x 32768 vocabulary columns is 128 MiB in fp32, a quarter of the tile TRL's
# own CPU path uses, so gathering extra columns never raises the step's peak above GRPO's.
TOKEN_CHUNK_SIZE = 1024
VOCAB_CHUNK_SIZE = 32768
# The teacher scores whole vocabulary rows (top-k needs them); rows are grouped so one chunk holds at most this many
# logits (128 MiB in fp32).
TEACHER_CHUNK_ELEMENTS = 2**25


def logit_transform(config) -> tuple[float, float | None]:
    """
    `(logit_scale, final_logit_softcapping)` of a causal LM config, read as TRL's fused head reads them, so student
    and teacher log-probabilities match the models' own logits.
    """
    text_config = config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), softcap


def _project(hidden, weight, bias, start, end, dtype, logit_scale, softcap, inv_temperature):
    """Transformed fp32 logits of one tile, and `tanh` of the softcap (needed by the backward), or None."""
    tile = hidden.to(dtype) @ weight[start:end].to(dtype).t()
    if bias is not None:
        tile = tile + bias[start:end].to(dtype)
    # Accumulating statistics in fp32 keeps bf16 runs unbiased (entropy drifts otherwise, see TRL's kernel notes)
    z = tile.float()
    # A multiplication by 1.0 is a full pass and a tile-sized allocation: skip the usual no-op transforms
    if logit_scale != 1.0:
        z = z * logit_scale
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    if inv_temperature != 1.0:
        z = z * inv_temperature
    return z, tanh


class MultiTargetLogProb(torch.autograd.Function):
    """
    `log softmax(transform(hidden @ weight.T) / T)` at `C` target ids per row, and the entropy of each row, tiled over
    positions and vocabulary with an online log-sum-exp. The backward recomputes each tile.

    Inputs: `hidden (N, H)`, `weight (V, H)`, `bias (V,)` or None, `targets (N, C)` int64 in `[0, V)`.
    Outputs: `logprobs (N, C)` and `entropy (N,)`, both fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, logit_scale, softcap):
        ctx.set_materialize_grads(False)
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        transform = {"logit_scale": logit_scale, "softcap": softcap, "inv_temperature": 1.0 / temperature}
        num_rows, vocab = hidden.size(0), weight.size(0)
        log_z = torch.empty(num_rows, device=device, dtype=torch.float32)
        entropy = torch.empty(num_rows, device=device, dtype=torch.float32)
        target_logits = torch.zeros(targets.shape, device=device, dtype=torch.float32)
        for row_start in range(0, num_rows, TOKEN_CHUNK_SIZE):
            rows = slice(row_start, min(row_start + TOKEN_CHUNK_SIZE, num_rows))
            running_max = torch.full((rows.stop - rows.start,), -math.inf, device=device)
            sum_exp = torch.zeros_like(running_max)
            weighted_sum = torch.zeros_like(running_max)  # sum_v exp(z_v - max) z_v, for the entropy
            for start in range(0, vocab, VOCAB_CHUNK_SIZE):
                end = min(start + VOCAB_CHUNK_SIZE, vocab)
                z, _ = _project(hidden[rows], weight, bias, start, end, dtype, **transform)
                new_max = torch.maximum(running_max, z.amax(-1))
                rescale = torch.exp(running_max - new_max)
                e = torch.exp(z - new_max.unsqueeze(-1))
                sum_exp = sum_exp * rescale + e.sum(-1)
                weighted_sum = weighted_sum * rescale + (e * z).sum(-1)
                running_max = new_max
                local = targets[rows] - start
                in_tile = (local >= 0) & (local < end - start)
                gathered = z.gather(-1, local.clamp(0, end - start - 1))
                target_logits[rows] = torch.where(in_tile, gathered, target_logits[rows])
            log_z[rows] = running_max + torch.log(sum_exp)
            entropy[rows] = log_z[rows] - weighted_sum / sum_exp
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.dtype, ctx.transform = dtype, transform
        return target_logits - log_z.unsqueeze(-1), entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        transform = ctx.transform
        # Gradients are accumulated in fp32 whatever the parameters' dtype
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device) if need_hidden else None
        with maybe_gather_lm_head_ctx(weight, bias):
            vocab = weight.size(0)
            grad_weight = torch.zeros(weight.shape, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, device=bias.device) if need_bias else None
            for row_start in range(0, hidden.size(0), TOKEN_CHUNK_SIZE):
                rows = slice(row_start, min(row_start + TOKEN_CHUNK_SIZE, hidden.size(0)))
                hidden_rows = hidden[rows].to(ctx.dtype)
                g_logp = grad_logprobs[rows].float() if grad_logprobs is not None else None
                for start in range(0, vocab, VOCAB_CHUNK_SIZE):
                    end = min(start + VOCAB_CHUNK_SIZE, vocab)
                    z, tanh = _project(hidden[rows], weight, bias, start, end, ctx.dtype, **transform)
                    log_p = z - log_z[rows].unsqueeze(-1)
                    p = log_p.exp()
                    grad_z = torch.zeros_like(z)
                    if g_logp is not None:
                        # d log p_c / dz_j = 1[j = c] - p_j, summed over the C gathered columns
                        local = targets[rows] - start
                        in_tile = (local >= 0) & (local < end - start)
                        grad_z.scatter_add_(-1, local.clamp(0, end - start - 1), g_logp * in_tile)
                        grad_z -= p * g_logp.sum(-1, keepdim=True)
                    if grad_entropy is not None:
                        # d H / dz_j = -p_j (log p_j + H)
                        grad_z -= grad_entropy[rows].float().unsqueeze(-1) * p * (log_p + entropy[rows].unsqueeze(-1))
                    if transform["inv_temperature"] != 1.0:
                        grad_z = grad_z * transform["inv_temperature"]
                    if tanh is not None:
                        grad_z = grad_z * (1 - tanh * tanh)
                    if transform["logit_scale"] != 1.0:
                        grad_z = grad_z * transform["logit_scale"]
                    if grad_hidden is not None:
                        grad_hidden[rows] += grad_z @ weight[start:end].float()
                    if grad_weight is not None:
                        grad_weight[start:end] += grad_z.t() @ hidden_rows.float()
                    if grad_bias is not None:
                        grad_bias[start:end] += grad_z.sum(0)
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def _backbone_hidden_states(model, args, kwargs, labels):
    """Run the backbone and return the hidden states that predict `labels[:, 1:]`, and those shifted labels."""
    kwargs["use_cache"] = False
    outputs = model.base_model(*args, **kwargs)
    lm_head = model.get_output_embeddings()
    hidden = outputs.last_hidden_state[:, :-1].to(lm_head.weight.device)
    return hidden, labels[:, 1:].to(lm_head.weight.device), lm_head


class StudentLogProbs:
    """
    Extends a student already patched with TRL's fused LM head: while `gather(extra_ids)` is active, the fused forward
    (`model(..., labels=..., fused_lm_head=True)`, as GRPO calls it) also gathers the log-probabilities at `extra_ids`,
    from the same backbone pass and the same log-partition as the policy log-probabilities.

    GRPO may split one batch into several forwards (`batch_size` chunks); they are served in order, row by row.
    Outside `gather`, TRL's forward runs unchanged.
    """

    def __init__(self, model, temperature: float, cast_lm_head_to_fp32: bool):
        self.temperature = temperature
        self.cast_lm_head_to_fp32 = cast_lm_head_to_fp32
        self.logit_scale, self.softcap = logit_transform(model.config)
        self._request = None
        fused_forward = model.forward
        this = self

        @functools.wraps(type(model).forward)
        def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
            if this._request is None or not fused_lm_head:
                return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
            return this._gathering_forward(self, args, kwargs, labels)

        model.forward = types.MethodType(forward, model)

    @contextmanager
    def gather(self, extra_ids: torch.Tensor):
        """
        Gather `log p_s` at `extra_ids` (`(B, T, K)`, ids for the last `T` positions, the completion) during the fused
        forwards run inside the context. The result, `(label_logps (B, T), extra_logps (B, T, K))`, with gradients, is
        set on the yielded object's `result` once the context exits.
        """
        self._request = _GatherRequest(extra_ids)
        try:
            yield self._request
        finally:
            request, self._request = self._request, None
            request.finish()

    def _gathering_forward(self, model, args, kwargs, labels):
        request = self._request
        hidden, labels, lm_head = _backbone_hidden_states(model, args, kwargs, labels)
        mask = labels != -100
        batch = labels.size(0)
        extra = request.take(batch).to(labels.device)
        num_completion, num_extra = extra.size(1), extra.size(2)
        extra_full = labels.new_zeros(*labels.shape, num_extra)
        extra_full[:, -num_completion:] = extra
        targets = torch.cat([labels.clamp(min=0).unsqueeze(-1), extra_full], dim=-1)[mask]

        hidden = hidden[mask]
        autocast_ctx = nullcontext()
        if self.cast_lm_head_to_fp32:
            hidden = hidden.float()
            autocast_ctx = torch.autocast(hidden.device.type, enabled=False)
        weight, bias = lm_head.weight, lm_head.bias
        with autocast_ctx, maybe_gather_lm_head_ctx(weight, bias):
            logprobs, entropy = MultiTargetLogProb.apply(
                hidden, weight, bias, targets, self.temperature, self.logit_scale, self.softcap
            )
        # `masked_scatter` keeps the outputs connected to the graph even when no position is scored
        log_probs = logprobs.new_zeros(mask.shape).masked_scatter(mask, logprobs[:, 0])
        entropies = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        extra_mask = mask.unsqueeze(-1).expand(*mask.shape, num_extra)
        extra_logps = logprobs.new_zeros(extra_mask.shape).masked_scatter(extra_mask, logprobs[:, 1:])
        request.outputs.append((log_probs[:, -num_completion:], extra_logps[:, -num_completion:]))
        loss = -log_probs.sum() / mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropies, label_mask=mask)


class _GatherRequest:
    def __init__(self, extra_ids: torch.Tensor):
        self.extra_ids = extra_ids
        self.cursor = 0
        self.outputs = []
        self.result = None

    def take(self, rows: int) -> torch.Tensor:
        ids = self.extra_ids[self.cursor : self.cursor + rows]
        if ids.size(0) != rows:
            raise RuntimeError(
                f"The student forward asked for rows {self.cursor}..{self.cursor + rows} of the guidance targets, "
                f"which hold {self.extra_ids.size(0)}."
            )
        self.cursor += rows
        return ids

    def finish(self):
        if self.outputs:
            label_logps, extra_logps = zip(*self.outputs, strict=True)
            self.result = torch.cat(label_logps), torch.cat(extra_logps)


@dataclass
class TeacherScores:
    """
    What the guidance needs from one teacher-forced pass, per completion position `(B, T)`: `logps` = `log p_T(y_t)`,
    `argmax`, `valid` (False where the teacher's output is not finite or `y_t` is outside the shared vocabulary),
    and per mode `sample` (a token drawn from `p_T`), `topk_ids` / `topk_logps` `(B, T, K)`.
    """

    logps: torch.Tensor
    argmax: torch.Tensor
    valid: torch.Tensor
    sample: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None

    def as_dict(self, prefix: str = "teacher_") -> dict[str, torch.Tensor]:
        return {prefix + key: value for key, value in vars(self).items() if value is not None}


def score_rows(hidden, weight, bias, labels, vocab_size, logit_scale, softcap, top_k=0, sample=False, generator=None):
    """
    Teacher statistics of `N` positions from their hidden states `(N, H)` and next tokens `labels (N,)`, in chunks of
    rows. Logits are restricted to the first `vocab_size` ids (the vocabulary shared with the student: padding rows of a
    larger embedding, and tokens the student cannot emit, never become targets). Returns a `TeacherScores` of `(N,)` /
    `(N, K)` tensors.
    """
    num_rows = hidden.size(0)
    device = hidden.device
    rows_per_chunk = max(1, TEACHER_CHUNK_ELEMENTS // vocab_size)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    parts = []
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, num_rows))
        z, _ = _project(hidden[rows], weight, bias, 0, vocab_size, dtype, logit_scale, softcap, 1.0)
        log_probs = torch.log_softmax(z, dim=-1)
        del z
        y = labels[rows]
        in_vocab = y < vocab_size
        logps = log_probs.gather(-1, y.clamp(max=vocab_size - 1).unsqueeze(-1)).squeeze(-1)
        # A row sum is finite only if every entry is (NaN and +-inf propagate). One reduction, where
        # `isfinite(log_probs).all(-1)` takes several passes and allocations (twice log_softmax's time on the CPU); an
        # overflowing sum (|log p| ~ 1e33 on average) would flag a finite row, which only skips its token.
        finite_rows = torch.isfinite(log_probs.sum(-1))
        part = {
            "logps": torch.where(in_vocab & finite_rows, logps, 0.0),
            "argmax": log_probs.argmax(-1),
            "valid": in_vocab & finite_rows & torch.isfinite(logps),
        }
        if sample:
            safe = torch.where(finite_rows.unsqueeze(-1), log_probs, 0.0)
            part["sample"] = torch.multinomial(safe.exp(), 1, generator=generator).squeeze(-1)
        if top_k:
            topk = log_probs.topk(min(top_k, vocab_size), dim=-1)
            part["topk_ids"] = topk.indices
            part["topk_logps"] = torch.where(finite_rows.unsqueeze(-1), topk.values, 0.0)
        parts.append(part)
        del log_probs
    if not parts:  # no scored position: empty tensors with the right trailing shapes
        k = min(top_k, vocab_size)
        empty = {"logps": hidden.new_zeros(0, dtype=torch.float32), "argmax": labels[:0], "valid": labels[:0] > 0}
        if sample:
            empty["sample"] = labels[:0]
        if top_k:
            empty["topk_ids"], empty["topk_logps"] = labels.new_zeros(0, k), hidden.new_zeros(0, k, dtype=torch.float32)
        return TeacherScores(**empty)
    return TeacherScores(**{key: torch.cat([part[key] for part in parts]) for key in parts[0]})


def install_teacher_scoring(model, vocab_size: int) -> None:
    """
    Give the teacher a scoring forward: `model(input_ids, attention_mask=..., labels=labels, teacher_scoring=request)`
    returns the `TeacherScores` of every position whose label is not -100, without materializing full logits. Going
    through the model's own forward (rather than calling its backbone directly) keeps DeepSpeed ZeRO-3's parameter
    gathering hooks in play. Without `teacher_scoring`, the forward is the original one.
    """
    original_forward = model.forward
    logit_scale, softcap = logit_transform(model.config)

    @functools.wraps(type(model).forward)
    def forward(self, *args, teacher_scoring=None, labels=None, **kwargs):
        if teacher_scoring is None:
            return original_forward(*args, labels=labels, **kwargs)
        hidden, labels, lm_head = _backbone_hidden_states(self, args, kwargs, labels)
        mask = labels != -100
        with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):
            scores = score_rows(
                hidden[mask], lm_head.weight, lm_head.bias, labels[mask], vocab_size, logit_scale, softcap,
                **teacher_scoring,
            )
        return mask, scores

    model.forward = types.MethodType(forward, model)
