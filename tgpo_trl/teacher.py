"""The teacher: loading, the shared-vocabulary rule, and teacher-forced scoring of the student's rollouts."""

import functools
import os
from dataclasses import dataclass
from typing import Any

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


# ------------------------------------------------------------------ several teachers: each row routed to its own


@dataclass
class TeacherSpec:
    """One teacher as configured, before anything is loaded: its id in the routing column (None: the run's only
    teacher), the path or Hub id of its weights or tokenizer, a model object, the server URLs that serve it, and its
    revision, `from_pretrained` keyword arguments and tokenizer."""

    name: str | None
    path: str | None = None
    model: PreTrainedModel | None = None
    urls: list[str] | None = None
    revision: str | None = None
    init_kwargs: dict | None = None
    processing_class: Any = None
    server: Any = None  # a served teacher's probed connection, once the trainer has made it

    @property
    def label(self) -> str:
        return "the teacher" if self.name is None else f"teacher {self.name!r}"


def _per_teacher(value, names: list[str], field: str, values_are_dicts: bool = False) -> dict:
    """A setting that is one value for every teacher, or a mapping from teacher id to value: as a mapping. Where the
    value itself is a dict (`values_are_dicts`: keyword arguments), only one keyed by teacher ids is per teacher."""
    if isinstance(value, dict) and (not values_are_dicts or _is_per_teacher(value, names)):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"`{field}` names teachers {unknown} that are not among the run's teachers {names}.")
        return dict(value)
    return dict.fromkeys(names, value)


def _is_per_teacher(value: dict, names: list[str]) -> bool:
    """Whether `teacher_model_init_kwargs` is per teacher: its keys are teacher ids and its values keyword mappings."""
    return len(names) > 1 and bool(value) and set(value) <= set(names) and all(
        isinstance(item, dict) or item is None for item in value.values())


def resolve_teachers(paths, models, urls, revisions, init_kwargs, processing_classes) -> list[TeacherSpec]:
    """
    The run's teachers from the configuration (`teacher_model_name_or_path`, `teacher_server_url`,
    `teacher_model_revision`, `teacher_model_init_kwargs`) and the trainer's `teacher_model` and
    `teacher_processing_class`. Each may be one value (one teacher, no id: today's single teacher) or a mapping from
    teacher id to value; the ids are the keys of the mappings given for paths, models and servers. A teacher is served
    where its id has server URLs (its path then names the served model), else in process (a model object, or loaded from
    its path). Returns `[]` when no teacher is configured.
    """
    where = {"teacher_model_name_or_path": paths, "teacher_model": models, "teacher_server_url": urls}
    mappings = {field: value for field, value in where.items() if isinstance(value, dict)}
    if not mappings:
        if paths is None and models is None and urls is None:
            return []
        return [TeacherSpec(None, paths, models, urls, revisions, init_kwargs, processing_classes)]
    plain = [field for field, value in where.items() if value is not None and not isinstance(value, dict)]
    if plain:
        raise ValueError(
            f"{', '.join(f'`{field}`' for field in mappings)} maps teacher ids to teachers, but {', '.join(f'`{field}`' for field in plain)} "
            "is a single value: with several teachers give every one of them as a mapping from teacher id."
        )
    names = list(dict.fromkeys(name for mapping in mappings.values() for name in mapping))
    for field, mapping in mappings.items():
        bad = [name for name in mapping if not isinstance(name, str) or not name or "/" in name]
        if bad:
            raise ValueError(f"`{field}` has teacher ids {bad}: an id is a non-empty string without '/' (it names "
                             "metrics such as `gap/reverse_kl/<id>`).")
    revisions = _per_teacher(revisions, names, "teacher_model_revision")
    init_kwargs = _per_teacher(init_kwargs, names, "teacher_model_init_kwargs", values_are_dicts=True)
    processing_classes = _per_teacher(processing_classes, names, "teacher_processing_class")
    specs = []
    for name in names:
        spec = TeacherSpec(name, (paths or {}).get(name), (models or {}).get(name), (urls or {}).get(name),
                           revisions.get(name), init_kwargs.get(name), processing_classes.get(name))
        if isinstance(spec.model, str):  # `teacher_model={"id": "path"}`
            spec.path, spec.model = spec.model, None
        if spec.urls is None and spec.model is None and spec.path is None:
            raise ValueError(f"Teacher {name!r} has neither a model (`teacher_model_name_or_path` or `teacher_model`) "
                             "nor a server (`teacher_server_url`).")
        specs.append(spec)
    return specs


@dataclass
class Teacher:
    """One teacher of a run: where it runs (`model`, in process; or `server`) and how its ids map (`scoring`, over its
    first `vocab_size` ids); `name` is its id in the routing column (None: the run's only teacher), `source` where it
    came from (for the model card), `image_refusal` why it cannot see the student's images (None: it can)."""

    name: str | None
    scoring: Any
    vocab_size: int
    source: Any = None
    model: PreTrainedModel | None = None
    server: Any = None
    image_refusal: str | None = None
    # its forward is a collective (in process, partitioned by ZeRO-3 over several processes): every process runs it
    # the same number of times, whatever rows it holds
    collective: bool = False


def _unknown_teacher(where: str, value, names: list[str], column: str) -> ValueError:
    return ValueError(
        f"{where} has `{column}` = {value!r}, which is not one of the run's teachers {names}: every row names its "
        f"teacher in the `{column}` column (`teacher_id_column`)."
    )


def check_teacher_ids(dataset, name: str, names: list[str], column: str) -> None:
    """With several teachers, a dataset whose rows can be read up front must name a known teacher in every row (an
    iterable dataset is checked at each batch instead)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, item in dataset.items():
            check_teacher_ids(item, f"{name}[{key!r}]", names, column)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None or not hasattr(dataset, "__len__"):
        return
    if column not in columns:
        raise ValueError(
            f"`{name}` has no `{column}` column (its columns: {columns}), but the run has several teachers {names}: "
            f"each row names its teacher there (`teacher_id_column` names the column)."
        )
    known = set(names)
    for index, value in enumerate(dataset[column]):
        if value not in known:
            raise _unknown_teacher(f"Row {index} of `{name}`", value, names, column)


class Teachers:
    """
    The run's teachers, and which one scores each row: with one, every row (no id needed, today's single teacher); with
    several, the one named by the row's `column` (a dataset column). `start` is the trainer's one scoring call: it sends
    each teacher its own rows (where it runs: `submit(teacher, ...)`), maps each teacher's ids its own way, and gives
    the scores back in the batch's row order, so the guidance never sees how many teachers there are.
    """

    def __init__(self, teachers: list[Teacher], column: str = "teacher_id"):
        self.teachers, self.column = teachers, column
        self.names = [teacher.name for teacher in teachers]

    def __len__(self) -> int:
        return len(self.teachers)

    def __iter__(self):
        return iter(self.teachers)

    @property
    def routed(self) -> bool:
        return len(self.teachers) > 1

    @property
    def served(self) -> bool:
        """Whether any teacher is served."""
        return any(teacher.server is not None for teacher in self.teachers)

    @property
    def cross_tokenizer(self) -> bool:
        """Whether any teacher maps ids across tokenizers (it then needs the prompts themselves)."""
        return any(teacher.scoring.cross_tokenizer for teacher in self.teachers)

    def route(self, examples: list[dict]) -> torch.Tensor | None:
        """Each example's teacher, as an index into `names`; None with one teacher (it scores every row)."""
        if not self.routed:
            return None
        index = {name: position for position, name in enumerate(self.names)}
        route = []
        for example in examples:
            if self.column not in example:
                raise ValueError(
                    f"A row of this batch has no `{self.column}`, but the run has several teachers {self.names}: each "
                    f"row names its teacher in the `{self.column}` column (`teacher_id_column`)."
                )
            if example[self.column] not in index:
                raise _unknown_teacher("A row of this batch", example[self.column], self.names, self.column)
            route.append(index[example[self.column]])
        return torch.tensor(route, dtype=torch.long)

    def start(self, submit, prompts, prompt_ids, prompt_mask, completion_ids, completion_mask, route=None):
        """Send each teacher its rows (`route`: the rows' teachers, None with one teacher) and return the scores in
        flight, in the batch's row order."""
        if route is None:
            teacher = self.teachers[0]
            return teacher.scoring.start(functools.partial(submit, teacher), prompts, prompt_ids, prompt_mask,
                                         completion_ids, completion_mask)
        parts = []
        for position, teacher in enumerate(self.teachers):
            rows = torch.nonzero(route == position).flatten()
            scored = rows
            if rows.numel() == 0:
                if not teacher.collective:
                    continue
                # a partitioned teacher runs its forward on every process: here on a stand-in row it scores nothing of
                scored = route.new_zeros(1)
            taken = [tensor[scored.to(tensor.device)] for tensor in (prompt_ids, prompt_mask, completion_ids,
                                                                      completion_mask)]
            if rows.numel() == 0:
                taken[3] = torch.zeros_like(taken[3])
            own_prompts = None if prompts is None else [prompts[row] for row in scored.tolist()]
            parts.append((rows, teacher.scoring.start(functools.partial(submit, teacher), own_prompts, *taken)))
        return Routed(parts, route.numel())


class Routed:
    """Several teachers' scores of one batch in flight, each of its own rows; `result()` puts them in row order."""

    def __init__(self, parts: list, num_rows: int):
        self.parts, self.num_rows = parts, num_rows
        self.pending = _RoutedPending([in_flight.pending for _, in_flight in parts])

    def result(self) -> TeacherScores:
        collected = [(rows, in_flight.result()) for rows, in_flight in self.parts]  # in teacher order, on every process
        collected = [(rows, scores) for rows, scores in collected if rows.numel()]
        fields = {}
        for key in vars(collected[0][1]):
            values = [getattr(scores, key) for _, scores in collected]
            if all(value is None for value in values):
                continue
            if key == "topk_valid":  # absent for a teacher whose every top-k slot is a student id
                values = [torch.ones_like(scores.topk_ids, dtype=torch.bool) if value is None else value
                          for value, (_, scores) in zip(values, collected, strict=True)]
            elif any(value is None for value in values):
                raise RuntimeError(f"Teachers returned `{key}` for some rows and not for others.")
            first = values[0]
            merged = first.new_zeros(self.num_rows, *first.shape[1:])
            for (rows, _), value in zip(collected, values, strict=True):
                merged[rows.to(merged.device)] = value.to(merged.device)
            fields[key] = merged
        return TeacherScores(**fields)


class _RoutedPending:
    """The timings and cancellation of a routed batch's served parts (an in-process teacher's forward has none)."""

    def __init__(self, parts: list):
        self.parts = [part for part in parts if hasattr(part, "cancel")]

    @property
    def wait_time(self) -> float:
        return sum(part.wait_time or 0.0 for part in self.parts)

    @property
    def submitted(self) -> float | None:
        return min((part.submitted for part in self.parts), default=None)

    @property
    def answered(self) -> float | None:
        return max((part.answered for part in self.parts), default=None)

    def cancel(self) -> None:
        for part in self.parts:
            part.cancel()


def take_rows(scores: TeacherScores, count: int) -> TeacherScores:
    """The first `count` rows of `scores`."""
    return TeacherScores(**{key: value[:count] for key, value in vars(scores).items() if value is not None})
