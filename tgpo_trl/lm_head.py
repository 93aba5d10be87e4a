"""
Log-probabilities at several token ids per position, for the student and the teacher, without full logits.

TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) scores one label per position. TGPO needs, from the *same*
student forward, the log-probability of the sampled token (policy term) and of the teacher's tokens (guidance): a
second forward would double the student's cost and, under ZeRO-3, breaks DeepSpeed's gradient bucketing. So the
student's fused forward runs as TRL wrote it (its Triton kernels on GPU) and the `K` extra columns are read off its
log-partition with a few gathered logits per position; the teacher's no-grad scoring pass (`hidden_state_pass`: GRPO's
chunks, with their image inputs) keeps only what the guidance needs.

Neither path ever holds a `(batch, length, vocab)` tensor: the teacher's logits exist one chunk of rows at a time.
"""

import functools
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from trl.trainer.utils import maybe_gather_lm_head_ctx


# The student's extra columns are read a chunk of rows at a time: at most this many gathered weight entries (64 MiB
# in fp32), whatever the number of columns (top-k) and the hidden size.
GATHER_CHUNK_ELEMENTS = 2**24
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


class GatheredLogits(torch.autograd.Function):
    """
    Raw logits `hidden[n] . weight[ids[n, c]] (+ bias[ids[n, c]])` at `C` ids per row, without a vocabulary-wide
    tile: each product reads `C` rows of the weight. Inputs are cast to `dtype` (the projection's compute dtype) and the
    products accumulated in fp32 (fp64 for fp64 inputs), in chunks of rows; the backward accumulates in fp32 too, and only into the weight rows
    that were read.

    Inputs: `hidden (N, H)`, `weight (V, H)`, `bias (V,)` or None, `ids (N, C)` int64 in `[0, V)`. Output `(N, C)` fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, dtype):
        num_rows, num_cols = ids.shape
        acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        out = torch.empty(num_rows, num_cols, device=hidden.device, dtype=acc)
        step = _gather_chunk_rows(num_cols, hidden.size(-1))
        for start in range(0, num_rows, step):
            rows = slice(start, start + step)
            columns = weight[ids[rows]].to(dtype).to(acc)  # (n, C, H)
            out[rows] = torch.bmm(columns, hidden[rows].to(dtype).to(acc).unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            out += bias[ids].to(dtype).to(acc)
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.dtype, ctx.acc = dtype, acc
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, ids = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, acc = ctx.dtype, ctx.acc
        grad = grad.to(acc)
        grad_hidden = grad_weight = grad_bias = None
        unique_ids, position = ids.reshape(-1).unique(return_inverse=True)
        step = _gather_chunk_rows(ids.size(1), hidden.size(-1))
        with maybe_gather_lm_head_ctx(weight, bias):
            if need_hidden:
                grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=acc)
            if need_weight:
                grad_rows = torch.zeros(unique_ids.numel(), hidden.size(-1), device=weight.device, dtype=acc)
            for start in range(0, ids.size(0), step):
                rows = slice(start, start + step)
                g = grad[rows]  # (n, C)
                if need_hidden:
                    columns = weight[ids[rows]].to(dtype).to(acc)
                    grad_hidden[rows] = torch.bmm(g.unsqueeze(1), columns).squeeze(1)
                if need_weight:
                    h = hidden[rows].to(dtype).to(acc)
                    products = (g.unsqueeze(-1) * h.unsqueeze(1)).reshape(-1, h.size(-1))
                    grad_rows.index_add_(0, position.view(ids.shape)[rows].reshape(-1), products)
            if need_weight:
                grad_weight = torch.zeros_like(weight)
                grad_weight[unique_ids] = grad_rows.to(weight.dtype)
            if need_bias:
                grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=acc)
                grad_bias.index_add_(0, ids.reshape(-1), grad.reshape(-1))
                grad_bias = grad_bias.to(bias.dtype)
        return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None, grad_weight, grad_bias, None, None)


def _gather_chunk_rows(num_cols: int, hidden_size: int) -> int:
    """Rows per chunk of `GatheredLogits`, so a chunk's gathered weight rows hold at most `GATHER_CHUNK_ELEMENTS`."""
    return max(1, GATHER_CHUNK_ELEMENTS // max(1, num_cols * hidden_size))


def transform_logits(raw: torch.Tensor, logit_scale: float, softcap: float | None, inv_temperature: float):
    """The model's logit transform (scale, softcap) then the temperature, as TRL's fused head applies them. A factor of
    1.0 is skipped: on a vocabulary-wide tile it would be a full pass and an allocation."""
    z = raw * logit_scale if logit_scale != 1.0 else raw
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z * inv_temperature if inv_temperature != 1.0 else z


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
    (`model(..., labels=..., fused_lm_head=True)`, as GRPO calls it) also returns the log-probabilities at `extra_ids`
    from the same backbone pass.

    TRL's forward runs unchanged (its kernels, its log-partition, its outputs), so the policy term is exactly GRPO's.
    The backbone's last hidden state is caught on the way with a forward hook, and an extra column `c` is read off the
    policy column `y` as `log p(c) = log p(y) + z_c - z_y`: two gathered logits per column, no second pass over the
    vocabulary, and the gradient is exactly that of `log_softmax` at `c` (`1[c] - p`).

    GRPO may split one batch into several forwards (`batch_size` chunks); they are served in order, row by row.
    Outside `gather`, TRL's forward runs unchanged.
    """

    def __init__(self, model, temperature: float, cast_lm_head_to_fp32: bool):
        self.inv_temperature = 1.0 / temperature
        self.cast_lm_head_to_fp32 = cast_lm_head_to_fp32
        self.logit_scale, self.softcap = logit_transform(model.config)
        self._request = None
        fused_forward = model.forward
        this = self

        @functools.wraps(type(model).forward)
        def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
            if this._request is None or not fused_lm_head:
                return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
            caught = []
            hook = self.base_model.register_forward_hook(lambda module, inputs, out: caught.append(out))
            try:
                output = fused_forward(*args, fused_lm_head=True, labels=labels, **kwargs)
            finally:
                hook.remove()
            hidden, shifted = caught[0].last_hidden_state, kwargs.get("shift_labels")
            if shifted is None:  # as TRL's head: the last position predicts nothing
                hidden, shifted = hidden[:, :-1], labels[:, 1:]
            this._gather(self, hidden, shifted, output)
            return output

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

    def _gather(self, model, hidden, labels, output):
        """Append `(label_logps, extra_logps)` of one fused forward's rows to the active request."""
        request = self._request
        mask, log_probs = output.label_mask, output.log_probs
        extra = request.take(labels.size(0)).to(labels.device)
        num_completion, num_extra = extra.size(1), extra.size(2)
        extra_logps = log_probs.new_zeros(*mask.shape, num_extra)
        if num_extra:
            lm_head = model.get_output_embeddings()
            weight, bias = lm_head.weight, lm_head.bias
            if isinstance(weight, DTensor):  # FSDP2, as in TRL's head
                weight = weight.full_tensor()
                bias = bias.full_tensor() if bias is not None else None
            extra_full = labels.new_zeros(*labels.shape, num_extra)
            extra_full[:, -num_completion:] = extra
            ids = torch.cat([labels.clamp(min=0).unsqueeze(-1), extra_full], dim=-1).to(weight.device)[mask]
            hidden = hidden.to(weight.device)[mask]
            if self.cast_lm_head_to_fp32:
                dtype = torch.float32
            elif torch.is_autocast_enabled(hidden.device.type):
                dtype = torch.get_autocast_dtype(hidden.device.type)
            else:
                dtype = hidden.dtype
            with maybe_gather_lm_head_ctx(weight, bias):
                raw = GatheredLogits.apply(hidden, weight, bias, ids, dtype)
            z = transform_logits(raw, self.logit_scale, self.softcap, self.inv_temperature)
            # log p(c) = log p(y) + z_c - z_y: the log-partition is the one TRL's head computed for the policy column
            columns = log_probs[mask].unsqueeze(-1) + (z[:, 1:] - z[:, :1]).to(log_probs.dtype)
            extra_mask = mask.unsqueeze(-1).expand(*mask.shape, num_extra)
            # `masked_scatter` keeps the outputs connected to the graph even when no position is scored
            extra_logps = extra_logps.masked_scatter(extra_mask, columns)
        request.outputs.append((log_probs[:, -num_completion:], extra_logps[:, -num_completion:]))


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

    def label_logps(self) -> torch.Tensor:
        """`log p_s(y_t)` `(B, T)` of the whole batch, once the forwards have served all its rows."""
        if not self.outputs or self.cursor != self.extra_ids.size(0):
            raise RuntimeError(
                f"The student's log-probabilities were read after {self.cursor} of {self.extra_ids.size(0)} rows: "
                "GRPO's loss read the advantages before its student forward had run."
            )
        return torch.cat([label_logps for label_logps, _ in self.outputs])

    def finish(self):
        if self.outputs:
            label_logps, extra_logps = zip(*self.outputs, strict=True)
            self.result = torch.cat(label_logps), torch.cat(extra_logps)


@dataclass
class TeacherScores:
    """
    What the guidance needs from one teacher-forced pass, per completion position `(B, T)`: `logps` = `log p_T(y_t)`,
    `valid` (`logps` is finite: False where the teacher's output is not finite, `y_t` has probability 0 or is outside
    the scored ids), `argmax`, and per mode `sample` (a token drawn from `p_T`), `topk_ids` / `topk_logps` `(B, T, K)`;
    the ids are -1 where the teacher's distribution there is not finite (no target). Once mapped to the
    student's positions (`tgpo_trl.alignment`): `aligned` (the position has a teacher target; `valid` then says that
    `logps` is defined) and, across tokenizers or from a served teacher, `topk_valid` `(B, T, K)` (the slot holds a
    student id).
    """

    logps: torch.Tensor
    argmax: torch.Tensor
    valid: torch.Tensor
    sample: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None
    aligned: torch.Tensor | None = None
    topk_valid: torch.Tensor | None = None

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
    # Cast once, not per chunk: an fp32 teacher under bf16 autocast would rewrite its whole head for every chunk
    weight = weight[:vocab_size].to(dtype)
    bias = bias[:vocab_size].to(dtype) if bias is not None else None
    parts = []
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, num_rows))
        tile = hidden[rows].to(dtype) @ weight.t()
        if bias is not None:
            tile = tile + bias
        # Statistics in fp32 keep bf16 runs unbiased (see TRL's kernel notes)
        z = transform_logits(tile.float(), logit_scale, softcap, 1.0)
        del tile
        # Everything is read off `z` and its log-partition: no `(rows, vocab)` log-softmax is written. A row holding a
        # NaN or +inf has a non-finite log-partition (a -inf logit is a legitimate zero probability).
        log_z = torch.logsumexp(z, dim=-1)
        finite_rows = torch.isfinite(log_z)
        y = labels[rows]
        in_vocab = y < vocab_size
        logps = z.gather(-1, y.clamp(max=vocab_size - 1).unsqueeze(-1)).squeeze(-1) - log_z
        # a target exists wherever the teacher's distribution is finite, whatever it gives `y_t` (a zero probability
        # for the sampled token is where a target matters most); a non-finite row has none (-1), as from a server
        valid = in_vocab & finite_rows & torch.isfinite(logps)
        part = {
            # 0 where undefined, never -inf: a term of `log p_T(y_t)` masked out of the loss must not send a NaN back
            "logps": torch.where(valid, logps, 0.0),
            "argmax": torch.where(finite_rows, z.argmax(-1), -1),
            "valid": valid,
        }
        if sample:
            probs = torch.where(finite_rows.unsqueeze(-1), z - log_z.unsqueeze(-1), 0.0).exp_()
            drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            part["sample"] = torch.where(finite_rows, drawn, -1)
            del probs
        if top_k:
            topk = z.topk(min(top_k, vocab_size), dim=-1)
            part["topk_ids"] = torch.where(finite_rows.unsqueeze(-1), topk.indices, -1)
            part["topk_logps"] = torch.where(finite_rows.unsqueeze(-1), topk.values - log_z.unsqueeze(-1), 0.0)
        del z
        parts.append(part)
    if not parts:  # no scored position: empty tensors with the right trailing shapes
        k = min(top_k, vocab_size)
        empty = {"logps": hidden.new_zeros(0, dtype=torch.float32), "argmax": labels[:0], "valid": labels[:0] > 0}
        if sample:
            empty["sample"] = labels[:0]
        if top_k:
            empty["topk_ids"], empty["topk_logps"] = labels.new_zeros(0, k), hidden.new_zeros(0, k, dtype=torch.float32)
        return TeacherScores(**empty)
    return TeacherScores(**{key: torch.cat([part[key] for part in parts]) for key in parts[0]})


@contextmanager
def _forward_replaced(model, make_forward):
    """`model`'s forward replaced by `make_forward(module)` inside the context (`module`: the model a DeepSpeed engine or
    DDP wraps, whose forward the wrapper calls), the original put back after."""
    module = getattr(model, "module", model)
    saved = module.__dict__.get("forward")  # an instance-level forward (TRL's fused head), put back afterwards
    module.forward = make_forward(module)
    try:
        yield module
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _what_grpo_reads(labels: torch.Tensor, device) -> types.SimpleNamespace:
    """What `GRPOTrainer._get_per_token_logps_and_entropies` reads back from a forward: zeros, for a pass that keeps
    its own results."""
    return types.SimpleNamespace(log_probs=torch.zeros(labels.shape, device=device), entropy=None)


def hidden_state_pass(model, on_chunk):
    """
    While active, a forward of `model` in the form GRPO gives its chunked no-grad passes,
    `model(**chunk_inputs, labels=labels, fused_lm_head=True)` (`GRPOTrainer._get_per_token_logps_and_entropies`: a
    chunk of rows with its share of the batch's image inputs), runs the backbone only and calls
    `on_chunk(hidden, labels, lm_head)` with the hidden states that predict `labels` (shifted; -100 where nothing is
    scored); it returns what GRPO reads back (zeros as `log_probs`). TGPO's no-grad passes over a batch (the teacher's
    scoring, the gap report's student statistics) so get exactly the inputs, chunks and autocast GRPO gives its own
    forwards, images included, without a second copy of its chunking; and the call still goes through `model`, so a
    DeepSpeed engine gathers ZeRO-3 parameters on the way.
    """
    def make_forward(module):
        def forward(*args, labels=None, fused_lm_head=False, **kwargs):
            hidden, shifted, lm_head = _backbone_hidden_states(module, args, kwargs, labels)
            on_chunk(hidden, shifted, lm_head)
            return _what_grpo_reads(labels, hidden.device)
        return forward

    return _forward_replaced(model, make_forward)


@contextmanager
def recorded_chunk_inputs(model):
    """While active, a chunked forward of `model` (as in `hidden_state_pass`) runs nothing and records each chunk's
    inputs (`input_ids`, `attention_mask` and its share of the image inputs) in the yielded list: GRPO's split of a
    batch between chunks, read back (with chunks of one row, each row's own inputs)."""
    chunks = []

    def make_forward(module):
        def forward(*args, labels=None, fused_lm_head=False, **kwargs):
            chunks.append(kwargs)
            return _what_grpo_reads(labels, labels.device)
        return forward

    with _forward_replaced(model, make_forward):
        yield chunks
