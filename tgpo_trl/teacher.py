"""The teacher: loading, the shared-vocabulary rule, and teacher-forced scoring of the student's rollouts."""

import os
from contextlib import nullcontext

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model

from .alignment import CrossTokenizer, SharedVocabulary
from .lm_head import TeacherScores, install_teacher_scoring


logger = logging.get_logger(__name__)


def load_teacher(
    name_or_path: str, revision: str | None, init_kwargs: dict | None, distributed: bool, trust_remote_code: bool
) -> PreTrainedModel:
    """Load the teacher like TRL loads a policy (`create_model_from_path`), with an error that names the field."""
    kwargs = dict(init_kwargs or {})
    if revision is not None:
        kwargs.setdefault("revision", revision)
    if distributed:  # device_map="auto" fails under DDP and DeepSpeed
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    try:
        return create_model_from_path(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load the teacher from `teacher_model_name_or_path={name_or_path!r}`"
            f"{f' (revision {revision!r})' if revision else ''}: {error}"
        ) from error


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Frozen, eval mode, dropout off: the teacher is a fixed function of the student's rollout."""
    model.requires_grad_(False)
    model.eval()
    disable_dropout_in_model(model)
    return model


def find_teacher_tokenizer(
    teacher: PreTrainedModel, name_or_path: str | None, revision: str | None, trust_remote_code: bool
) -> PreTrainedTokenizerBase | None:
    """The teacher's tokenizer if one can be found next to its weights, else None (the mapping is then unverifiable)."""
    source = name_or_path or getattr(teacher, "name_or_path", None)
    if not source:
        return None
    if name_or_path is None and not os.path.isdir(source):
        return None  # a model object whose origin we cannot inspect offline
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def emittable_ids(student_tokenizer: PreTrainedTokenizerBase, student) -> tuple[int, int, int]:
    """`(known, tokenizer ids, output rows)` of a student (a model, or its config). Its sampler (HF's or vLLM's) can
    emit every row of its output layer, padding rows beyond its tokenizer included; `known` = `min(tokenizer ids,
    output rows)` of them are tokens its tokenizer knows."""
    tokenizer_ids = max(student_tokenizer.get_vocab().values()) + 1
    student_rows = getattr(student, "config", student).get_text_config().vocab_size
    return min(tokenizer_ids, student_rows), tokenizer_ids, student_rows


def differing_tokens(
    student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase, known: int
) -> list[str]:
    """The student tokens, among the `known` ids it can emit, that have another id (or none) in the teacher's
    tokenizer."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    return [token for token, index in student_tokenizer.get_vocab().items()
            if index < known and teacher_vocab.get(token) != index]


def shared_vocab_size(
    student_tokenizer: PreTrainedTokenizerBase,
    student,
    teacher: PreTrainedModel | None,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
) -> int:
    """
    Check that the teacher can score, by id, every token the student can emit, and return how many leading ids it
    scores.

    The student's sampler can emit every row of its output layer. Those its tokenizer knows (`min(tokenizer ids,
    student output rows)`) must stand for the same token in the teacher's tokenizer, and the teacher must have a logit
    row for each. Loading can make tokenizer and rows differ either way: a padded embedding has rows beyond the
    tokenizer (Qwen2.5-3B: 151,936 rows for 151,665 ids), and under transformers 5 a tokenizer loaded next to a `qwen2`
    config may gain an `<|endoftext|>` beyond the embedding's rows, which the student cannot emit. The teacher scores
    the ids both models have rows for, `min(student rows, teacher rows)`: a padding row the student can sample (vLLM and
    HF both sample every row) is scored wherever the teacher has that row too, and the teacher's distribution is over
    exactly those ids (its extra rows, which the student can never emit, are left out and never become targets). A
    served teacher (`teacher=None`) has no rows to read here: all the student's rows are sent, and its start-up probe
    sends the highest.
    """
    known, tokenizer_ids, student_rows = emittable_ids(student_tokenizer, student)
    if teacher_tokenizer is not None:
        differing = differing_tokens(student_tokenizer, teacher_tokenizer, known)
        if differing:
            student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
            examples = ", ".join(
                f"{token!r}: student id {student_vocab[token]}, teacher id {teacher_vocab.get(token)}"
                for token in sorted(differing, key=student_vocab.get)[:3]
            )
            raise ValueError(
                f"The teacher's tokenizer maps tokens differently from the student's: {len(differing)} of the "
                f"{known} ids the student can emit stand for another token (or none) in the teacher ({examples}). "
                "TGPO compares token ids, so the teacher must use the student's tokenizer (a teacher with extra tokens "
                "or a padded embedding is fine)."
            )
    elif teacher is not None:  # a served teacher's tokenization is checked by its probe
        logger.warning(
            "No tokenizer was found for the teacher, so TGPO cannot check that it maps tokens like the student's. Pass "
            "`teacher_processing_class` to the trainer to have it checked."
        )
    if teacher is None:
        return student_rows
    teacher_rows = teacher.config.get_text_config().vocab_size
    if teacher_rows < known:
        raise ValueError(
            f"The teacher's output layer has {teacher_rows} rows, but the student can emit {known} ids its tokenizer "
            f"knows (its tokenizer has {tokenizer_ids} ids, its output layer {student_rows} rows): the teacher cannot "
            f"score ids {teacher_rows}..{known - 1}."
        )
    return min(student_rows, teacher_rows)


def teacher_id_mapping(
    student_tokenizer: PreTrainedTokenizerBase,
    student,
    teacher: PreTrainedModel | None,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
    targets: str = "sync",
):
    """
    How the teacher's positions and ids map to the student's (`targets`: where a position gets a target across
    tokenizers, `TGPOConfig.cross_tokenizer_targets`), and how many of the teacher's leading ids it scores:
    `(SharedVocabulary(), shared size)` when the tokenizers map ids alike (or the teacher's tokenizer is unknown), else
    `(CrossTokenizer(...), the teacher tokenizer's ids)`, with a one-time log that cross-tokenizer scoring is on.
    `teacher` is None for a served teacher, whose rows are not known here.
    """
    known, _, student_rows = emittable_ids(student_tokenizer, student)
    if teacher_tokenizer is None or not differing_tokens(student_tokenizer, teacher_tokenizer, known):
        return SharedVocabulary(), shared_vocab_size(student_tokenizer, student, teacher, teacher_tokenizer)
    mapping = CrossTokenizer(student_tokenizer, teacher_tokenizer, student_rows, targets)
    teacher_ids = max(teacher_tokenizer.get_vocab().values()) + 1
    teacher_rows = teacher.config.get_text_config().vocab_size if teacher is not None else teacher_ids
    logger.warning(
        "The teacher's tokenizer maps ids differently from the student's: cross-tokenizer scoring is on (the teacher "
        "reads each rollout re-rendered in its own chat template and tokens, aligned on the completion's bytes; "
        f"{mapping.alignment.vocabulary.exact_ratio:.1%} of its tokens have a student token with the same bytes). "
        "`gap/aligned_ratio` logs the share of completion tokens that get a teacher target."
    )
    return mapping, min(teacher_rows, teacher_ids)


def prepare_teacher(teacher: PreTrainedModel, vocab_size: int) -> PreTrainedModel:
    """Freeze the teacher and give it its chunked scoring forward (before any accelerator wrapping)."""
    freeze(teacher)
    install_teacher_scoring(teacher, vocab_size)
    return teacher


class Deferred:
    """Scores computed when they are collected: the in-process teacher's forward runs at `result()`, where the trainer
    collects a served teacher's answers, so both places the teacher can run look the same to the trainer."""

    def __init__(self, compute):
        self._compute = compute

    def result(self) -> TeacherScores:
        return self._compute()


@torch.no_grad()
def score_completions(
    teacher,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    batch_size: int,
    top_k: int = 0,
    sample: bool = False,
    autocast=None,
) -> TeacherScores:
    """
    Teacher-force `teacher` on `prompt + completion` and score every completion position: one forward per
    `batch_size` rows. Returns `(B, T)` / `(B, T, K)` scores aligned with `completion_ids`; masked positions hold
    zeros and `valid=False`.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : prompt_ids.size(1)] = -100
    num_completion = completion_ids.size(1)
    request = {"top_k": top_k, "sample": sample}
    chunks = []
    for start in range(0, input_ids.size(0), batch_size):
        rows = slice(start, start + batch_size)
        with autocast() if autocast is not None else nullcontext():
            mask, scores = teacher(
                input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows],
                teacher_scoring=request,
            )
        chunks.append(_unflatten(mask, scores, num_completion))
    fields = [key for key, value in vars(chunks[0]).items() if value is not None]
    return TeacherScores(**{key: torch.cat([getattr(chunk, key) for chunk in chunks]) for key in fields})


def _unflatten(mask: torch.Tensor, scores: TeacherScores, num_completion: int) -> TeacherScores:
    """Scatter the scores of the masked positions back to `(B, T, ...)` and keep the completion's `T` positions."""
    def place(values):
        full = values.new_zeros(*mask.shape, *values.shape[1:])
        full[mask] = values
        return full[:, -num_completion:]

    return TeacherScores(**{key: place(value) for key, value in vars(scores).items() if value is not None})
