"""The model card of a distilled student: what it was distilled from, how, and from which student and data.

TRL's card (`trl.trainer.utils.generate_model_card`) names one base model and links it on the Hub, which for a local
student reads "fine-tuned version of [None]". A distilled model's card must also name its teacher (many teacher
licences require it) and the guidance that carried the teacher's signal, so TGPO renders its own template with TRL's
framework fields and badges.
"""

import os
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import version

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id


GUIDANCE_DESCRIPTIONS = {
    "tgpo": "cross-entropy to the teacher's argmax, `-log p_s(argmax p_T)` (TGPO)",
    "tgpo_sample": "cross-entropy to a token sampled from the teacher (TGPO-MC)",
    "tgpo_topk": "forward KL from the teacher's renormalised top-k to the student (soft TGPO)",
    "rkl_topk": "reverse KL on the teacher's top-k (ablation)",
    "rkl_k3": "k3 reverse-KL estimate at the sampled token (ablation)",
    "kdrl": "k2 penalty `0.5 (log p_s - log p_T)^2` at the sampled token (KDRL)",
    "opd": "reverse-KL on-policy distillation, per-token advantage `lambda_k (log p_T - log p_old)`",
    "none": "none: plain GRPO",
}


def hub_repo_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id and is not a local path, else None (nothing to link to)."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def reference(name: str | None, kind: str, what: str) -> str:
    """Markdown for a model or dataset: a Hub link for a Hub id, the path in code for a local one."""
    repo_id = hub_repo_id(name)
    if repo_id is not None:
        prefix = "datasets/" if kind == "dataset" else ""
        return f"[{repo_id}](https://huggingface.co/{prefix}{repo_id})"
    if name:
        return f"the local {what} `{name}`"
    return f"a {what} built in memory (no name or path)"


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher came from: its Hub id or path, and the revision it was loaded at, when known."""

    name_or_path: str | None
    revision: str | None = None

    @classmethod
    def of(cls, teacher, name_or_path: str | None, revision: str | None) -> "TeacherSource":
        """From the configured path (when the trainer loaded the teacher) or from the model object itself."""
        if name_or_path is None:
            name_or_path = getattr(teacher.config, "_name_or_path", None) or None
        commit = getattr(teacher.config, "_commit_hash", None)
        return cls(name_or_path, revision if revision is not None else commit)


def _teacher_text(teacher: TeacherSource) -> str:
    return reference(teacher.name_or_path, "model", "model") + (f" at revision `{teacher.revision}`"
                                                                if teacher.revision else "")


def distillation_rows(args, teacher: "TeacherSource | dict[str, TeacherSource] | None", student_name: str | None,
                      dataset_name: str | None):
    """The card's "Distillation" table: `(name, value)` rows, in Markdown. `teacher`: one, or several by id."""
    if teacher is None:
        rows = [("Teacher", "none")]
    elif isinstance(teacher, dict):
        rows = [(f"Teacher `{name}`", _teacher_text(source)) for name, source in teacher.items()]
        routing = f"each prompt scored by the teacher its `{args.teacher_id_column}` column names"
        rows.append(("Routing (`teacher_id_column`)", routing))
    else:
        rows = [("Teacher", _teacher_text(teacher))]
    rows.append(("Student it was trained from", reference(student_name, "model", "model")))
    rows.append(("Guidance (`guidance`)", f"`{args.guidance}`: {GUIDANCE_DESCRIPTIONS[args.guidance]}"))
    if args.guidance != "none":
        rows.append(("`lambda_0` (`guidance_coef`)", f"{args.guidance_coef:g}"))
        if args.guidance_schedule == "linear":
            schedule = (f"`linear`: `lambda_k = lambda_0 * max(0, 1 - (k - 1) / D)`, `D` = {args.guidance_decay_steps} "
                        "optimizer steps")
        else:
            schedule = "`constant`: `lambda_k = lambda_0`"
        rows.append(("Schedule (`guidance_schedule`)", schedule))
    if args.guidance in ("tgpo_topk", "rkl_topk"):
        rows.append(("Teacher top-k (`guidance_top_k`)", str(args.guidance_top_k)))
    rows.append(("Task reward (`use_task_reward`)", "GRPO policy term with the reward functions" if args.use_task_reward
                 else "off: the guidance alone (pure distillation)"))
    rows.append(("Dataset", reference(dataset_name, "dataset", "dataset") if dataset_name else "not recorded"))
    return rows


def generate_tgpo_model_card(
    *,
    args,
    teacher: "TeacherSource | dict[str, TeacherSource] | None",
    student_name: str | None,
    model_name: str | None,
    hub_model_id: str | None,
    dataset_name: str | None,
    tags: list[str],
    paper: dict,
    trainer_name: str,
    wandb_url: str | None = None,
    trackio_url: str | None = None,
    comet_url: str | None = None,
) -> ModelCard:
    """Render `templates/model_card.md`. Hub metadata links only what is on the Hub (a local student or dataset is
    described, not linked)."""
    base_model = hub_repo_id(student_name)
    hub_dataset = hub_repo_id(dataset_name)
    card_data = ModelCardData(
        base_model=base_model,
        datasets=hub_dataset,
        library_name="transformers",
        licence="license",
        model_name=model_name,
        tags=["generated_from_trainer", *tags],
    )
    teacher_ref = notice = None
    if isinstance(teacher, dict):
        refs = [reference(source.name_or_path, "model", "model") for source in teacher.values()]
        named = [f"`{name}` ({ref})" for name, ref in zip(teacher, refs, strict=True)]
        teacher_ref = (f"the teachers {', '.join(named[:-1])} and {named[-1]}, each prompt scored by its own (the "
                       f"`{args.teacher_id_column}` column)")
        notice = (f"The teachers' outputs shaped this model: check the licences of {', '.join(refs)}, some licences "
                  "require naming the model a derivative was trained from, or restrict its use.")
    elif teacher is not None:
        teacher_ref = "the teacher " + reference(teacher.name_or_path, "model", "model")
        notice = (f"The teacher's outputs shaped this model: check the licence of {teacher_ref[len('the teacher '):]}, "
                  "some licences require naming the model a derivative was trained from, or restrict its use.")
    template = resources.files("tgpo_trl").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        teacher_ref=teacher_ref,
        teacher_notice=notice,
        student_ref=reference(student_name, "model", "model"),
        dataset_ref=reference(dataset_name, "dataset", "dataset") if dataset_name else None,
        model_location=hub_model_id or args.output_dir,
        distillation=distillation_rows(args, teacher, student_name, dataset_name),
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        comet_url=comet_url,
        trainer_name=trainer_name,
        trainer_citation=paper["citation"],
        paper_title=paper["title"],
        paper_id=paper["id"],
        tgpo_trl_version=version("tgpo_trl"),
        trl_version=version("trl"),
        transformers_version=version("transformers"),
        pytorch_version=version("torch"),
        datasets_version=version("datasets"),
        tokenizers_version=version("tokenizers"),
    )
