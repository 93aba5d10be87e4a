import contextlib
import functools
import inspect
import os
import sys
import textwrap
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models.utils import prepare_deepspeed
from trl.trainer.utils import (
    get_comet_experiment_url,
    get_config_model_id,
    get_trackio_space_url,
    is_async_callable,
    pad,
    split_pixel_values_by_grid,
    unsplit_pixel_values_by_grid,
)

from . import guidance as G
from .config import TGPOConfig
from .lm_head import StudentLogProbs
from .model_card import TeacherSource, generate_tgpo_model_card
from .served import ScoresBySlice, ServedTeacher, TeacherServerError
from .teacher import (
    Deferred,
    Teacher,
    Teachers,
    TeacherSpec,
    check_teacher_ids,
    find_teacher_processor,
    find_teacher_tokenizer,
    freeze,
    load_teacher,
    resolve_teachers,
    score_completions,
    take_rows,
    teacher_id_mapping,
    why_teacher_cannot_see_images,
)


logger = logging.get_logger(__name__)

# What each guidance mode needs from the teacher and gathers from the student, besides `log p(y_t)`
_EXTRA_IDS = {"tgpo": "teacher_argmax", "tgpo_sample": "teacher_sample", "tgpo_topk": "teacher_topk_ids",
              "rkl_topk": "teacher_topk_ids"}
# The modes whose term is a target from the teacher's distribution; the others read `log p_T(y_t)`
_TARGET_MODES = tuple(_EXTRA_IDS)
# The modes whose term is a function of the sampled token `y_t` (an estimate over the sampler's tokens): vLLM's
# importance-sampling ratio weights them per token, as TRL weights the policy term (and with it `opd`'s advantage). The
# target modes' terms are functions of the prefix alone, which the ratio of `y_t` does not correct.
_SAMPLED_TOKEN_MODES = ("rkl_k3", "kdrl")


# The entries of GRPO's batch that carry its prompts' images into a forward: the arguments by which
# `GRPOTrainer._get_per_token_logps_and_entropies` splits them between chunks
_IMAGE_INPUTS = tuple(
    name for name in inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    if name not in ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                    "compute_aux_loss")
)
# Why a served teacher cannot take images (read after "but")
_SERVED_SEES_NO_IMAGES = (
    "the teacher is served (`teacher_server_url`), and vLLM's `/v1/completions` scores token ids: it carries no "
    "images, so the teacher would score the image prompts without them"
)
# Why several teachers cannot take images (read after "but")
_ROUTED_SEES_NO_IMAGES = (
    "the run has several teachers, and routing splits a batch's rows between them while its image inputs are not "
    "split by row"
)


def _images_refused(where: str, reason: str) -> ValueError:
    """The error for images a teacher cannot see: where they are, why, and what to do."""
    return ValueError(
        f"{where}, but {reason}. Give the run an in-process vision-language teacher that shares the student's "
        "processor, or set `teacher_without_images=True` to have the teacher score the prompts without their images "
        "(their text and image placeholder tokens only: to distil a text model's way of reasoning)."
    )


def _dataset_images(dataset) -> str | None:
    """The column that gives a dataset's rows images (GRPO reads `image` or `images`), or None; None too for a dataset
    whose columns are unknown (an iterable one), which is then checked at its first batch."""
    if isinstance(dataset, dict):  # several evaluation datasets, or a DatasetDict
        return next(filter(None, map(_dataset_images, dataset.values())), None)
    columns = getattr(dataset, "column_names", None)
    return next((name for name in ("images", "image") if columns and name in columns), None)


def _take_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The rows `rows` of a generation batch, every per-row entry in that order: GRPO's shuffle-and-split
    (`shuffle_sequence_dict`, `split_tensor_dict`) as one slice's share of a permutation drawn beforehand."""
    def take(value):
        if value is None or isinstance(value, torch.Tensor) and value.ndim == 0:
            return value
        if isinstance(value, torch.Tensor):
            return value[rows.to(value.device)]
        return [value[index] for index in rows.tolist()]

    return {key: take(value) for key, value in batch.items()}


def _teacher_request(guidance: str, top_k: int) -> dict[str, Any]:
    """What the teacher keeps per position for `guidance`, besides `log p_T(y_t)` and its argmax."""
    return {"top_k": top_k if guidance in ("tgpo_topk", "rkl_topk") else 0, "sample": guidance == "tgpo_sample"}


def _check_dataset(dataset, name: str, needs_prompt: bool) -> None:
    """A dataset GRPO would only trip over at its first generation (no `prompt`), or train nothing on (empty)."""
    if not isinstance(dataset, (Dataset, IterableDataset)):
        return  # None, or a type GRPO itself refuses
    columns = dataset.column_names  # None for an iterable dataset whose features are unknown
    if needs_prompt and columns is not None and "prompt" not in columns:
        raise ValueError(
            f"`{name}` has no `prompt` column (its columns: {columns}): GRPO and TGPO generate from the `prompt` "
            "column. Rename the column that holds the prompts to `prompt`."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"`{name}` is empty (0 rows): it needs at least one prompt.")


def _name_reward_errors(reward_func, name: str):
    """`reward_func`, sync or async as it was, re-raising its errors as a `RuntimeError` that names it."""
    def error(exception):
        return RuntimeError(f"Reward function {name!r} raised {type(exception).__name__}: {exception}")

    if is_async_callable(reward_func):
        @functools.wraps(reward_func)
        async def wrapper(*args, **kwargs):
            try:
                return await reward_func(*args, **kwargs)
            except Exception as exception:
                raise error(exception) from exception
    else:
        @functools.wraps(reward_func)
        def wrapper(*args, **kwargs):
            try:
                return reward_func(*args, **kwargs)
            except Exception as exception:
                raise error(exception) from exception
    return wrapper


class _AdvantagesFromLossForward(dict):
    """
    The loss inputs of an on-policy `opd` batch. Its per-token advantage needs `log p_old(y_t)`, and on policy those
    are the loss forward's own `log p_s(y_t)`, detached (the numbers GRPO itself then uses as `old_per_token_logps`).
    So `advantages` is computed when GRPO reads it, right after that forward, from the log-probs the forward gathered:
    no second student forward. Reading it before the forward has run is an error, never a silent GRPO-only advantage.
    """

    def __init__(self, inputs: dict[str, Any], request, advantages_fn):
        super().__init__(inputs)
        self._request, self._advantages_fn, self._advantages = request, advantages_fn, None

    def __getitem__(self, key):
        if key != "advantages":
            return super().__getitem__(key)
        if self._advantages is None:
            self._advantages = self._advantages_fn(self._request.label_logps().detach())
        return self._advantages

    def get(self, key, default=None):
        return self[key] if key in self else default


class TGPOTrainer(GRPOTrainer):
    """
    Trainer for Teacher-Guided Policy Optimization (TGPO), from [Teacher-Guided Policy Optimization for On-Policy
    Reasoning Distillation under Large Policy Divergence](https://huggingface.co/papers/2605.13230).

    A drop-in [`~trl.GRPOTrainer`]: same arguments, reward functions, loss types, vLLM and PEFT options, plus a teacher.
    Once per generation batch the teacher is teacher-forced on the student's own rollouts; the loss is the GRPO
    objective plus `lambda_k` times the guidance term chosen by `args.guidance` (see [`TGPOConfig`] and
    `tgpo_trl.guidance`).

    Example:

    ```python
    >>> from tgpo_trl import TGPOConfig, TGPOTrainer
    >>> from trl.rewards import accuracy_reward

    >>> trainer = TGPOTrainer(
    ...     model="Qwen/Qwen2.5-Math-1.5B",
    ...     reward_funcs=accuracy_reward,
    ...     args=TGPOConfig(output_dir="out", teacher_model_name_or_path="Qwen/Qwen2.5-Math-7B-Instruct"),
    ...     train_dataset=dataset,
    ... )
    >>> trainer.train()
    ```

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, reward_processing_classes, callbacks,
        optimizers, quantization_config, peft_config, tools, rollout_func, environment_factory:
            As in [`~trl.GRPOTrainer`]; `args` must be a [`TGPOConfig`].
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The teacher. Overrides `args.teacher_model_name_or_path`. It is frozen, put in eval mode with dropout off,
            and never handed to the optimizer. It may have another tokenizer than the student's.
        teacher_processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The teacher's tokenizer. Found next to the teacher's weights when not given. When it maps ids like the
            student's, the teacher scores the student's ids; otherwise cross-tokenizer scoring is on (`tgpo_trl.alignment`).
    """

    _tag_names = ["trl", "tgpo"]
    _name = "TGPO"
    _paper = {
        "title": "Teacher-Guided Policy Optimization for On-Policy Reasoning Distillation under Large Policy Divergence",
        "id": "2605.13230",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{tgpo2026,
                title        = {{Teacher-Guided Policy Optimization for On-Policy Reasoning Distillation under Large Policy Divergence}},
                author       = {Xinyu Liu and Bei Li and Chunyang Xiao and Jiahao Liu and Jingang Wang and JingBo Zhu and Junhao Ruan and Kechen Jiao and Qifan Wang and Runsong Zhao and Tong Xiao and Xin Chen},
                year         = 2026,
                eprint       = {arXiv:2605.13230},
            }"""),
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: TGPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        teacher_model: "str | PreTrainedModel | None" = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = TGPOConfig(f"{name.split('/')[-1]}-TGPO")
        elif not isinstance(args, TGPOConfig):
            raise TypeError(f"`args` must be a `TGPOConfig`, got `{type(args).__name__}`.")
        if teacher_model is not None and teacher_model is model:
            raise ValueError("`teacher_model` is the student model itself: pass a separate teacher.")
        # Malformed data fails here, before the teacher and the student are loaded, not at the first generation
        _check_dataset(train_dataset, "train_dataset", needs_prompt=environment_factory is None)
        for name, dataset in (eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]):
            _check_dataset(dataset, "eval_dataset" + (f"[{name!r}]" if name else ""), environment_factory is None)

        # The teachers are resolved first, so a missing or unloadable one fails before the student is built
        # a model object or mapping passed to the trainer takes precedence over the config's paths, id by id
        specs = resolve_teachers(
            teacher_model if isinstance(teacher_model, str) else args.teacher_model_name_or_path,
            teacher_model if isinstance(teacher_model, (PreTrainedModel, dict)) else None,
            args.teacher_server_url, args.teacher_model_revision, args.teacher_model_init_kwargs,
            teacher_processing_class,
        )
        if not specs and args.guidance_needs_teacher:
            raise ValueError(
                f"`guidance={args.guidance!r}` needs a teacher: set `teacher_model_name_or_path` in the config or pass "
                "`teacher_model` to the trainer (or use `guidance='none'` for plain GRPO)."
            )
        if len(specs) > 1:  # every row must name a known teacher: checked here where the rows can be read
            names = [spec.name for spec in specs]
            check_teacher_ids(train_dataset, "train_dataset", names, args.teacher_id_column)
            check_teacher_ids(eval_dataset, "eval_dataset", names, args.teacher_id_column)
        image_column = next(filter(None, map(_dataset_images, (train_dataset, eval_dataset))), None)
        images_in_data = f"The dataset's prompts have images (its `{image_column}` column)"
        if image_column is not None and not args.teacher_without_images:
            if any(spec.urls is not None for spec in specs):
                raise _images_refused(images_in_data, _SERVED_SEES_NO_IMAGES)
            if len(specs) > 1:
                raise _images_refused(images_in_data, _ROUTED_SEES_NO_IMAGES)
        distributed = args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED")
        for spec in specs:
            if spec.urls is not None:
                if spec.model is not None:
                    raise ValueError(
                        "`teacher_model` is a model object" + (f" for teacher {spec.name!r}" if spec.name else "")
                        + ", but `teacher_server_url` serves the teacher: pass one or the other (with a server, "
                        "`teacher_model_name_or_path` only names the served model)."
                    )
                if spec.init_kwargs is not None:
                    raise ValueError(
                        f"`teacher_model_init_kwargs` loads an in-process teacher, but `teacher_server_url` serves "
                        f"{spec.label}: set its dtype and the like on `vllm serve` (e.g. `--dtype bfloat16`)."
                    )
                spec.server = self._connect_teacher_server(model, processing_class, spec, args)
            elif spec.model is not None:
                spec.path = None
                if spec.init_kwargs is not None:
                    logger.warning(f"`teacher_model_init_kwargs` is ignored for {spec.label}: it was passed as a model "
                                   "object.")
            else:
                spec.model = load_teacher(spec.path, spec.revision, spec.init_kwargs, distributed,
                                          args.trust_remote_code)

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )

        self.guidance = args.guidance
        self._alignment_logged = False  # the first batch's alignment rate is logged once, across tokenizers
        self._teacher_in_flight = None  # a served teacher's scores of the batch being generated, requested in `_generate`
        self._teacher_inputs = None  # the examples of the batch being generated (a teacher of another tokenizer reads them)
        self._teacher_route = None  # which teacher scores each row of that batch (None with one teacher)
        self._defer_teacher = False  # whether the batch being generated is scored per training slice (`_prepare_inputs`)
        self._teacher_slices = None  # the buffered generation batch's served scores, by slice (`ScoresBySlice`)
        self._skipped_counts = None  # its `guidance/skipped_tokens` counts so far, over the slices collected
        self._teacher_wait = 0.0  # seconds blocked on a served teacher in this optimizer step
        self._images_withheld_logged = False  # `teacher_without_images` is logged once, at the first batch with images
        student = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self.teachers = Teachers([self._build_teacher(spec, student, image_column, images_in_data)
                                  for spec in specs], args.teacher_id_column)
        # one teacher: its parts, as attributes (None with several: `self.teachers` holds each one's)
        single = self.teachers.teachers[0] if len(self.teachers) == 1 else None
        self.teacher_model = single.model if single else None
        self.teacher_server = single.server if single else None
        self.teacher_source = single.source if single else None
        self.teacher_scoring = single.scoring if single else None
        self.teacher_vocab_size = single.vocab_size if single else None
        # why the teachers cannot see a batch's images (None: they can, or there is no teacher)
        self._image_refusal = _ROUTED_SEES_NO_IMAGES if self.teachers.routed else (
            single.image_refusal if single else None)
        if self.teachers:
            self._student_logps = StudentLogProbs(student, self.temperature, args.cast_lm_head_to_fp32)

    def _build_teacher(self, spec: TeacherSpec, student, image_column, images_in_data) -> Teacher:
        """A resolved teacher, once the student and the accelerator exist: a served one as it was probed; an
        in-process one with its tokenizer found, its id mapping checked, frozen, and prepared like GRPO's reference
        model (partitioned under ZeRO-3)."""
        args = self.args
        if spec.server is not None:
            server, (mapping, vocab_size) = spec.server
            return Teacher(spec.name, mapping, vocab_size, TeacherSource(server.model, spec.revision), server=server,
                           image_refusal=_SERVED_SEES_NO_IMAGES)
        teacher = spec.model
        source = TeacherSource.of(teacher, spec.path, spec.revision)
        tokenizer = processor = spec.processing_class
        if spec.processing_class is None:
            tokenizer = find_teacher_tokenizer(teacher, spec.path, spec.revision, args.trust_remote_code)
            processor = find_teacher_processor(teacher, spec.path, spec.revision, args.trust_remote_code)
        mapping, vocab_size = teacher_id_mapping(
            self._tokenizer, self.model, teacher, getattr(tokenizer, "tokenizer", tokenizer),
            args.cross_tokenizer_targets,
        )
        refusal = why_teacher_cannot_see_images(teacher, processor, student, self.processing_class,
                                                mapping.cross_tokenizer)
        if refusal is not None and image_column is not None and not args.teacher_without_images:
            raise _images_refused(images_in_data, refusal)
        freeze(teacher)
        if self.is_deepspeed_enabled:
            teacher = prepare_deepspeed(teacher, self.accelerator)
        else:
            teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        # partitioned: its forwards are collectives (the processes hold different mixes of the teachers' rows)
        collective = (self.is_deepspeed_enabled and self.accelerator.num_processes > 1
                      and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        return Teacher(spec.name, mapping, vocab_size, source, model=teacher, image_refusal=refusal,
                       collective=collective)

    @staticmethod
    def _connect_teacher_server(model, processing_class, spec: TeacherSpec, args):
        """
        A served teacher, probed before any model is loaded: the student's tokenizer and config (read, not the
        weights), the teacher's tokenizer when one can be found under `spec.path` (else the shared vocabulary is
        assumed, and the probe checks it against the server's own decoding), the id mapping between them, and the
        probe of every replica. Returns `(ServedTeacher, (mapping, teacher vocab size))`.
        """
        model_id = model if isinstance(model, str) else get_config_model_id(model.config)
        init_kwargs = args.model_init_kwargs or {}
        revision = init_kwargs.get("revision") if isinstance(init_kwargs, dict) else None
        tokenizer = processing_class
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
        config = model.config if not isinstance(model, str) else AutoConfig.from_pretrained(
            model_id, revision=revision, trust_remote_code=args.trust_remote_code)
        teacher_tokenizer = spec.processing_class
        if teacher_tokenizer is None and spec.path is not None:
            teacher_tokenizer = find_teacher_tokenizer(None, spec.path, spec.revision, args.trust_remote_code)
        mapping, vocab_size = teacher_id_mapping(tokenizer, config, None, teacher_tokenizer,
                                                 args.cross_tokenizer_targets)
        server = ServedTeacher(
            spec.urls, spec.path, vocab_size, sample_top_k=args.guidance_top_k, timeout=args.teacher_server_timeout,
            max_concurrent_requests=args.teacher_server_max_concurrent_requests,
            max_retries=args.teacher_server_max_retries,
        )
        scoring_tokenizer, role = (teacher_tokenizer, "teacher") if mapping.cross_tokenizer else (tokenizer, "student")
        server.probe(scoring_tokenizer, server.logprobs_for(**_teacher_request(args.guidance, args.guidance_top_k)),
                     args.max_completion_length + 2, role)
        return server, (mapping, vocab_size)

    # ------------------------------------------------------------------ model card

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ):
        """
        Write `README.md` to `output_dir`: TRL's card (tags, tracking badges, framework versions, citations) that also
        names the teacher and its revision, the guidance mode and its settings, and the student it started from. A
        local student or dataset is described, never linked as a Hub repo. `dataset_name` may be a Hub id or a path.
        """
        if not self.is_world_process_zero():
            return
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        tags.update(self._tag_names)
        if hasattr(self.model.config, "unsloth_version"):
            tags.add("unsloth")
        if "JOB_ID" in os.environ:
            tags.add("hf_jobs")
        trackio_url = get_trackio_space_url()
        if trackio_url is not None:  # one trackio tag, with this run's URL
            tags = {tag for tag in tags if not tag.startswith("trackio:")} | {f"trackio:{trackio_url}"}
        wandb_run = getattr(sys.modules.get("wandb"), "run", None)  # a W&B run exists only if wandb was imported
        card = generate_tgpo_model_card(
            args=self.args,
            teacher={teacher.name: teacher.source for teacher in self.teachers} if self.teachers.routed else (
                self.teacher_source),
            student_name=get_config_model_id(self.model.config) or None,
            model_name=model_name,
            hub_model_id=self.hub_model_id,
            dataset_name=dataset_name,
            tags=sorted(tags),
            paper=self._paper,
            trainer_name=self._name,
            wandb_url=wandb_run.url if wandb_run is not None else None,
            trackio_url=trackio_url,
            comet_url=get_comet_experiment_url(),
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    # ------------------------------------------------------------------ schedule

    @property
    def guidance_coef(self) -> float:
        """`lambda_k` of the optimizer step being taken (`k = global_step + 1`, so it resumes with the checkpoint)."""
        args = self.args
        return G.guidance_coef(
            self.state.global_step + 1, args.guidance_coef, args.guidance_schedule, args.guidance_decay_steps
        )

    # ------------------------------------------------------------------ rewards

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # GRPO lets a reward function's exception through unnamed: name it (reward models are left as they are)
        reward_funcs = self.reward_funcs
        self.reward_funcs = [
            func if isinstance(func, nn.Module) else _name_reward_errors(func, name)
            for func, name in zip(reward_funcs, self.reward_func_names, strict=True)
        ]
        try:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.reward_funcs = reward_funcs

    # ------------------------------------------------------------------ teacher scoring

    @contextlib.contextmanager
    def teacher_view(self, name: str):
        """The trainer as if teacher `name` were its only one (its model, server, id mapping and image rule), for
        measuring each teacher on its own prompts (the gap report); as it was on exit."""
        (teacher,) = [teacher for teacher in self.teachers if teacher.name == name] or [None]
        if teacher is None:
            raise ValueError(f"No teacher {name!r}: the run's teachers are {self.teachers.names}.")
        names = ("teachers", "teacher_model", "teacher_server", "teacher_source", "teacher_scoring",
                 "teacher_vocab_size", "_image_refusal")
        saved = {key: getattr(self, key) for key in names}
        self.teachers = Teachers([teacher], self.args.teacher_id_column)
        self.teacher_model, self.teacher_server, self.teacher_source = teacher.model, teacher.server, teacher.source
        self.teacher_scoring, self.teacher_vocab_size = teacher.scoring, teacher.vocab_size
        self._image_refusal = teacher.image_refusal
        try:
            yield self
        finally:
            for key, value in saved.items():
                setattr(self, key, value)

    @property
    def has_teacher(self) -> bool:
        """Whether a teacher scores the rollouts (in process or served)."""
        return bool(self.teachers)

    def _generate(self, prompts: list):
        # A served teacher's scores are requested as soon as the completions exist, so that it works while GRPO
        # computes rewards and its own no-grad forwards; they are collected in `_generate_and_score_completions`. (An
        # in-process teacher runs there, with the image inputs GRPO builds after generation.)
        generated = super()._generate(prompts)
        if self.teachers.served and self._teacher_inputs is not None:
            prompt_ids, completion_ids = generated[0], generated[1]
            device, pad_id = self.accelerator.device, self._tokenizer.pad_token_id

            def padded(rows, side):
                ids = pad([torch.tensor(row) for row in rows], padding_value=pad_id, padding_side=side,
                          pad_to_multiple_of=self.pad_to_multiple_of)
                mask = pad([torch.ones(len(row), dtype=torch.long) for row in rows], padding_value=0,
                           padding_side=side, pad_to_multiple_of=self.pad_to_multiple_of)
                return ids.to(device), mask.to(device)

            tensors = (*padded(prompt_ids, "left"), *padded(completion_ids, "right"))
            prompts = self._prompts_for_teacher(self._teacher_inputs) if self.teachers.cross_tokenizer else None
            self._teacher_in_flight = (self._start_served_scoring(tensors, prompts, self._teacher_route), tensors[2])
        return generated

    def _start_served_scoring(self, tensors, prompts, route):
        """Send a generation batch to the served teacher: whole, or (`_defer_teacher`) slice by slice in the order the
        slices will train. The slices are GRPO's: the batch's rows shuffled by a permutation drawn here, where GRPO's
        `shuffle_sequence_dict` draws its own after scoring (one draw per batch either way), then split into
        `steps_per_generation` equal parts (the rows past the last full part are never trained, as in GRPO)."""
        if not self._defer_teacher:
            return self.start_teacher_scoring(*tensors, prompts=prompts, route=route)
        count, parts = tensors[0].size(0), self.args.steps_per_generation
        size = count // parts
        order = torch.randperm(count)
        rows = [order[index * size:(index + 1) * size] for index in range(parts)]

        def start(slice_rows):
            taken = [tensor[slice_rows.to(tensor.device)] for tensor in tensors]
            return self.start_teacher_scoring(
                *taken, prompts=None if prompts is None else [prompts[row] for row in slice_rows.tolist()],
                route=None if route is None else route[slice_rows],
            )

        return ScoresBySlice(rows, start, first=self._step % parts)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        # which teacher scores each row (several teachers): a row without a known id fails here, before generation
        route = self.teachers.route(inputs)
        self._teacher_in_flight, self._teacher_inputs, self._teacher_route = None, inputs, route
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._teacher_inputs = self._teacher_route = None
        if not self.has_teacher:
            return output
        if route is not None:  # travels with the rows through GRPO's shuffle and split, for the per-teacher metrics
            output["teacher_index"] = route.to(output["completion_ids"].device)
        mode = "train" if self.model.training else "eval"
        in_flight, self._teacher_in_flight = self._teacher_in_flight, None
        image_inputs = self._teacher_image_inputs(output)
        if in_flight is None or not torch.equal(in_flight[1], output["completion_ids"]):
            # an in-process teacher, or a served one whose requests `_generate` did not send (a subclass or test that
            # supplies the rollouts): score the batch now
            prompts = self._prompts_for_teacher(inputs) if self.teachers.cross_tokenizer else None
            tensors = (output["prompt_ids"], output["prompt_mask"], output["completion_ids"], output["completion_mask"])
            if self.teachers.served:
                in_flight = (self._start_served_scoring(tensors, prompts, route), None)
            else:
                in_flight = (self.start_teacher_scoring(*tensors, prompts=prompts, image_inputs=image_inputs,
                                                        route=route), None)
        if self.guidance != "opd" and not self.args.use_task_reward:
            output["advantages"] = torch.zeros_like(output["advantages"])
        if self._defer_teacher:  # the scores join each slice as `_prepare_inputs` hands it to training
            self._teacher_slices, self._skipped_counts = in_flight[0], None
            return output
        try:
            scores = in_flight[0].result()
        except TeacherServerError as error:
            raise self._teacher_stopped(error) from error
        if self.teachers.served:
            # (a routed batch whose rows all went to in-process teachers sent no request)
            pending = in_flight[0].pending
            sent = pending.answered is not None
            self._metrics[mode]["teacher/wait_time"].append(pending.wait_time if sent else 0.0)
            self._metrics[mode]["teacher/request_time"].append(pending.answered - pending.submitted if sent else 0.0)
        self._report_skipped(self._attach_teacher_scores(output, scores, mode), mode)
        return output

    def _attach_teacher_scores(self, output: dict[str, Any], scores, mode: str) -> torch.Tensor:
        """Put the teacher's scores of `output`'s rows (a generation batch, or one slice of it) into it, with what
        depends on them (`opd`'s off-policy advantage); returns its `(skipped, total)` token counts, unreduced."""
        # rows GRPO masked after generation (`mask_truncated_completions`) have no teacher score either
        scored = output["completion_mask"].bool()
        scores.valid, scores.aligned = scores.valid & scored, scores.aligned & scored
        mask = self._loss_mask(output).bool()
        counts = torch.stack([(mask & ~self._usable_scores(scores)).sum(), mask.sum()]).float()
        if self.teachers.cross_tokenizer and not self._alignment_logged:
            self._alignment_logged = True
            rate = self._global_token_mean(scores.aligned.float(), mask)
            logger.warning(f"Cross-tokenizer scoring: {rate:.1%} of the first batch's completion tokens are aligned.")
        output.update(scores.as_dict())
        # off policy only: on policy, `log p_old` is the loss forward's own `log p_s` (`_AdvantagesFromLossForward`)
        if self.guidance == "opd" and output.get("old_per_token_logps") is not None:
            output["advantages"] = self._opd_advantages(output, output["old_per_token_logps"])
        return counts

    def _teacher_stopped(self, error: TeacherServerError) -> TeacherServerError:
        """A served teacher could not score a batch: the run stops before the batch reaches the optimizer, with
        where to resume from."""
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        where = f"the last checkpoint is {last}" if last else "no checkpoint was saved yet (see `save_steps`)"
        return TeacherServerError(
            f"{error} The teacher's scores for this batch are missing, so training stopped at step "
            f"{self.state.global_step} before the batch reached the optimizer; {where}. Once the server answers, "
            "resume with `trainer.train(resume_from_checkpoint=True)` (`--resume_from_checkpoint true`)."
        )

    # Per training slice (True), or the whole generation batch when it is generated (False: how a served teacher was
    # collected before; `benchmarks/served_teacher.py` compares the two)
    _collect_by_slice = True

    def _prepare_inputs(self, generation_batch):
        """
        GRPO's generation-batch buffer, with a served teacher's scores collected per training slice: the batch's
        requests go out slice by slice in the order the slices will train (`_start_served_scoring`), and each slice
        waits only for its own. The micro-batch that ends an accumulation window waits for every slice first: no
        optimizer step (under DeepSpeed, taken inside that micro-batch's backward) may use a generation batch the
        teacher has not scored in full. Evaluation and an in-process teacher go through GRPO's path unchanged.
        """
        if not self.model.training or not self.teachers.served:
            return super()._prepare_inputs(generation_batch)
        parts = self.args.steps_per_generation
        if self._step % (parts * self.num_iterations) == 0 or self._buffered_inputs is None:
            self._defer_teacher = True
            try:
                batch = self._generate_and_score_completions(generation_batch)
            finally:
                self._defer_teacher = False
            batch = split_pixel_values_by_grid(batch)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(_take_rows(batch, rows))
                                     for rows in self._teacher_slices.rows]
        index = self._step % parts
        waited = self._teacher_slices.uncollected
        if self._collect_by_slice and not self.accelerator.sync_gradients:
            waited = [index] if index in waited else []
        for part in sorted(waited, key=lambda part: part != index):  # this slice's first
            self._attach_slice(part)
        return self._buffered_inputs[index]

    def _attach_slice(self, index: int) -> None:
        """Collect slice `index`'s scores into its buffered inputs. A failure, at any slice, drops the generation
        batch and the gradients of its slices trained so far, so no optimizer step uses it."""
        slices = self._teacher_slices
        try:
            scores = slices.collect(index)
            if scores is None:
                return
            counts = self._attach_teacher_scores(self._buffered_inputs[index], scores, "train")
            self._skipped_counts = counts if self._skipped_counts is None else self._skipped_counts + counts
            self._teacher_wait += slices.take_wait_time()
            if not slices.uncollected:
                self._metrics["train"]["teacher/request_time"].append(slices.request_time)
                self._report_skipped(self._skipped_counts, "train")
        except BaseException as error:
            slices.cancel()
            self._buffered_inputs = None
            for model in {id(self.model): self.model, id(self.model_wrapped): self.model_wrapped}.values():
                model.zero_grad()
            if isinstance(error, TeacherServerError):
                raise self._teacher_stopped(error) from error
            raise

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # as GRPO's `step_time`: one value per optimizer step
        if self.teachers.served and self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["teacher/wait_time"].append(self._teacher_wait)
            self._teacher_wait = 0.0
        return loss

    @staticmethod
    def _prompts_for_teacher(inputs: list[dict[str, Any]]) -> list:
        """The batch's prompts, which a teacher with another tokenizer re-renders in its own chat template."""
        if any("prompt" not in example for example in inputs):
            raise ValueError(
                "A teacher with another tokenizer re-renders each prompt in its own chat template, but this batch's "
                "examples have no `prompt` (an `environment_factory` that owns the prompts?). Give the dataset a "
                "`prompt` column, or use a teacher with the student's tokenizer."
            )
        return [example["prompt"] for example in inputs]

    def start_teacher_scoring(self, prompt_ids, prompt_mask, completion_ids, completion_mask, prompts=None,
                              image_inputs=None, route=None):
        """
        The trainer's one scoring call: send a batch of rollouts to the teachers and return their scores in flight
        (`.result()`: what `self.guidance` needs, in the student's positions and ids). Which teacher scores each row
        (`route`: the rows' indices into `self.teachers.names`, from `self.teachers.route(examples)`; None with one
        teacher), where each teacher runs (in process, its forward at `.result()`; or served, requests sent now) and
        how its ids map (shared vocabulary, or cross-tokenizer, which needs the `prompts` themselves) are the teacher
        layers' (`tgpo_trl.teacher.Teachers`). `image_inputs`: the batch's image inputs as GRPO gives them to the
        student (`_IMAGE_INPUTS`), for an in-process teacher that shares the student's processor.
        """
        if self.teachers.routed and route is None:
            raise ValueError(f"The run has several teachers {self.teachers.names}: pass `route`, the teacher of each row "
                             "(`trainer.teachers.route(examples)`).")
        if image_inputs and self._image_refusal is not None:
            raise ValueError(f"Image inputs cannot be given to this teacher: {self._image_refusal}.")
        request = _teacher_request(self.guidance, self.args.guidance_top_k)
        submit = functools.partial(self._submit_to_teacher, request=request, image_inputs=image_inputs)
        return self.teachers.start(submit, prompts, prompt_ids, prompt_mask, completion_ids, completion_mask, route)

    def score_with_teacher(self, prompt_ids, prompt_mask, completion_ids, completion_mask, prompts=None,
                           image_inputs=None, route=None):
        """`start_teacher_scoring(...).result()`: the teachers' scores of a batch, waited for."""
        return self.start_teacher_scoring(prompt_ids, prompt_mask, completion_ids, completion_mask, prompts,
                                          image_inputs, route).result()

    def _submit_to_teacher(self, teacher, prompt_ids, prompt_mask, completion_ids, completion_mask, request,
                           image_inputs=None):
        """Where `teacher` runs: its server's requests, sent now; or its in-process no-grad forward, run when its
        scores are collected: GRPO's chunked forward (its chunks, its autocast, and its split of the image inputs), as
        for its reference model."""
        if teacher.server is not None:
            return teacher.server.submit(prompt_ids, prompt_mask, completion_ids, completion_mask, **request)
        count = prompt_ids.size(0)
        tensors = [prompt_ids, prompt_mask, completion_ids, completion_mask]
        if teacher.collective:
            # a partitioned teacher's forwards gather its parameters across processes, so each process runs as many
            # as the process with the most of its rows: the others score copies of a row, unscored (no completion)
            most = int(self.accelerator.gather(torch.tensor([count], device=prompt_ids.device)).max())
            if most > count:
                filler = [tensor[:1].expand(most - count, -1) for tensor in tensors]
                filler[3] = torch.zeros_like(filler[3])
                tensors = [torch.cat([tensor, extra]) for tensor, extra in zip(tensors, filler, strict=True)]

        def scored():
            scores = score_completions(
                teacher.model, *tensors, teacher.vocab_size, self._forward_batch_size, **request,
                forward=self._get_per_token_logps_and_entropies, image_inputs=image_inputs,
            )
            return take_rows(scores, count) if tensors[0].size(0) > count else scores

        return Deferred(scored)

    def _image_inputs(self, output: dict[str, Any]) -> dict[str, Any] | None:
        """The batch's image inputs, as GRPO gives them to the student's forwards; None for a batch without images."""
        inputs = {key: output[key] for key in _IMAGE_INPUTS if output.get(key) is not None}
        return inputs if inputs.get("pixel_values") is not None else None

    def _teacher_image_inputs(self, output: dict[str, Any]) -> dict[str, Any] | None:
        """The image inputs the teacher gets for this batch: the student's, none (`teacher_without_images`, logged
        once), or an error when this teacher cannot see them."""
        image_inputs = self._image_inputs(output)
        if image_inputs is None or not self.has_teacher:
            return None
        if self.args.teacher_without_images:
            if not self._images_withheld_logged:
                self._images_withheld_logged = True
                logger.warning(
                    "`teacher_without_images=True`: the teacher scores the image prompts without their images (their "
                    "text and image placeholder tokens only), so its targets and the `gap/*` metrics are those of a "
                    "model that never saw the pictures."
                )
            return None
        if self._image_refusal is not None:
            raise _images_refused("This batch's prompts have images", self._image_refusal)
        return image_inputs

    @property
    def _forward_batch_size(self) -> int:
        """Rows per no-grad forward over a generation batch, as GRPO chunks its own reference-model pass."""
        args = self.args
        return args.per_device_train_batch_size if self.model.training else args.per_device_eval_batch_size

    @staticmethod
    def _loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]

    def _usable_scores(self, scores) -> torch.Tensor:
        """Where the teacher gave what the guidance reads: a target (the target modes), `log p_T(y_t)` (the others),
        either (`none`, whose gap metrics read both)."""
        if self.guidance in _TARGET_MODES:
            return scores.aligned
        return scores.valid | scores.aligned if self.guidance == "none" else scores.valid

    def _report_skipped(self, counts: torch.Tensor, mode: str) -> None:
        """
        Tokens where the teacher gave nothing usable (see `_usable_scores`: a non-finite output, a sampled token of
        probability 0 for the modes that read `log p_T(y_t)`, or across tokenizers no target) are left out of the
        guidance and counted in `guidance/skipped_tokens` (`counts`: this process's skipped and total tokens of a
        generation batch); a teacher with no usable output on a whole generation batch is broken, and stops the run
        before it trains on nothing but noise.
        """
        skipped, total = self.accelerator.reduce(counts, reduction="sum").tolist()
        self._metrics[mode]["guidance/skipped_tokens"].append(skipped)
        if total > 0 and skipped == total:
            raise FloatingPointError(
                "The teacher produced non-finite outputs (NaN or inf) at every completion token of this batch: its "
                "weights are broken or its dtype overflows. Check the teacher checkpoint or load it in float32/bfloat16 "
                "via `teacher_model_init_kwargs`. (Across tokenizers, a batch none of whose tokens align with the "
                "teacher's ends here too: see `gap/aligned_ratio`.)"
            )
        if skipped:
            logger.warning_once(
                "The teacher gave no usable score at some tokens (a non-finite output or, across tokenizers, a token "
                "with neither a target nor a group log-probability); they are left out of the guidance and counted in "
                "`guidance/skipped_tokens`."
            )

    def _opd_advantages(self, output: dict[str, Any], old_logps: torch.Tensor) -> torch.Tensor:
        """Per-token RKL advantage from the rollout policy's log-probs, plus the GRPO advantage with a task reward."""
        advantages = G.opd_advantages(output["teacher_logps"], old_logps, self.guidance_coef)
        advantages = advantages * output["teacher_valid"]
        if self.args.use_task_reward:
            advantages = advantages + output["advantages"].unsqueeze(1)
        return advantages

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.has_teacher:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids_key = _EXTRA_IDS.get(self.guidance)
        completion_ids = inputs["completion_ids"]
        extra_ids = inputs[ids_key] if ids_key else completion_ids.new_zeros(*completion_ids.shape, 0)
        if extra_ids.dim() == 2:
            extra_ids = extra_ids.unsqueeze(-1)
        with self._student_logps.gather(extra_ids) as gathered:
            if self.guidance == "opd" and inputs.get("old_per_token_logps") is None:
                inputs = _AdvantagesFromLossForward(inputs, gathered, functools.partial(self._opd_advantages, inputs))
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        student_logps, student_extra_logps = gathered.result

        mode = "train" if self.model.training else "eval"
        loss_mask = self._loss_mask(inputs).bool()
        # `log p_T(y_t)` is defined where `teacher_valid`; a teacher target exists where `teacher_aligned` (the same
        # tokens with a shared vocabulary)
        logp_mask = loss_mask & inputs["teacher_valid"]
        target_mask = loss_mask & inputs["teacher_aligned"]
        mask = target_mask if self.guidance in _TARGET_MODES else logp_mask
        per_token = self._guidance_per_token(student_logps, student_extra_logps, inputs)
        coef = self.guidance_coef
        if per_token is not None:
            per_token = per_token.masked_fill(~mask, 0.0)  # a skipped teacher token contributes nothing, not NaN
            weighted = per_token
            # present only with `use_vllm` and `vllm_importance_sampling_correction` (TRL's default there)
            ratio = inputs.get("importance_sampling_ratio")
            if ratio is not None and self.guidance in _SAMPLED_TOKEN_MODES:
                weighted = per_token * ratio
            loss = loss + coef * G.aggregate(
                weighted, mask, self.loss_type, self.max_completion_length, **self._normalizer(inputs, mode)
            )

        log_ratio = (student_logps.detach() - inputs["teacher_logps"]).masked_fill(~logp_mask, 0.0)
        metrics = self._metrics[mode]
        if self.guidance != "none":
            # opd's term is the reverse KL its advantage minimises
            term = per_token.detach() if per_token is not None else log_ratio
            metrics["guidance/loss"].append(self._global_token_mean(term, mask))
            metrics["guidance/coef"].append(coef)
        metrics["gap/reverse_kl"].append(self._global_token_mean(log_ratio, logp_mask))
        mismatch = (inputs["teacher_argmax"] != completion_ids).float()
        metrics["gap/mismatch_ratio"].append(self._global_token_mean(mismatch, target_mask))
        metrics["gap/aligned_ratio"].append(self._global_token_mean(target_mask.float(), loss_mask))
        if inputs.get("teacher_index") is not None:
            guidance = (per_token.detach() if per_token is not None else log_ratio) if self.guidance != "none" else None
            self._log_per_teacher(metrics, inputs["teacher_index"], guidance, mask, log_ratio, logp_mask, mismatch,
                                  target_mask, loss_mask)
        return loss

    def _log_per_teacher(self, metrics, route, guidance, mask, log_ratio, logp_mask, mismatch, target_mask, loss_mask):
        """The guidance and gap metrics of each teacher's rows, `<metric>/<teacher id>`, and the share of the completion
        tokens it scored (`teacher/token_share/<id>`); reduced over processes in one call, and logged only for the
        teachers that scored tokens of this micro-batch on some process (their means are undefined otherwise)."""
        rows = [(route == index).unsqueeze(1) for index in range(len(self.teachers))]
        zero = log_ratio.new_zeros(())
        sums = torch.stack([torch.stack([
            (guidance * (mask & own)).sum() if guidance is not None else zero, (mask & own).sum(),
            (log_ratio * (logp_mask & own)).sum(), (logp_mask & own).sum(),
            (mismatch * (target_mask & own)).sum(), (target_mask & own).sum(), (loss_mask & own).sum(),
        ]).float() for own in rows])
        sums = self.accelerator.reduce(sums, reduction="sum").tolist()
        total = sum(row[6] for row in sums)
        for name, (term, term_count, kl, kl_count, wrong, targets, tokens) in zip(self.teachers.names, sums,
                                                                                  strict=True):
            if tokens == 0:
                continue
            metrics[f"teacher/token_share/{name}"].append(tokens / total)
            metrics[f"gap/aligned_ratio/{name}"].append(targets / tokens)
            if guidance is not None and term_count:
                metrics[f"guidance/loss/{name}"].append(term / term_count)
            if kl_count:
                metrics[f"gap/reverse_kl/{name}"].append(kl / kl_count)
            if targets:
                metrics[f"gap/mismatch_ratio/{name}"].append(wrong / targets)

    def _guidance_per_token(self, student_logps, student_extra_logps, inputs) -> torch.Tensor | None:
        """The `(B, T)` guidance term of `self.guidance` (None for the modes without a differentiable term)."""
        if self.guidance == "tgpo":
            return G.tgpo_hard(student_extra_logps[..., 0])
        if self.guidance == "tgpo_sample":
            return G.tgpo_sample(student_extra_logps[..., 0])
        if self.guidance == "tgpo_topk":
            return G.tgpo_topk(student_extra_logps, inputs["teacher_topk_logps"], inputs.get("teacher_topk_valid"))
        if self.guidance == "rkl_topk":
            return G.rkl_topk(student_extra_logps, inputs["teacher_topk_logps"], inputs.get("teacher_topk_valid"))
        if self.guidance == "rkl_k3":
            return G.rkl_k3(student_logps, inputs["teacher_logps"])
        if self.guidance == "kdrl":
            return G.kdrl_k2(student_logps, inputs["teacher_logps"])
        return None

    def _normalizer(self, inputs, mode: str) -> dict[str, Any]:
        """The accumulation factor and token count GRPO divides its policy term by, for `guidance.aggregate`."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":  # `num_items_in_batch` spans the generation batch: rescale it to one accumulation window
            num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return {"accumulation_steps": accumulation, "num_items": num_items}

    def _global_token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        local = torch.stack([(values * mask).sum(), mask.sum()]).float()
        total, count = self.accelerator.reduce(local, reduction="sum").tolist()
        return total / max(count, 1.0)
