import json
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments
from trl import GRPOConfig

from .alignment import TARGET_RULES as CROSS_TOKENIZER_TARGETS
from .served import server_urls


# transformers 5.24 renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the old name, which
# TRL's GRPOConfig still sets (to True) by default. The name of the switch on the installed version:
CHECKPOINTING_FIELD = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
    else "gradient_checkpointing"
)

GUIDANCE_MODES = ("tgpo", "tgpo_sample", "tgpo_topk", "rkl_topk", "rkl_k3", "kdrl", "opd", "none")
GUIDANCE_SCHEDULES = ("linear", "constant")


@dataclass
class TGPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`TGPOTrainer`]: every [`~trl.GRPOConfig`] parameter, plus the teacher and its guidance.

    TGPO (Teacher-Guided Policy Optimization, arXiv 2605.13230) teacher-forces a teacher on the student's own rollouts
    and adds, next to the GRPO policy term, a dense guidance term pulling the student towards the teacher's prediction
    at every completion token: `L = L_GRPO + lambda_k * G`. The paper's baselines are the other `guidance` modes.

    Parameters:
        > Parameters that control the teacher

        teacher_model_name_or_path (`str` or `dict[str, str]`, *optional*):
            Hub id or local path of the teacher, loaded with `AutoModelForCausalLM.from_pretrained`. A model object
            passed to the trainer as `teacher_model` takes precedence. A teacher with the student's tokenizer scores the
            student's ids (its embedding may be padded further, e.g. Qwen2.5-72B for a Qwen2.5-1.5B student); one with
            another tokenizer is scored across tokenizers (docs/method.md, "Teachers with another tokenizer"). Several
            teachers: a mapping from teacher id to path (a YAML mapping, or JSON on the command line), each row scored
            by the teacher its `teacher_id_column` names (docs/options.md, "Several teachers").
        teacher_model_revision (`str` or `dict[str, str]`, *optional*):
            Revision (branch, tag or commit) of the teacher; with several, one for all or a mapping from teacher id.
        teacher_model_init_kwargs (`str` or `dict[str, Any]`, *optional*):
            Keyword arguments for the teacher's `from_pretrained` (e.g. `{"dtype": "bfloat16"}`); with several
            teachers, one set for all, or a mapping from teacher id to its own.
        teacher_id_column (`str`, *optional*, defaults to `"teacher_id"`):
            With several teachers, the dataset column that names each row's teacher. A missing or unknown id is an
            error that names it and the known ones, before training where the dataset can be read up front.

        > Parameters that control a served teacher

        teacher_server_url (`str`, `list[str]` or `dict[str, str | list[str]]`, *optional*):
            Base URL of a vLLM OpenAI-compatible server (`vllm serve`) that serves the teacher, e.g.
            `"http://10.0.0.2:8000"`; several replicas as a list or comma-separated, requests spread over them; with
            several teachers, a mapping from teacher id to its URL(s) (the others run in process). The
            teacher then never enters training memory: it scores rollouts through `/v1/completions` with
            `prompt_logprobs` (docs/distributed.md). `teacher_model_name_or_path` names the served model (and is where
            its tokenizer is looked for); an in-process teacher (`teacher_model` object, `teacher_model_init_kwargs`)
            is refused alongside.
        teacher_server_timeout (`float`, *optional*, defaults to `300.0`):
            Seconds one request to the teacher server may take before it counts as failed (and is retried).
        teacher_server_max_concurrent_requests (`int`, *optional*, defaults to `16`):
            Requests in flight to the teacher server at once, per training process.
        teacher_server_max_retries (`int`, *optional*, defaults to `5`):
            Retries of a request that failed to connect, timed out or got a 5xx answer, with exponential backoff from 1 s
            (a 4xx answer fails at once). When they run out, the run stops before the batch reaches the optimizer.

        > Parameters that control the guidance

        guidance (`str`, *optional*, defaults to `"tgpo"`):
            The guidance term added to the GRPO objective:

            - `"tgpo"`: cross-entropy to the teacher's argmax, `-log p_s(argmax p_T)` (the paper's TGPO).
            - `"tgpo_sample"`: cross-entropy to a token sampled from the teacher, `-log p_s(v), v ~ p_T` (TGPO-MC).
            - `"tgpo_topk"`: forward KL from the teacher renormalised on its top-k to the student (soft TGPO).
            - `"rkl_topk"`: reverse KL on the teacher's top-k, both renormalised there (ablation).
            - `"rkl_k3"`: k3 estimate of the reverse KL at the sampled token (ablation).
            - `"kdrl"`: k2 penalty `0.5 (log p_s - log p_T)^2` at the sampled token (KDRL baseline).
            - `"opd"`: reverse-KL on-policy distillation, per-token advantage `lambda_k (log p_T - log p_old)`.
            - `"none"`: plain GRPO (the teacher, if any, is only scored for the `gap/*` metrics).
        guidance_coef (`float`, *optional*, defaults to `0.002`):
            Initial guidance coefficient `lambda_0`.
        guidance_schedule (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: `lambda_k = lambda_0 * max(0, 1 - (k - 1) / D)` for the 1-based optimizer step `k`;
            `"constant"`: `lambda_k = lambda_0`.
        guidance_decay_steps (`int`, *optional*, defaults to `200`):
            `D`, the number of optimizer steps over which the linear schedule decays to zero.
        guidance_top_k (`int`, *optional*, defaults to `20`):
            Number of teacher tokens kept per position by `"tgpo_topk"` and `"rkl_topk"`.
        cross_tokenizer_targets (`str`, *optional*, defaults to `"continuation"`):
            With a teacher of another tokenizer, where a student position gets a teacher target. `"continuation"`:
            where the student's token starts at the first byte of a teacher token, and also inside a teacher token, the
            rest of the bytes of the teacher's predicted token there, when they continue the text written so far.
            `"sync"`: only the former. On the project's cross-tokenizer benchmark `tgpo`, `tgpo_topk` and
            `tgpo_sample` collapsed with `"sync"` (0.2%, 0.0%, 2.8%) and trained with `"continuation"` (docs/method.md).
            Ignored with a shared tokenizer.
        use_task_reward (`bool`, *optional*, defaults to `True`):
            Whether to keep the GRPO policy term driven by the reward functions. `False` trains on the guidance alone
            (pure distillation); rewards are still computed and logged.
        teacher_without_images (`bool`, *optional*, defaults to `False`):
            With prompts that have images: let the teacher score them without their images (their text and image
            placeholder tokens only), to distil a text model's way of reasoning into a vision-language student; logged
            once. Off by default: a teacher that cannot see the student's images (a text-only, served, other-tokenizer
            or other-processor teacher) is refused for a dataset with images, and an in-process vision-language teacher
            that shares the student's processor gets the student's image inputs.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    if CHECKPOINTING_FIELD == "activation_checkpointing":
        # GRPO's default (on) under the new name, so that a config that never mentions checkpointing raises no
        # deprecation warning; `None` in both fields means "unset", so an explicit old-name value is still honoured.
        activation_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "Activation (gradient) checkpointing: trade compute for memory. Defaults to True, as in "
                      "GRPO.", "nargs": "?", "const": True},
        )
        gradient_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "Deprecated alias of `activation_checkpointing`.", "nargs": "?", "const": True},
        )

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of the teacher model. A `teacher_model` object passed to the trainer "
                  "takes precedence. Several teachers: a mapping from teacher id to path, as JSON on the command line "
                  "('{\"math\": \"Qwen/Qwen2.5-Math-7B-Instruct\", \"code\": \"...\"}') or a YAML mapping."},
    )
    teacher_model_revision: str | None = field(
        default=None,
        metadata={"help": "Revision (branch, tag or commit) of the teacher model; with several teachers one for all or "
                  "a mapping from teacher id (JSON or YAML)."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for the teacher's `from_pretrained`, e.g. '{\"dtype\": \"bfloat16\"}'."},
    )
    teacher_server_url: list[str] | None = field(
        default=None,
        metadata={"help": "Base URL(s) of vLLM servers serving the teacher (`vllm serve`), e.g. http://10.0.0.2:8000; "
                  "several replicas as a list or comma-separated. The teacher is then not loaded in training. Several "
                  "teachers: a mapping from teacher id to URL(s), as JSON or YAML; the teachers it does not name run "
                  "in process."},
    )
    teacher_id_column: str = field(
        default="teacher_id",
        metadata={"help": "With several teachers, the dataset column naming each row's teacher."},
    )
    teacher_server_timeout: float = field(
        default=300.0,
        metadata={"help": "Seconds one request to the teacher server may take before it is retried (> 0)."},
    )
    teacher_server_max_concurrent_requests: int = field(
        default=16,
        metadata={"help": "Requests in flight to the teacher server at once, per process (>= 1)."},
    )
    teacher_server_max_retries: int = field(
        default=5,
        metadata={"help": "Retries of a teacher request after a connection error, timeout or 5xx (>= 0)."},
    )
    guidance: str = field(
        default="tgpo",
        metadata={"help": "Guidance term added to the GRPO objective.", "choices": list(GUIDANCE_MODES)},
    )
    guidance_coef: float = field(
        default=0.002,
        metadata={"help": "Initial guidance coefficient lambda_0 (>= 0)."},
    )
    guidance_schedule: str = field(
        default="linear",
        metadata={
            "help": "'linear': lambda_k = lambda_0 * max(0, 1 - (k-1)/D) for the 1-based optimizer step k; "
            "'constant': lambda_k = lambda_0.",
            "choices": list(GUIDANCE_SCHEDULES),
        },
    )
    guidance_decay_steps: int = field(
        default=200,
        metadata={"help": "D: optimizer steps over which the linear schedule decays to zero (> 0)."},
    )
    guidance_top_k: int = field(
        default=20,
        metadata={"help": "Teacher tokens kept per position by the 'tgpo_topk' and 'rkl_topk' guidance (>= 1)."},
    )
    cross_tokenizer_targets: str = field(
        default="continuation",
        metadata={"help": "With a teacher of another tokenizer: 'continuation' (targets where both tokenizations start "
                  "a token, and inside a teacher token from the rest of its predicted token) or 'sync' (only the "
                  "former; TGPO collapsed with it on the cross-tokenizer benchmark).",
                  "choices": list(CROSS_TOKENIZER_TARGETS)},
    )
    use_task_reward: bool = field(
        default=True,
        metadata={"help": "Keep the reward-driven GRPO policy term. False trains on the guidance alone."},
    )
    teacher_without_images: bool = field(
        default=False,
        metadata={"help": "Let the teacher score image prompts without their images (text and image placeholder tokens "
                  "only), e.g. to distil a text model's reasoning into a vision-language student. Off: a teacher that "
                  "cannot see the images is refused for a dataset with images."},
    )

    def __post_init__(self):
        if (CHECKPOINTING_FIELD == "activation_checkpointing" and self.gradient_checkpointing is None
                and self.activation_checkpointing is None):
            self.activation_checkpointing = True  # GRPO's default
        super().__post_init__()
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"`guidance` must be one of {list(GUIDANCE_MODES)}, got {self.guidance!r}.")
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(
                f"`guidance_schedule` must be one of {list(GUIDANCE_SCHEDULES)}, got {self.guidance_schedule!r}."
            )
        if not self.guidance_coef >= 0:  # also refuses NaN
            raise ValueError(f"`guidance_coef` must be >= 0, got {self.guidance_coef}.")
        if self.guidance_decay_steps <= 0:
            raise ValueError(f"`guidance_decay_steps` must be > 0, got {self.guidance_decay_steps}.")
        if self.cross_tokenizer_targets not in CROSS_TOKENIZER_TARGETS:
            raise ValueError(
                f"`cross_tokenizer_targets` must be one of {list(CROSS_TOKENIZER_TARGETS)}, got "
                f"{self.cross_tokenizer_targets!r}."
            )
        for name in ("teacher_model_name_or_path", "teacher_model_revision", "teacher_server_url"):
            setattr(self, name, _mapping_from_json(name, getattr(self, name)))
        if isinstance(self.teacher_server_url, dict):
            self.teacher_server_url = {teacher: server_urls(urls) for teacher, urls in self.teacher_server_url.items()}
        elif self.teacher_server_url is not None:
            self.teacher_server_url = server_urls(self.teacher_server_url)
            if self.teacher_model_init_kwargs is not None:
                raise ValueError(
                    "`teacher_model_init_kwargs` loads an in-process teacher, but `teacher_server_url` serves it: set "
                    "the teacher's dtype and the like on `vllm serve` (e.g. `--dtype bfloat16`), or drop the server URL."
                )
        if not self.teacher_server_timeout > 0:
            raise ValueError(f"`teacher_server_timeout` must be > 0 seconds, got {self.teacher_server_timeout}.")
        if self.teacher_server_max_concurrent_requests < 1:
            raise ValueError(
                f"`teacher_server_max_concurrent_requests` must be >= 1, got {self.teacher_server_max_concurrent_requests}."
            )
        if self.teacher_server_max_retries < 0:
            raise ValueError(f"`teacher_server_max_retries` must be >= 0, got {self.teacher_server_max_retries}.")
        if self.guidance_top_k < 1:
            raise ValueError(f"`guidance_top_k` must be >= 1, got {self.guidance_top_k}.")
        if not self.use_task_reward and self.guidance == "none":
            raise ValueError(
                "`use_task_reward=False` with `guidance='none'` leaves nothing to train: enable the task reward or "
                "choose a guidance mode."
            )

    @property
    def guidance_needs_teacher(self) -> bool:
        return self.guidance != "none"


def _mapping_from_json(name: str, value):
    """A per-teacher field given as JSON on the command line (`'{"math": ..., "code": ...}'`, alone or as the one item
    of a list) as a mapping; a mapping (from Python or YAML) is checked; any other value is returned as it is."""
    text = value[0] if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) else value
    if isinstance(text, str) and text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` looks like a JSON mapping from teacher id to value but does not parse: "
                             f"{error} (in {text!r}).") from error
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"`{name}` is an empty mapping: give at least one teacher id.")
        bad = [key for key, item in value.items() if not isinstance(key, str)
               or not (isinstance(item, str) or name == "teacher_server_url" and isinstance(item, list))]
        if bad:
            raise ValueError(f"`{name}` maps teacher ids to values, but {bad} do not map a string id to a string"
                             + (" or a list of URLs" if name == "teacher_server_url" else "") + ".")
    return value
