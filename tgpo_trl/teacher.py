"""The teacher: loading, the shared-vocabulary rule, and teacher-forced scoring of the student's rollouts."""

import os

import torch
from transformers import AutoProcessor, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, maybe_gather_lm_head_ctx

from .alignment import CrossTokenizer, SharedVocabulary
from .lm_head import TeacherScores, hidden_state_pass, logit_transform, score_rows


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


def find_teacher_processor(teacher: PreTrainedModel, name_or_path: str | None, revision: str | None,
                           trust_remote_code: bool):
    """The teacher's multimodal processor (one with an image processor) if one can be found next to its weights, else
    None (a text-only teacher, or a model object whose origin cannot be read)."""
    source = name_or_path or getattr(teacher, "name_or_path", None)
    if not source or (name_or_path is None and not os.path.isdir(source)):
        return None
    try:
        processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None
    return processor if getattr(processor, "image_processor", None) is not None else None


# What decides how a prompt's images become the inputs of a model: the token ids that stand for them and how many, and
# the pixels a vision tower takes. A teacher must match the student on each to read the student's image inputs.
_IMAGE_LAYOUT = {
    "model type": lambda config: config.model_type,
    "image token id": lambda config: getattr(config, "image_token_id", getattr(config, "image_token_index", None)),
    "vision image size": lambda config: getattr(getattr(config, "vision_config", None), "image_size", None),
    "vision patch size": lambda config: getattr(getattr(config, "vision_config", None), "patch_size", None),
    "image tokens per image": lambda config: getattr(config, "mm_tokens_per_image", None),
    "image grid pinpoints": lambda config: getattr(config, "image_grid_pinpoints", None),
    "vision feature selection": lambda config: getattr(config, "vision_feature_select_strategy", None),
}
# Processor attributes that set the number of image tokens or the pixels (the image processor's settings apart)
_PROCESSOR_LAYOUT = ("image_seq_length", "patch_size", "num_additional_image_tokens", "vision_feature_select_strategy",
                     "image_token")


def _image_processor_settings(processor) -> dict:
    settings = processor.image_processor.to_dict()
    return {key: value for key, value in settings.items() if key not in ("image_processor_type", "processor_class")}


def why_teacher_cannot_see_images(teacher: PreTrainedModel, teacher_processor, student, student_processor,
                                  cross_tokenizer: bool) -> str | None:
    """
    Why an in-process teacher cannot take the student's image inputs (GRPO's `pixel_values`, image token ids and the
    like), or None when it can: it shares the student's ids (not `cross_tokenizer`), has a vision tower, and lays images
    out as the student's processor does (the same model family's image tokens and vision input size; and, when the
    teacher's own processor is known, the same image processing). The reason reads after "but".
    """
    name = getattr(teacher, "name_or_path", None) or type(teacher).__name__
    if cross_tokenizer:
        return (f"the teacher ({name}) has another tokenizer: it reads each rollout re-rendered as text in its own "
                "tokens, which carry no images")
    config = teacher.config
    if getattr(config, "vision_config", None) is None:
        return f"the teacher ({name}) is a text-only model: it has no vision tower to see them with"
    student_config = getattr(student, "config", student)
    differing = [f"{key} {read(config)!r} against the student's {read(student_config)!r}"
                 for key, read in _IMAGE_LAYOUT.items() if read(config) != read(student_config)]
    if all(getattr(processor, "image_processor", None) is not None for processor in (teacher_processor,
                                                                                     student_processor)):
        differing += [f"processor {key} {getattr(teacher_processor, key, None)!r} against the student's "
                      f"{getattr(student_processor, key, None)!r}" for key in _PROCESSOR_LAYOUT
                      if getattr(teacher_processor, key, None) != getattr(student_processor, key, None)]
        teacher_settings, student_settings = map(_image_processor_settings, (teacher_processor, student_processor))
        differing += [f"image processor {key} {teacher_settings.get(key)!r} against the student's "
                      f"{student_settings.get(key)!r}" for key in sorted(set(teacher_settings) | set(student_settings))
                      if teacher_settings.get(key) != student_settings.get(key)]
    if differing:
        return (f"the teacher ({name}) lays images out otherwise than the student's processor ({'; '.join(differing[:4])}"
                f"{'; ...' if len(differing) > 4 else ''}), so it cannot read the student's image inputs")
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


class Deferred:
    """Scores computed when they are collected: the in-process teacher's forward runs at `result()`, where the trainer
    collects a served teacher's answers, so both places the teacher can run look the same to the trainer."""

    def __init__(self, compute):
        self._compute = compute

    def result(self) -> TeacherScores:
        return self._compute()


def chunked_forward(model, input_ids, attention_mask, logits_to_keep, batch_size, **image_inputs):
    """
    The no-grad forwards of a batch in chunks of `batch_size` rows, called as `GRPOTrainer._get_per_token_logps_and_
    entropies` calls them (`model(input_ids, attention_mask, labels, fused_lm_head=True)`, the last `logits_to_keep`
    positions scored), for text batches scored outside a trainer. A trainer passes its own method, which also splits
    a batch's image inputs between the chunks.
    """
    if image_inputs:
        raise ValueError(
            f"Image inputs ({', '.join(image_inputs)}) are split between chunks by GRPO's own forward: pass "
            "`forward=trainer._get_per_token_logps_and_entropies`."
        )
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)


@torch.no_grad()
def score_completions(
    teacher,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    vocab_size: int,
    batch_size: int,
    top_k: int = 0,
    sample: bool = False,
    forward=chunked_forward,
    image_inputs: dict | None = None,
) -> TeacherScores:
    """
    Teacher-force `teacher` on `prompt + completion` and score every completion position over its first `vocab_size`
    ids (the scored ids: `teacher_id_mapping`). The forwards are `forward`'s, in its chunks of `batch_size` rows, with
    the batch's `image_inputs` (the student's own, split as GRPO splits them: `forward` is then the trainer's
    `_get_per_token_logps_and_entropies`). Returns `(B, T)` / `(B, T, K)` scores aligned with `completion_ids`;
    masked positions hold zeros and `valid=False`.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    num_completion = completion_ids.size(1)
    logit_scale, softcap = logit_transform(getattr(teacher, "module", teacher).config)
    chunks = []

    def score_chunk(hidden, labels, lm_head):
        mask = labels != -100
        with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):
            scores = score_rows(hidden[mask], lm_head.weight, lm_head.bias, labels[mask], vocab_size, logit_scale,
                                softcap, top_k=top_k, sample=sample)
        chunks.append(_unflatten(mask, scores, num_completion))

    with hidden_state_pass(teacher, score_chunk):
        forward(teacher, input_ids, attention_mask, num_completion, batch_size=batch_size, **(image_inputs or {}))
    fields = [key for key, value in vars(chunks[0]).items() if value is not None]
    return TeacherScores(**{key: torch.cat([getattr(chunk, key) for chunk in chunks]) for key in fields})


def _unflatten(mask: torch.Tensor, scores: TeacherScores, num_completion: int) -> TeacherScores:
    """Scatter the scores of the masked positions back to `(B, T, ...)` and keep the completion's `T` positions."""
    def place(values):
        full = values.new_zeros(*mask.shape, *values.shape[1:])
        full[mask] = values
        return full[:, -num_completion:]

    return TeacherScores(**{key: place(value) for key, value in vars(scores).items() if value is not None})
