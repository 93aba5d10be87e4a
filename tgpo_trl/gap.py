"""
The student-teacher gap measured before training, and which method it suggests (`tgpo_trl.gap_report`, `tgpo gap-report`).

Everything is measured on the student's own rollouts, at the run's temperature, with the teacher scored by the
trainer's own `TGPOTrainer.score_with_teacher` (so the vocabulary rule and cross-tokenizer scoring are the trainer's).
This module holds the parts that need no trainer:

- `student_statistics`: the student's side, one no-grad forward per chunk of rows (the trainer's chunks, with the
  batch's image inputs), its LM head applied a chunk of positions at a time (never a `(batch, length, vocab)` tensor):
  `log p_s` at the sampled token, at the teacher's argmax and top-k ids, and the student's own top-k ids;
- `token_gap`: the per-token statistics (tensors in, `(values, mask)` pairs out);
- `GapAccumulator`: running sums, fixed-bin histograms and per-position bins of those statistics, mergeable across
  chunks and processes (bounded memory: nothing grows with the number of tokens);
- `prefix_lengths`, `back_to_teacher_token_starts`: where a rollout is cut for the prefix-completion test;
- `gap_verdict`: the statistics in, a verdict in plain words out, with thresholds calibrated on the benchmark
  (`docs/gap_report.md` gives the numbers they come from).

With `r_t = log p_s(y_t) - log p_T(y_t)` (`p_s` at the run's temperature, as the trainer's `gap/reverse_kl`):

| statistic | per completion token | over the tokens |
|---|---|---|
| `reverse_kl` | `r_t` | with a teacher `log p_T(y_t)` |
| `mismatch_ratio` | `1[argmax p_T != y_t]` | with a teacher target |
| `off_support_ratio` | `1[y_t not in top-k(p_T)]` | with a teacher target |
| `guidance_loss` | `-log p_s(argmax p_T)` (TGPO's term at step 0) | with a teacher target |
| `teacher_confidence` | `max_v p_T(v)` | with a teacher target |
| `topk_overlap` | `|top-k(p_s) & top-k(p_T)| / k` | with a teacher target |
| `shared_mass` | `sum_{v in top-k(p_T)} min(p_s(v), p_T(v))` (a lower bound of `1 - TV(p_s, p_T)`) | with a teacher target |
| `negative_feedback` | `1[r_t > NEGATIVE_FEEDBACK_NATS]`: the teacher gives `y_t` e^-5 of the student's probability | with a teacher `log p_T(y_t)` |
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .lm_head import (
    TEACHER_CHUNK_ELEMENTS,
    hidden_state_pass,
    logit_transform,
    transform_logits,
)
from .teacher import chunked_forward

TOKEN_METRICS = ("reverse_kl", "mismatch_ratio", "off_support_ratio", "guidance_loss", "teacher_confidence",
                 "topk_overlap", "shared_mass", "negative_feedback")
# A sampled token counts as uninformative negative feedback for reverse-KL distillation when the teacher gives it less
# than e^-5 (~0.7%) of the student's probability: its RKL advantage is below -5, it is pushed down hard, and nothing
# in the signal says where the mass should go.
NEGATIVE_FEEDBACK_NATS = 5.0
# Fixed histogram edges per statistic (values outside land in the first or last bin): the bins are what the histograms
# and the quantiles are read from, so memory does not grow with the number of tokens. Quantiles are exact to one bin.
HISTOGRAM_EDGES = {
    "reverse_kl": np.linspace(-15.0, 25.0, 801),
    "guidance_loss": np.linspace(0.0, 30.0, 601),
    **{name: np.linspace(0.0, 1.0, 101) for name in ("teacher_confidence", "topk_overlap", "shared_mass")},
    **{name: np.array([0.0, 0.5, 1.0]) for name in ("mismatch_ratio", "off_support_ratio", "negative_feedback")},  # 0, 1
}
BINARY_METRICS = ("mismatch_ratio", "off_support_ratio", "negative_feedback")
POSITION_BINS = 10
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PREFIX_FRACTIONS = (0.25, 0.5, 0.75)


# ------------------------------------------------------------------ the student's side


@dataclass
class StudentStatistics:
    """`logps (B, T)`: `log p_s(y_t)`; `target_logps (B, T, C)`: `log p_s` at the requested ids; `topk_ids (B, T, k)`."""

    logps: torch.Tensor
    target_logps: torch.Tensor
    topk_ids: torch.Tensor


@torch.no_grad()
def student_statistics(model, prompt_ids, prompt_mask, completion_ids, completion_mask, target_ids: torch.Tensor,
                       temperature: float, top_k: int, batch_size: int, forward=chunked_forward,
                       image_inputs: dict | None = None) -> StudentStatistics:
    """
    The student's log-probabilities at the run's `temperature` (logits scaled and soft-capped as the trainer's fused
    head does, then divided by the temperature), at the sampled tokens and at `target_ids (B, T, C)`, and its own
    top-k ids, for every completion position. The backbone runs in `forward`'s chunks of `batch_size` rows (the
    trainer's `_get_per_token_logps_and_entropies`, which also splits the batch's `image_inputs` between them); the LM
    head is applied to at most `TEACHER_CHUNK_ELEMENTS // vocab` positions at a time, in fp32.
    """
    logit_scale, softcap = logit_transform(getattr(model, "module", model).config)
    inv_temperature = 1.0 / temperature
    num_completion = completion_ids.size(1)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    out_logps = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    out_targets = torch.zeros(target_ids.shape, dtype=torch.float32, device=completion_ids.device)
    out_topk = torch.zeros(*completion_ids.shape, top_k, dtype=torch.long, device=completion_ids.device)
    done = [0]  # rows measured so far: the chunks come in order

    def measure_chunk(hidden, _, lm_head):
        rows = slice(done[0], done[0] + hidden.size(0))
        done[0] = rows.stop
        hidden = hidden[:, -num_completion:]  # the positions that predict the completion's tokens
        mask = completion_mask[rows].bool()
        h = hidden[mask]
        labels = completion_ids[rows][mask].to(h.device)
        targets = target_ids[rows][mask].to(h.device)
        weight, bias = lm_head.weight, lm_head.bias
        logps, target_logps, topk = [], [], []
        with maybe_gather_lm_head_ctx(weight, bias):
            vocab = weight.size(0)
            step = max(1, TEACHER_CHUNK_ELEMENTS // vocab)
            for s in range(0, h.size(0), step):
                z = h[s : s + step].float() @ weight.float().t()
                if bias is not None:
                    z = z + bias.float()
                z = transform_logits(z, logit_scale, softcap, inv_temperature)
                z = z - torch.logsumexp(z, dim=-1, keepdim=True)  # log-softmax in place of the logits
                logps.append(z.gather(-1, labels[s : s + step].unsqueeze(-1)).squeeze(-1))
                target_logps.append(z.gather(-1, targets[s : s + step].clamp(0, vocab - 1)))
                topk.append(z.topk(min(top_k, vocab), dim=-1).indices)
                del z
        if h.size(0):
            out_logps[rows][mask] = torch.cat(logps).to(out_logps.device)
            out_targets[rows][mask] = torch.cat(target_logps).to(out_targets.device)
            found = torch.cat(topk)
            out_topk[rows][mask] = torch.nn.functional.pad(found, (0, top_k - found.size(-1)), value=-1).to(
                out_topk.device)

    with hidden_state_pass(model, measure_chunk):
        forward(model, input_ids, attention_mask, num_completion, batch_size=batch_size, **(image_inputs or {}))
    return StudentStatistics(out_logps, out_targets, out_topk)


# ------------------------------------------------------------------ per-token statistics


def token_gap(completion_ids, completion_mask, teacher: dict[str, torch.Tensor], student_logps,
              student_argmax_logps, student_topk_logps, student_topk_ids) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """
    Per-token gap statistics `(values (B, T), mask (B, T))` by name (`TOKEN_METRICS`). `teacher` holds the trainer's
    teacher scores in the student's positions and ids (`TGPOTrainer.score_with_teacher(...).as_dict()`: `teacher_logps`,
    `teacher_valid`, `teacher_argmax`, `teacher_aligned`, `teacher_topk_ids`, `teacher_topk_logps` and, across
    tokenizers, `teacher_topk_valid`); the student's side is `log p_s` at the sampled tokens, at the teacher's argmax
    and at the teacher's top-k ids, and the student's own top-k ids. Statistics of the teacher's target are taken only
    where there is one (`teacher_aligned`), `r_t` only where `log p_T(y_t)` is defined (`teacher_valid`).
    """
    mask = completion_mask.bool()
    logp_mask = mask & teacher["teacher_valid"].bool()
    target_mask = mask & teacher.get("teacher_aligned", teacher["teacher_valid"]).bool()
    topk_ids, topk_logps = teacher["teacher_topk_ids"], teacher["teacher_topk_logps"]
    slot_valid = teacher.get("teacher_topk_valid")
    slot_valid = torch.ones_like(topk_ids, dtype=torch.bool) if slot_valid is None else slot_valid.bool()
    log_ratio = (student_logps - teacher["teacher_logps"]).masked_fill(~logp_mask, 0.0)
    in_support = ((topk_ids == completion_ids.unsqueeze(-1)) & slot_valid).any(-1)
    # |top-k(p_s) & top-k(p_T)| / |top-k(p_T)|: a teacher slot counts once, whatever the student's order
    shared = ((topk_ids.unsqueeze(-1) == student_topk_ids.unsqueeze(-2)).any(-1) & slot_valid).sum(-1)
    overlap = shared.float() / slot_valid.sum(-1).clamp(min=1).float()
    mass = torch.minimum(student_topk_logps.exp(), topk_logps.exp()).masked_fill(~slot_valid, 0.0).sum(-1)

    def on(values, where):
        return values.float().masked_fill(~where, 0.0), where

    return {
        "reverse_kl": on(log_ratio, logp_mask),
        "mismatch_ratio": on(teacher["teacher_argmax"] != completion_ids, target_mask),
        "off_support_ratio": on(~in_support, target_mask),
        "guidance_loss": on(-student_argmax_logps, target_mask),
        "teacher_confidence": on(topk_logps[..., 0].exp(), target_mask),
        "topk_overlap": on(overlap, target_mask),
        "shared_mass": on(mass, target_mask),
        "negative_feedback": on(log_ratio > NEGATIVE_FEEDBACK_NATS, logp_mask),
    }


def relative_positions(completion_mask: torch.Tensor, bins: int = POSITION_BINS) -> torch.Tensor:
    """`(B, T)` bin of each completion token's relative position `t / length` (0 = first token, `bins - 1` = last)."""
    lengths = completion_mask.sum(-1, keepdim=True).clamp(min=1)
    t = torch.arange(completion_mask.size(1), device=completion_mask.device).unsqueeze(0)
    return (t * bins // lengths).clamp(max=bins - 1)


# ------------------------------------------------------------------ accumulation (bounded memory, mergeable)


@dataclass
class GapAccumulator:
    """Running sums, counts, fixed-bin histograms and per-position sums of each statistic, plus one mean per completion
    (for the per-sequence distribution) and the token counts behind `aligned_ratio`. `state()` / `merge()` move it
    across processes."""

    sums: dict = field(default_factory=lambda: {name: 0.0 for name in TOKEN_METRICS})
    counts: dict = field(default_factory=lambda: {name: 0 for name in TOKEN_METRICS})
    histograms: dict = field(
        default_factory=lambda: {name: np.zeros(len(HISTOGRAM_EDGES[name]) - 1, np.int64) for name in TOKEN_METRICS})
    position_sums: dict = field(default_factory=lambda: {name: np.zeros(POSITION_BINS) for name in TOKEN_METRICS})
    position_counts: dict = field(
        default_factory=lambda: {name: np.zeros(POSITION_BINS, np.int64) for name in TOKEN_METRICS})
    sequence_means: dict = field(default_factory=lambda: {name: [] for name in TOKEN_METRICS})
    minimum: dict = field(default_factory=lambda: {name: math.inf for name in TOKEN_METRICS})
    maximum: dict = field(default_factory=lambda: {name: -math.inf for name in TOKEN_METRICS})
    completion_tokens: int = 0
    aligned_tokens: int = 0

    def update(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]], completion_mask: torch.Tensor) -> None:
        mask = completion_mask.bool()
        positions = relative_positions(completion_mask).cpu().numpy()
        self.completion_tokens += int(mask.sum())
        self.aligned_tokens += int(stats["mismatch_ratio"][1].sum())
        for name, (values, where) in stats.items():
            v = values.double().cpu().numpy()
            w = where.cpu().numpy()
            picked = v[w]
            if picked.size == 0:
                continue
            self.sums[name] += float(picked.sum())
            self.counts[name] += int(picked.size)
            edges = HISTOGRAM_EDGES[name]
            index = np.clip(np.searchsorted(edges, picked, side="right") - 1, 0, len(edges) - 2)
            self.histograms[name] += np.bincount(index, minlength=len(edges) - 1)
            self.position_sums[name] += np.bincount(positions[w], weights=picked, minlength=POSITION_BINS)
            self.position_counts[name] += np.bincount(positions[w], minlength=POSITION_BINS)
            self.minimum[name] = min(self.minimum[name], float(picked.min()))
            self.maximum[name] = max(self.maximum[name], float(picked.max()))
            per_row, tokens = (v * w).sum(1), w.sum(1)
            self.sequence_means[name] += (per_row[tokens > 0] / tokens[tokens > 0]).tolist()

    def state(self) -> dict:
        return {key: getattr(self, key) for key in self.__dataclass_fields__}

    @classmethod
    def merge(cls, states: list[dict]) -> "GapAccumulator":
        total = cls()
        for state in states:
            for name in TOKEN_METRICS:
                total.sums[name] += state["sums"][name]
                total.counts[name] += state["counts"][name]
                total.histograms[name] = total.histograms[name] + state["histograms"][name]
                total.position_sums[name] = total.position_sums[name] + state["position_sums"][name]
                total.position_counts[name] = total.position_counts[name] + state["position_counts"][name]
                total.sequence_means[name] = total.sequence_means[name] + list(state["sequence_means"][name])
                total.minimum[name] = min(total.minimum[name], state["minimum"][name])
                total.maximum[name] = max(total.maximum[name], state["maximum"][name])
            total.completion_tokens += state["completion_tokens"]
            total.aligned_tokens += state["aligned_tokens"]
        return total

    def mean(self, name: str) -> float | None:
        return self.sums[name] / self.counts[name] if self.counts[name] else None

    def summary(self, name: str) -> dict[str, Any]:
        """Mean, token count, min/max, quantiles (from the histogram, to one bin), the histogram, the mean per relative
        position bin, and the quantiles of the per-completion means."""
        counts, edges = self.histograms[name], HISTOGRAM_EDGES[name]
        cumulative = np.cumsum(counts)
        quantiles = {}
        for q in QUANTILES:
            if not cumulative.size or cumulative[-1] == 0:
                quantiles[str(q)] = None
                continue
            b = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
            # the bin's centre; a binary statistic's two bins stand for 0 and 1
            quantiles[str(q)] = float(b) if name in BINARY_METRICS else float((edges[b] + edges[b + 1]) / 2)
        by_position = [float(s / c) if c else None
                       for s, c in zip(self.position_sums[name], self.position_counts[name], strict=True)]
        sequences = np.asarray(self.sequence_means[name], dtype=np.float64)
        return {
            "mean": self.mean(name),
            "tokens": int(self.counts[name]),
            "min": self.minimum[name] if self.counts[name] else None,
            "max": self.maximum[name] if self.counts[name] else None,
            "quantiles": quantiles,
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
            "by_position": by_position,
            "sequence_quantiles": {str(q): float(np.quantile(sequences, q)) for q in QUANTILES} if sequences.size
            else {},
        }

    @property
    def aligned_ratio(self) -> float | None:
        return self.aligned_tokens / self.completion_tokens if self.completion_tokens else None


# ------------------------------------------------------------------ prefixes


def prefix_lengths(completion_ids: torch.Tensor, completion_mask: torch.Tensor, eos_ids, fraction: float) -> list[int]:
    """Tokens kept of each rollout when it is cut after `fraction` of its tokens, end of turn excluded (as
    `benchmarks/teacher_on_prefixes.py` cuts them)."""
    lengths = []
    eos = set(eos_ids)
    for ids, n in zip(completion_ids.tolist(), completion_mask.sum(-1).tolist(), strict=True):
        body = [token for token in ids[: int(n)] if token not in eos]
        lengths.append(int(len(body) * fraction))
    return lengths


def back_to_teacher_token_starts(cuts: list[int], teacher_starts: torch.Tensor) -> list[int]:
    """Each cut moved back to the nearest student position where a teacher token starts (`teacher_starts (B, T)`: the
    alignment's sync points), 0 when there is none: there the prefix's text ends where the teacher's own tokens end,
    as it does where continuation targets are predicted (docs/method.md)."""
    moved = []
    for cut, starts in zip(cuts, teacher_starts.tolist(), strict=True):
        t = min(cut, len(starts) - 1)
        while t > 0 and not starts[t]:
            t -= 1
        moved.append(max(t, 0))
    return moved


# ------------------------------------------------------------------ the verdict


@dataclass(frozen=True)
class Thresholds:
    """
    Where the verdict draws its lines, calibrated on the benchmark's regimes (docs/benchmarks/methods.md), measured by
    this report on the same models (200 prompts x 8 rollouts, temperature 0.7; docs/gap_report.md has the table):

    | regime | reverse_kl | mismatch | guidance_loss | negative_feedback | prefix margin | what won |
    |---|---|---|---|---|---|---|
    | small_gap | 1.04 | 0.155 | 0.27 | 0.12 | +11 points | TGPO, every seed |
    | large_gap | 4.76 | 0.411 | 3.04 | 0.34 | +25 points | TGPO on the mean, within the seed spread |
    | ablation student | 5.05 | 0.449 | 5.20 | 0.37 | +14 points | GRPO; every guided method collapsed |
    | cross_tokenizer, 'sync' | 0.76 | 0.126 | 0.25 | 0.08 | -1 point (64 prompts); +3.5 (200 x 2) | OPD; TGPO collapsed to 0% |
    | cross_tokenizer, 'continuation' | 0.76 | 0.155 | 0.31 | 0.08 | +2.1 (64 prompts); +6.4 (200 x 2) | TGPO 28.3%, OPD 16.0% |

    The two cross-tokenizer rows are one pair under each `cross_tokenizer_targets`; their prefix margins are measured
    where each setting's targets come from (`gap_verdict`).
    """

    # A large gap: mismatch or reverse KL past the midpoint of the small and the large regime
    large_gap_mismatch: float = 0.30
    large_gap_reverse_kl: float = 3.0
    # TGPO's target is informative when the teacher finishes the student's prefixes better than the student itself, on
    # average over the cuts, by at least this (small gap +11, large gap +25, the ablation +14 and the cross-tokenizer
    # teacher under 'continuation', +6.4 over 400 prefixes, pass; the first build, teacher 0%, and the cross-tokenizer
    # teacher under 'sync', +3.5 over 400 prefixes, where TGPO lost, fail it; over 64 prefixes the last two are +2.1 and
    # -1: the line is within the sampling noise of small reports)
    informative_margin: float = 0.05
    # TGPO's target is reachable when its cross-entropy at step 0 is at most this many nats per token: between the large
    # gap's 3.04 (trained) and the ablation's 5.2 (collapsed at every coefficient tried)
    reachable_guidance_loss: float = 4.0
    # Reverse-KL feedback is mostly uninformative when at least this share of the sampled tokens get an RKL advantage
    # below -NEGATIVE_FEEDBACK_NATS, in a large gap (small gap 0.12; large gap and ablation 0.34-0.37)
    negative_feedback_share: float = 0.25


THRESHOLDS = Thresholds()


def _mean_margin(teacher: dict, student: dict) -> float | None:
    keys = [key for key in teacher if teacher[key] is not None and student.get(key) is not None]
    if not keys:
        return None
    return sum(teacher[key] - student[key] for key in keys) / len(keys)


def gap_verdict(stats: dict[str, Any], guidance_coef: float, thresholds: Thresholds = THRESHOLDS,
                cross_tokenizer_targets: str | None = None) -> dict[str, Any]:
    """
    A verdict from the report's numbers: `stats` holds the means `reverse_kl`, `mismatch_ratio`, `guidance_loss`,
    `negative_feedback` (share of tokens with `r_t > NEGATIVE_FEEDBACK_NATS`), optionally `off_support_ratio` and
    `aligned_ratio`, and the prefix accuracies `teacher_prefix_accuracy` / `student_prefix_accuracy` (`{cut:
    accuracy}`). `guidance_coef` is the run's `lambda_0`, the suggested starting value when TGPO fits.
    `cross_tokenizer_targets` is the run's rule for a teacher of another tokenizer (`None`: a shared vocabulary). It
    says what the prefix accuracies measured: under `"sync"`, prefixes cut after any student token (the test that
    predicted TGPO's collapse under `"sync"` on the benchmark's cross-tokenizer pair); under `"continuation"`, prefixes
    cut where a teacher token starts, where the teacher predicts the targets inside its tokens. The thresholds are the
    same; under `"sync"` the suggestion points to `"continuation"`, which won on that pair where `"sync"` collapsed.
    Returns the classification, the suggestion and a paragraph in plain words (`text`).
    """
    t = thresholds
    rkl, mismatch, loss = stats.get("reverse_kl"), stats.get("mismatch_ratio"), stats.get("guidance_loss")
    negative = stats.get("negative_feedback") or 0.0
    large = bool((mismatch is not None and mismatch >= t.large_gap_mismatch)
                 or (rkl is not None and rkl >= t.large_gap_reverse_kl))
    margin = _mean_margin(stats.get("teacher_prefix_accuracy") or {}, stats.get("student_prefix_accuracy") or {})
    informative = None if margin is None else bool(margin >= t.informative_margin)
    reachable = bool(loss is not None and loss <= t.reachable_guidance_loss)
    negative_feedback = bool(large and negative >= t.negative_feedback_share)
    rkl_collapse = negative_feedback and not reachable

    lines = [(f"Gap: {'large' if large else 'small'} (mismatch ratio {_fmt(mismatch)}, reverse KL {_fmt(rkl)} nats per "
             f"token; large from {t.large_gap_mismatch:g} or {t.large_gap_reverse_kl:g} nats).")]
    if cross_tokenizer_targets is not None:
        aligned = stats.get("aligned_ratio")
        lines.append(
            f"The teacher has another tokenizer (cross_tokenizer_targets={cross_tokenizer_targets}): "
            + ("n/a" if aligned is None else f"{aligned:.0%}") + " of the completion tokens get a teacher target"
            + ("; the prefix test cuts the student's rollouts where a teacher token starts, where the teacher predicts "
               "its continuation targets." if cross_tokenizer_targets == "continuation" else
               "; under 'sync' the tokens that start inside a teacher token get none."))
    off = stats.get("off_support_ratio")
    detail = (f"{negative:.0%} of the sampled tokens have log p_s - log p_T > {NEGATIVE_FEEDBACK_NATS:g}"
              + (f", {off:.0%} lie outside the teacher's top-k" if off is not None else ""))
    if rkl_collapse:
        lines.append(f"Reverse-KL distillation: likely to get uninformative negative feedback ({detail}), and with the "
                     "teacher's tokens out of the student's reach it has nowhere to move the mass: the benchmark's "
                     "ablation, where OPD and KDRL collapsed to 0%.")
    elif negative_feedback:
        lines.append(f"Reverse-KL distillation: its feedback is mostly negative on many tokens ({detail}); the student "
                     "can reach the teacher's tokens, so it may survive (the benchmark's large gap: OPD lost accuracy, "
                     "20% to 16.3%, and trailed TGPO).")
    else:
        lines.append(f"Reverse-KL distillation: not likely to get uninformative negative feedback ({detail}).")
    if informative is None:
        lines.append("TGPO's target: informativeness not measured (no prefix accuracies).")
    else:
        lines.append(
            f"TGPO's target is {'informative' if informative else 'NOT informative'}: from the student's own prefixes "
            f"the teacher finishes {_fmt_acc(stats['teacher_prefix_accuracy'])} correctly, the student "
            f"{_fmt_acc(stats['student_prefix_accuracy'])} (mean margin {100 * margin:+.1f} points; needed "
            f"{100 * t.informative_margin:+.0f}).")
    lines.append(f"TGPO's target is {'reachable' if reachable else 'NOT reachable'}: the guidance loss at step 0 is "
                 f"{_fmt(loss)} nats per token (reachable up to {t.reachable_guidance_loss:g}).")

    if reachable and informative is not False:
        guidance, coef, method = ("tgpo_topk" if large else "tgpo"), guidance_coef, "tgpo"
        advice = (f"use TGPO, guidance={guidance}, starting from guidance_coef={coef:g} (the run's lambda_0; a constant "
                  "lambda did best on the benchmark). ")
        advice += ("Under a large gap expect the student to switch to the teacher's way of writing first and to lose "
                   "some accuracy doing so; on the benchmark TGPO's variants led every baseline there, but within the "
                   "seed spread." if large else
                   "In the benchmark's small-gap regime TGPO beat every baseline on every seed. Reverse-KL distillation "
                   "(opd) is the second choice here, and the one to use without a verifiable reward.")
    elif not reachable:
        guidance, coef, method = "none", None, "sft_warmup"
        advice = ("do not start with a guided method: the student gives the teacher's tokens almost no probability, "
                  "and on the benchmark every guided method (TGPO first) collapsed from such a start, at every "
                  "coefficient tried. Do a supervised warm-up on teacher outputs first (SFT on the teacher's "
                  "completions of the training prompts) until the guidance loss is below the threshold, then run this "
                  "report again; without a warm-up, train with plain GRPO (guidance=none), which kept the most "
                  "accuracy there.")
    elif not large:  # reachable, not informative, small gap: the reverse KL is well-behaved here
        guidance, coef, method = "opd", guidance_coef, "opd"
        advice = ("do not use TGPO with this teacher: from where the student actually is, the teacher's continuations "
                  "are no better than the student's own, so its hard target can pull the wrong way (the benchmark's "
                  "cross-tokenizer regime: TGPO fell to 0%). At a small gap reverse-KL distillation is well-behaved: "
                  f"use guidance=opd (coefficient {guidance_coef:g}, the run's), which won that regime (16.0%, against "
                  "KDRL 14.2% and GRPO 3.5%).")
    else:  # reachable, not informative, large gap
        guidance, coef, method = "none", None, "grpo"
        advice = ("do not use TGPO with this teacher: from where the student actually is, the teacher's continuations "
                  "are no better than the student's own, so its target points nowhere useful (the benchmark's first "
                  "build: the teacher finished 0% of the student's prefixes, and GRPO beat TGPO and OPD). Train with "
                  "plain GRPO (guidance=none), find a teacher that can read the student's writing, or do a supervised "
                  "warm-up on teacher outputs so that the student's prefixes become the teacher's.")
    targets = cross_tokenizer_targets
    evidence = ("on the benchmark's cross-tokenizer pair TGPO collapsed under 'sync' (tgpo 0.2%, tgpo_topk 0%, "
                "tgpo_sample 2.8%) and trained under 'continuation' (tgpo 28.3%, above OPD's 16.0%; tgpo_topk 18.7%, "
                "tgpo_sample 20.3%)")
    if cross_tokenizer_targets == "continuation" and method == "tgpo":
        advice += f" With this teacher keep cross_tokenizer_targets='continuation': {evidence}."
    if cross_tokenizer_targets == "sync" and reachable:
        targets = "continuation"
        if informative is False:
            advice += (" But first run this report again with cross_tokenizer_targets='continuation' (the default): the "
                       "teacher then also gives targets inside its own tokens, and the report measures it where it "
                       f"predicts them; {evidence}, a pair this report rejects under 'sync'.")
        else:
            advice += (" With this teacher use cross_tokenizer_targets='continuation' (the default), which also gives "
                       f"targets inside the teacher's tokens: {evidence}.")
    lines.append("Suggestion: " + advice)
    return {
        "gap": "large" if large else "small",
        "rkl_uninformative_negative_feedback": negative_feedback,
        "rkl_collapse_risk": rkl_collapse,
        "tgpo_target_informative": informative,
        "tgpo_target_reachable": reachable,
        "prefix_margin": margin,
        "suggested_method": method,
        "suggested_guidance": guidance,
        "suggested_guidance_coef": coef,
        "cross_tokenizer_targets": cross_tokenizer_targets,
        "suggested_cross_tokenizer_targets": targets,
        "text": " ".join(lines),
        "thresholds": {key: getattr(t, key) for key in t.__dataclass_fields__},
    }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _fmt_acc(accuracies: dict) -> str:
    return " / ".join(f"{float(v):.0%}" for v in accuracies.values()) + " at cuts " + " / ".join(
        f"{float(k):.0%}" for k in accuracies)
