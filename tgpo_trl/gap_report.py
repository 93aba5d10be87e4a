"""
The gap report: measure a student-teacher pair with a built `TGPOTrainer`, before training, and say which method fits
(docs/gap_report.md).

    from tgpo_trl.gap_report import GapReportOptions, measure_gap

    report = measure_gap(trainer, dataset, GapReportOptions(gap_num_prompts=64))  # None on processes but the main one
    print(report.verdict["text"])
    report.write("outputs/gap-report")  # gap_report.json, gap_report.md, two PNG plots

What is measured, on the student's own rollouts sampled as training would sample them (the run's temperature,
`num_generations` per prompt, GRPO's own generation): per completion token, the statistics of `tgpo_trl.gap` (reverse
KL, mismatch and off-support ratios, the guidance loss TGPO would start from, the teacher's confidence, the top-k overlap
and shared mass), each as a mean, a distribution and along the completion; per sequence, the student's accuracy under
the run's reward functions, and the teacher's and the student's accuracy when each greedily finishes the same student
prefixes. The teacher is scored by the trainer's own `score_with_teacher` (shared vocabulary or cross-tokenizer, under
the run's `cross_tokenizer_targets`). Under `accelerate launch` each process measures a shard of the prompts and the
main process gathers them. `tgpo gap-report` / `scripts/gap_report.py` are this module behind a parser.
"""

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import gap as G
from .alignment import render_prompt
from .lm_head import recorded_chunk_inputs

REPORT_JSON, REPORT_MD = "gap_report.json", "gap_report.md"
PLOT_LOG_RATIO, PLOT_POSITIONS = "gap_log_ratio_histogram.png", "gap_by_position.png"


@dataclass
class GapReportOptions:
    """What the gap report measures. The names are the `tgpo gap-report` flags and YAML keys."""

    gap_num_prompts: int = field(
        default=128, metadata={"help": "Prompts measured (the first ones of the train split), across all processes."})
    gap_prompts_per_batch: int = field(
        default=4, metadata={"help": "Prompts per generation batch on each process (each with num_generations "
                             "rollouts); bounds the memory."})
    gap_prefix_fractions: list[float] = field(
        default_factory=lambda: list(G.PREFIX_FRACTIONS),
        metadata={"help": "Where rollouts are cut for the prefix test (fractions of their tokens, in (0, 1)). With a "
                  "teacher of another tokenizer and cross_tokenizer_targets='continuation', each cut moves back to "
                  "the nearest start of a teacher token."})
    gap_prefix_rollouts: int = field(
        default=1, metadata={"help": "Rollouts per prompt the teacher and the student finish from each cut."})
    gap_prefix_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Greedy tokens allowed after a cut (default: max_completion_length)."})
    gap_correct_reward: float = field(
        default=1.0, metadata={"help": "A completion counts as correct when its weighted reward is at least this."})

    def __post_init__(self):
        for name in ("gap_num_prompts", "gap_prompts_per_batch", "gap_prefix_rollouts"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.gap_prefix_max_new_tokens is not None and self.gap_prefix_max_new_tokens < 1:
            raise ValueError(f"`gap_prefix_max_new_tokens` must be >= 1, got {self.gap_prefix_max_new_tokens}.")
        bad = [f for f in self.gap_prefix_fractions if not 0.0 < f < 1.0]
        if bad or not self.gap_prefix_fractions:
            raise ValueError(f"`gap_prefix_fractions` must be fractions in (0, 1), got {self.gap_prefix_fractions}.")
        if not math.isfinite(self.gap_correct_reward):
            raise ValueError(f"`gap_correct_reward` must be finite, got {self.gap_correct_reward}.")


@dataclass
class GapReport:
    """The measured report: `data` is what `gap_report.json` holds (the means at the top level, `verdict`,
    `distributions`, `settings`); `report[key]` reads it."""

    data: dict[str, Any]

    def __getitem__(self, key: str):
        return self.data[key]

    @property
    def verdict(self) -> dict[str, Any]:
        return self.data["verdict"]

    def markdown(self, plots: list[str] = ()) -> str:
        return render_markdown(self.data, list(plots))

    def write(self, output_dir: str | Path) -> list[Path]:
        """Write `gap_report.json`, the two PNG plots (when matplotlib is installed) and `gap_report.md`; their paths."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_JSON).write_text(json.dumps(self.data, indent=1))
        plots = write_plots(self.data, out)
        (out / REPORT_MD).write_text(self.markdown([p.name for p in plots]))
        return [out / REPORT_JSON, out / REPORT_MD, *plots]


def measure_gap(trainer, dataset=None, options: GapReportOptions | None = None) -> "GapReport | RoutedGapReport | None":
    """
    Measure the gap between `trainer`'s student and teacher on the first `options.gap_num_prompts` prompts of `dataset`
    (default: the trainer's train dataset; a streamed one is read that far), as a run with the trainer's settings would
    sample them, and return the report on the main process (`None` on the others: call it on every process, as every
    process generates). Nothing is trained; the student is left in eval mode. With several teachers, each is measured
    on the first `gap_num_prompts` of the prompts routed to it, and a `RoutedGapReport` holds a report per teacher.
    """
    from accelerate.utils import gather_object

    options = options or GapReportOptions()
    if trainer.teachers.routed:
        return _measure_each_teacher(trainer, dataset, options)
    if trainer.teacher_model is None:
        raise ValueError("The gap report needs the teacher in process (it continues the student's prefixes with it): "
                         "build the trainer with one (`teacher_model` or `teacher_model_name_or_path`); a served teacher "
                         "(`teacher_server_url`) cannot be measured.")
    dataset = first_prompts(trainer.train_dataset if dataset is None else dataset, options.gap_num_prompts)
    accelerator = trainer.accelerator
    trainer.model.eval()
    torch.manual_seed(trainer.args.seed + accelerator.process_index)
    rows, real = shard(dataset, accelerator.num_processes, accelerator.process_index, options.gap_prompts_per_batch)
    measurement = Measurement(trainer, options)
    started = time.perf_counter()
    measurement.run(rows, real, progress=accelerator.is_main_process)
    states = gather_object([measurement.state()])
    if not accelerator.is_main_process:
        return None
    return GapReport(assemble(states, trainer, options, time.perf_counter() - started))


@dataclass
class RoutedGapReport:
    """The gap report of a run with several teachers: one `GapReport` per teacher, each measured on the prompts routed
    to it; `verdict` holds each teacher's."""

    column: str
    reports: dict[str, GapReport]

    def __getitem__(self, name: str) -> GapReport:
        return self.reports[name]

    @property
    def verdict(self) -> dict[str, Any]:
        verdicts = {name: report.verdict for name, report in self.reports.items()}
        text = "\n".join(f"teacher {name!r}: {verdict['text']}" for name, verdict in verdicts.items())
        return {"teachers": verdicts, "text": text}

    @property
    def data(self) -> dict[str, Any]:
        return {"teacher_id_column": self.column, "teachers": {name: report.data for name, report in
                                                               self.reports.items()}}

    def write(self, output_dir: str | Path) -> list[Path]:
        """Each teacher's report in `<output_dir>/<teacher id>/`, and beside them `gap_report.json` (every teacher's
        data under `teachers`) and `gap_report.md` (each teacher's verdict, linking its report)."""
        out = Path(output_dir)
        paths = [path for name, report in self.reports.items() for path in report.write(out / name)]
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_JSON).write_text(json.dumps(self.data, indent=1))
        lines = ["# Gap report: one per teacher", "",
                 f"Each teacher measured on the prompts its `{self.column}` column routes to it.", "",
                 "| teacher | prompts | verdict |", "|---|---|---|"]
        lines += [f"| [{name}]({name}/{REPORT_MD}) | {report['settings']['prompts']} | {report.verdict['text']} |"
                  for name, report in self.reports.items()]
        (out / REPORT_MD).write_text("\n".join(lines) + "\n")
        return [out / REPORT_JSON, out / REPORT_MD, *paths]


def _measure_each_teacher(trainer, dataset, options: GapReportOptions) -> RoutedGapReport | None:
    """Several teachers: each measured alone (`trainer.teacher_view`) on the first `gap_num_prompts` of its own
    prompts."""
    column = trainer.args.teacher_id_column
    dataset = trainer.train_dataset if dataset is None else dataset
    reports = {}
    for name in trainer.teachers.names:
        own = dataset.filter(lambda row, name=name: row[column] == name)
        with trainer.teacher_view(name):
            reports[name] = measure_gap(trainer, own, options)
    return RoutedGapReport(column, reports) if trainer.accelerator.is_main_process else None


def first_prompts(dataset, count: int):
    """The first `count` rows of a dataset (a streamed one is read that far)."""
    from datasets import Dataset, IterableDataset

    if isinstance(dataset, IterableDataset):
        return Dataset.from_list(list(dataset.take(count)))
    return dataset.select(range(min(count, len(dataset)))) if len(dataset) > count else dataset


# ------------------------------------------------------------------ measuring


class _CapturedRewards:
    """Wraps the trainer's `_calculate_rewards` (the run's reward functions, gathered over processes) to keep its
    result, so GRPO's own reward call inside generation is the one the accuracy is read from."""

    def __init__(self, trainer):
        self.trainer, self.original, self.last = trainer, trainer._calculate_rewards, None

    def __call__(self, *args, **kwargs):
        self.last = self.original(*args, **kwargs)
        return self.last

    def __enter__(self):
        self.trainer._calculate_rewards = self
        return self

    def __exit__(self, *exc):
        del self.trainer._calculate_rewards  # back to the class's method


def correct(trainer, rewards_per_func: torch.Tensor, threshold: float) -> torch.Tensor:
    """This process's rows of the gathered rewards, weighted as GRPO weights them, compared with `threshold`."""
    n = rewards_per_func.size(0) // trainer.accelerator.num_processes
    local = rewards_per_func[trainer.accelerator.process_index * n : (trainer.accelerator.process_index + 1) * n]
    weighted = (local * trainer.reward_weights.to(local.device).unsqueeze(0)).nansum(dim=1)
    return weighted >= threshold


def _greedy(model, prefixes: list[list[int]], pad_id: int, eos_ids: list[int], max_new_tokens: int, batch_size: int,
            synced_gpus: bool) -> list[list[int]]:
    """Greedy continuations of token-id prefixes (left padded), cut after the first end of turn (kept)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prefixes), batch_size):
        rows = prefixes[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids,
                                   synced_gpus=synced_gpus, temperature=None, top_p=None, top_k=None)
        for row in generated[:, width:].tolist():
            cut = next((i for i, token in enumerate(row) if token in eos_ids), None)
            out.append(row[: cut + 1] if cut is not None else row)
    return out


# The inputs that run along a row's tokens (cut with its prefix); the others belong to its images
_SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def _greedy_with_images(model, inputs: dict, head: int, pad_id: int, eos_ids: list[int], max_new_tokens: int,
                        synced_gpus: bool) -> list[int]:
    """The greedy continuation of one row with images: its prompt (as GRPO padded it), the first `head` tokens of its
    completion, and its image inputs; cut after the first end of turn (kept)."""
    device = next(model.parameters()).device
    cut = inputs["prompt_width"] + head
    kwargs = {key: (value[:, :cut] if key in _SEQUENCE_INPUTS else value).to(device)
              for key, value in inputs.items() if key != "prompt_width" and torch.is_tensor(value)}
    generated = model.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                               eos_token_id=eos_ids, synced_gpus=synced_gpus, temperature=None, top_p=None,
                               top_k=None)[0, cut:].tolist()
    end = next((i for i, token in enumerate(generated) if token in eos_ids), None)
    return generated[: end + 1] if end is not None else generated


class Measurement:
    """Runs the measurement of one process's shard with a built trainer."""

    def __init__(self, trainer, options: GapReportOptions):
        self.trainer, self.args = trainer, options
        self.accelerator = trainer.accelerator
        self.tokenizer = trainer._tokenizer
        self.cross = trainer.teacher_scoring.cross_tokenizer
        # Continuation targets come from the teacher's prediction where its token starts: the prefix test measures the
        # teacher there, cutting at the nearest start of a teacher token (docs/gap_report.md, "Another tokenizer")
        self.cut_at_teacher_tokens = self.cross and trainer.args.cross_tokenizer_targets == "continuation"
        self.top_k = trainer.args.guidance_top_k
        self.fractions = [float(f) for f in options.gap_prefix_fractions]
        self.max_new_tokens = options.gap_prefix_max_new_tokens or trainer.args.max_completion_length
        self.accumulator = G.GapAccumulator()
        self.correct_rollouts = self.rollouts = self.prompts = 0
        self.prefix_correct = {role: {f: 0 for f in self.fractions} for role in ("teacher", "student")}
        self.prefix_total = 0
        deepspeed_plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        self.synced_gpus = bool(deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3)

    def run(self, rows: list[dict], real: list[bool], progress: bool) -> None:
        per_batch = self.args.gap_prompts_per_batch
        self.prompts += sum(real)
        batches = range(0, len(rows), per_batch)
        for start in tqdm(batches, desc="gap report", disable=not progress):
            self.measure_batch(rows[start : start + per_batch], real[start : start + per_batch])

    def measure_batch(self, prompts: list[dict], real: list[bool]) -> None:
        trainer = self.trainer
        num_generations = trainer.num_generations_eval  # the trainer runs in eval mode: no dropout
        inputs = [dict(row) for row in prompts for _ in range(num_generations)]
        keep = torch.tensor([flag for flag in real for _ in range(num_generations)], dtype=torch.bool)
        guidance = trainer.guidance
        trainer.guidance = "tgpo_topk"  # so that `score_with_teacher` keeps the teacher's top-k (nothing is trained)
        try:
            with _CapturedRewards(trainer) as rewards:
                output = trainer._generate_and_score_completions(inputs)
        finally:
            trainer.guidance = guidance
        device = output["completion_ids"].device
        keep = keep.to(device)
        ok = correct(trainer, rewards.last, self.args.gap_correct_reward)
        self.correct_rollouts += int((ok & keep).sum())
        self.rollouts += int(keep.sum())

        completion_ids, completion_mask = output["completion_ids"], trainer._loss_mask(output)
        target_ids = torch.cat([output["teacher_argmax"].unsqueeze(-1), output["teacher_topk_ids"]], dim=-1)
        model = self.accelerator.unwrap_model(trainer.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        student = G.student_statistics(
            model, output["prompt_ids"], output["prompt_mask"], completion_ids, completion_mask, target_ids,
            trainer.temperature, self.top_k, trainer._forward_batch_size,
            forward=trainer._get_per_token_logps_and_entropies, image_inputs=trainer._image_inputs(output),
        )
        teacher = {key: value for key, value in output.items() if key.startswith("teacher_")}
        stats = G.token_gap(completion_ids, completion_mask, teacher, student.logps, student.target_logps[..., 0],
                            student.target_logps[..., 1:], student.topk_ids)
        rows = keep.nonzero().squeeze(-1)
        self.accumulator.update({name: (v[rows], m[rows]) for name, (v, m) in stats.items()}, completion_mask[rows])
        self.measure_prefixes(inputs, output, keep, num_generations)

    def measure_prefixes(self, inputs, output, keep, num_generations) -> None:
        """The teacher and the student each greedily finish the same student prefixes; scored by the run's rewards.
        With images, each sees them as it saw them when scored (the teacher not with `teacher_without_images`)."""
        trainer = self.trainer
        picked = [i for i in range(len(inputs)) if i % num_generations < self.args.gap_prefix_rollouts]
        index = torch.tensor(picked, device=output["completion_ids"].device)
        row_inputs = self.row_inputs(output, picked)
        completion_ids, completion_mask = output["completion_ids"][index], output["completion_mask"][index]
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(output["prompt_ids"][index], output["prompt_mask"][index],
                                                              strict=True)]
        rows = [ids[: int(n)] for ids, n in zip(completion_ids.tolist(), completion_mask.sum(-1).tolist(), strict=True)]
        examples = [inputs[i] for i in picked]
        kept = keep[index]
        self.prefix_total += int(kept.sum())
        teacher_starts = None
        if self.cut_at_teacher_tokens:
            alignment = trainer.teacher_scoring.alignment
            teacher_starts = alignment.teacher_batch([example["prompt"] for example in examples], completion_ids,
                                                     completion_mask).sync_index >= 0
        for fraction in self.fractions:
            cuts = G.prefix_lengths(completion_ids, completion_mask, trainer.eos_token_ids, fraction)
            if teacher_starts is not None:
                cuts = G.back_to_teacher_token_starts(cuts, teacher_starts)
            heads = [[t for t in row if t not in trainer.eos_token_ids][:cut] for row, cut in zip(rows, cuts, strict=True)]
            for role in ("teacher", "student"):
                texts, ids = self.finish(role, examples, prompt_ids, heads, row_inputs)
                prompts = [example["prompt"] for example in examples]
                if prompts and not isinstance(prompts[0], str):
                    completions = [[{"role": "assistant", "content": text}] for text in texts]
                else:
                    completions = texts
                rewards = trainer._calculate_rewards(examples, prompts, completions, ids)
                ok = correct(trainer, rewards, self.args.gap_correct_reward)
                self.prefix_correct[role][fraction] += int((ok & kept).sum())

    def row_inputs(self, output, rows: list[int]) -> list[dict] | None:
        """The image rows' own inputs (prompt ids, attention mask, their image inputs), split off the batch by GRPO's
        chunked forward in chunks of one row; None for a batch without images."""
        trainer = self.trainer
        image_inputs = trainer._image_inputs(output)
        if image_inputs is None:
            return None
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with recorded_chunk_inputs(trainer.model) as chunks:
            trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, output["completion_ids"].size(1),
                                                       batch_size=1, **image_inputs)
        prompt_width = output["prompt_ids"].size(1)
        return [{**chunks[row], "prompt_width": prompt_width} for row in rows]

    def finish(self, role, examples, prompt_ids, heads, row_inputs=None) -> tuple[list[str], list[list[int]]]:
        """Completion texts (prefix + greedy continuation) and their student ids. `row_inputs`: each row's own inputs
        with its images (`row_inputs()`), for a batch with images."""
        trainer = self.trainer
        tokenizer = self.tokenizer
        with_images = row_inputs is not None and (role == "student" or not trainer.args.teacher_without_images)
        if role == "student" or not self.cross:
            # A shared vocabulary: both models continue the student's own ids; with images, each row from its own
            # inputs cut after the prefix (a teacher allowed the images shares the student's processor)
            if role == "student":
                from trl.models.utils import unwrap_model_for_generation

                context = unwrap_model_for_generation(trainer.model_wrapped, self.accelerator,
                                                      gather_deepspeed3_params=trainer.args.ds3_gather_for_generation)
            else:
                context = nullcontext(self.accelerator.unwrap_model(trainer.teacher_model))
            with context as model, torch.no_grad():
                if with_images:
                    continuations = [
                        _greedy_with_images(model, inputs, len(head), tokenizer.pad_token_id,
                                            list(trainer.eos_token_ids), self.max_new_tokens, self.synced_gpus)
                        for inputs, head in zip(row_inputs, heads, strict=True)
                    ]
                else:
                    continuations = _greedy(model, [p + h for p, h in zip(prompt_ids, heads, strict=True)],
                                            tokenizer.pad_token_id, list(trainer.eos_token_ids), self.max_new_tokens,
                                            trainer._forward_batch_size, self.synced_gpus)
            ids = [h + c for h, c in zip(heads, continuations, strict=True)]
            return tokenizer.batch_decode(ids, skip_special_tokens=True), ids
        # Another tokenizer: the teacher reads the prompt rendered its way and the prefix's text in its own tokens
        alignment = trainer.teacher_scoring.alignment
        teacher_tokenizer = alignment.teacher_tokenizer
        head_texts = [alignment.student.text(head) for head in heads]
        prefixes = []
        for example, text in zip(examples, head_texts, strict=True):
            prompt = example["prompt"]
            rendered = render_prompt(teacher_tokenizer, prompt)
            prompt_part = teacher_tokenizer(rendered, add_special_tokens=isinstance(prompt, str))["input_ids"]
            prefixes.append(prompt_part + (teacher_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []))
        ends = [i for i in {alignment.teacher_end[True], alignment.teacher_end[False]} if i is not None]
        model = self.accelerator.unwrap_model(trainer.teacher_model)
        with torch.no_grad():
            continuations = _greedy(model, prefixes, alignment.teacher_pad, ends, self.max_new_tokens,
                                    trainer._forward_batch_size, self.synced_gpus)
        texts = [head + teacher_tokenizer.decode(c, skip_special_tokens=True)
                 for head, c in zip(head_texts, continuations, strict=True)]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        return texts, ids

    def state(self) -> dict:
        return {"accumulator": self.accumulator.state(), "correct_rollouts": self.correct_rollouts,
                "rollouts": self.rollouts, "prompts": self.prompts, "prefix_correct": self.prefix_correct,
                "prefix_total": self.prefix_total}


def shard(dataset, num_processes: int, process_index: int, per_batch: int) -> tuple[list[dict], list[bool]]:
    """This process's contiguous share of the prompts, padded (with its last prompt, marked not real) to the same
    number of generation batches on every process, since generation and rewards are collective calls."""
    rows = [dataset[i] for i in range(len(dataset))]
    size = math.ceil(len(rows) / num_processes)
    mine = rows[process_index * size : (process_index + 1) * size]
    target = math.ceil(size / per_batch) * per_batch
    filler = mine[-1] if mine else rows[-1]
    return mine + [filler] * (target - len(mine)), [True] * len(mine) + [False] * (target - len(mine))


def assemble(states: list[dict], trainer, options: GapReportOptions, seconds: float) -> dict:
    """The report from every process's state: means at the top level, distributions beside them, and the verdict."""
    accumulator = G.GapAccumulator.merge([s["accumulator"] for s in states])
    rollouts = sum(s["rollouts"] for s in states)
    prefix_total = sum(s["prefix_total"] for s in states)
    fractions = [float(f) for f in options.gap_prefix_fractions]
    prefix = {role: {str(f): sum(s["prefix_correct"][role][f] for s in states) / max(1, prefix_total)
                     for f in fractions} for role in ("teacher", "student")}
    args = trainer.args
    report = {name: accumulator.mean(name) for name in G.TOKEN_METRICS}
    report.update({
        "aligned_ratio": accumulator.aligned_ratio,
        "student_accuracy": sum(s["correct_rollouts"] for s in states) / max(1, rollouts),
        "teacher_prefix_accuracy": prefix["teacher"],
        "student_prefix_accuracy": prefix["student"],
    })
    cross = trainer.teacher_scoring.cross_tokenizer
    targets = args.cross_tokenizer_targets if cross else None
    report["verdict"] = G.gap_verdict(report, args.guidance_coef, cross_tokenizer_targets=targets)
    report["distributions"] = {name: accumulator.summary(name) for name in G.TOKEN_METRICS}
    report["settings"] = {
        "student": get_name(trainer.model), "teacher": trainer.teacher_source.name_or_path if trainer.teacher_source else None,
        "cross_tokenizer": cross, "cross_tokenizer_targets": targets,
        "prefix_cuts": "teacher_token_starts" if targets == "continuation" else "student_tokens",
        "prompts": sum(s["prompts"] for s in states),
        "rollouts": rollouts, "rollouts_per_prompt": trainer.num_generations_eval,
        "completion_tokens": accumulator.completion_tokens, "temperature": args.temperature,
        "max_completion_length": args.max_completion_length, "top_k": args.guidance_top_k,
        "reward_funcs": list(trainer.reward_func_names), "correct_reward": options.gap_correct_reward,
        "prefix_fractions": fractions, "prefix_rollouts": prefix_total,
        "prefix_max_new_tokens": options.gap_prefix_max_new_tokens or args.max_completion_length,
        "guidance": args.guidance, "guidance_coef": args.guidance_coef, "processes": trainer.accelerator.num_processes,
        "seconds": round(seconds, 1), "negative_feedback_nats": G.NEGATIVE_FEEDBACK_NATS,
    }
    return report


def get_name(model) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__


# ------------------------------------------------------------------ writing


LABELS = {
    "reverse_kl": "reverse KL `log p_s(y_t) - log p_T(y_t)` (nats)", "mismatch_ratio": "mismatch `argmax p_T != y_t`",
    "off_support_ratio": "off support `y_t not in top-k(p_T)`", "guidance_loss": "guidance loss `-log p_s(argmax p_T)`",
    "teacher_confidence": "teacher confidence `max p_T`", "topk_overlap": "top-k overlap",
    "shared_mass": "shared mass on the teacher's top-k", "negative_feedback": f"share with `r_t > {G.NEGATIVE_FEEDBACK_NATS:g}`",
}


def render_markdown(report: dict, plots: list[str]) -> str:
    s = report["settings"]
    lines = [
        "# Gap report", "",
        f"Student `{s['student']}`, teacher `{s['teacher']}`"
        + (f" (another tokenizer: cross-tokenizer scoring, `cross_tokenizer_targets={s['cross_tokenizer_targets']}`)"
           if s["cross_tokenizer"] else "") + ".",
        (f"{s['prompts']} prompts x {s['rollouts_per_prompt']} rollouts at temperature {s['temperature']} "
        f"(max {s['max_completion_length']} tokens), {s['completion_tokens']} completion tokens; top-k {s['top_k']}; "
        f"{s['processes']} process(es), {s['seconds']} s."), "",
        "## Verdict", "", report["verdict"]["text"], "",
        f"Suggested: `guidance={report['verdict']['suggested_guidance']}`"
        + (f", `guidance_coef={report['verdict']['suggested_guidance_coef']:g}`"
           if report["verdict"]["suggested_guidance_coef"] is not None else "") + ".", "",
        "## Token level (student's rollouts)", "",
        "| statistic | mean | p5 | p25 | median | p75 | p95 | first 10% | last 10% | tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in G.TOKEN_METRICS:
        d = report["distributions"][name]
        binary = name in G.BINARY_METRICS  # 0/1 per token: the quantiles of its per-completion share say more
        q = d["sequence_quantiles"] if binary else d["quantiles"]
        pos = d["by_position"]
        lines.append(f"| {LABELS[name]}{' *' if binary else ''} | {_f(d['mean'])} | "
                     + " | ".join(_f(q.get(str(p))) for p in G.QUANTILES)
                     + f" | {_f(pos[0])} | {_f(pos[-1])} | {d['tokens']} |")
    lines += ["", f"`gap/aligned_ratio` (completion tokens with a teacher target): {_f(report['aligned_ratio'])}.", "",
              ("Quantiles are read off fixed-width histogram bins (their centre). * A 0/1 statistic: its quantiles are "
              "those of its share per completion."), "",
              "## Sequence level", "",
              (f"Student accuracy on its own rollouts (weighted reward >= {s['correct_reward']:g}, rewards "
              f"{', '.join(s['reward_funcs'])}): {report['student_accuracy']:.1%}."), "",
              (f"From the same student prefixes ({s['prefix_rollouts']} rollouts, cut after a share of their tokens"
              + (", then back to the nearest start of a teacher token" if s["prefix_cuts"] == "teacher_token_starts"
                 else "") + f", greedy, at most {s['prefix_max_new_tokens']} new tokens):"), "",
              "| cut | teacher finishes | student finishes |", "|---|---|---|"]
    for key in report["teacher_prefix_accuracy"]:
        lines.append(f"| {float(key):.0%} | {report['teacher_prefix_accuracy'][key]:.1%} | "
                     f"{report['student_prefix_accuracy'][key]:.1%} |")
    lines += ["", "## Along the completion (mean per tenth of the completion)", "",
              "| statistic | " + " | ".join(f"{10 * i}-{10 * (i + 1)}%" for i in range(G.POSITION_BINS)) + " |",
              "|---|" + "---|" * G.POSITION_BINS]
    for name in G.TOKEN_METRICS:
        lines.append(f"| {name} | " + " | ".join(_f(v) for v in report["distributions"][name]["by_position"]) + " |")
    lines += ["", *[f"![{p}]({p})" for p in plots], "",
              "Thresholds (docs/gap_report.md says where they come from): "
              + ", ".join(f"{k}={v}" for k, v in report["verdict"]["thresholds"].items()) + "."]
    return "\n".join(lines) + "\n"


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def write_plots(report: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("gap report: matplotlib is not installed, no plots written (pip install matplotlib)")
        return []
    d = report["distributions"]["reverse_kl"]
    edges, counts = d["histogram"]["edges"], d["histogram"]["counts"]
    nonzero = [i for i, c in enumerate(counts) if c]
    lo, hi = (nonzero[0], nonzero[-1] + 1) if nonzero else (0, len(counts))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(counts[lo:hi], edges[lo : hi + 1], fill=True)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(G.NEGATIVE_FEEDBACK_NATS, color="r", lw=0.8, ls="--", label=f"r_t = {G.NEGATIVE_FEEDBACK_NATS:g}")
    ax.set_xlabel("log p_s(y_t) - log p_T(y_t)  (nats, per completion token)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Per-token log-ratio (mean {_f(d['mean'])})")
    ax.legend()
    fig.tight_layout()
    paths = [out / PLOT_LOG_RATIO]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [(i + 0.5) / G.POSITION_BINS for i in range(G.POSITION_BINS)]
    for name in ("reverse_kl", "guidance_loss"):
        axes[0].plot(x, _nan(report["distributions"][name]["by_position"]), marker="o", label=name)
    axes[0].set_ylabel("nats per token")
    for name in ("mismatch_ratio", "off_support_ratio", "teacher_confidence", "topk_overlap", "shared_mass"):
        axes[1].plot(x, _nan(report["distributions"][name]["by_position"]), marker="o", label=name)
    axes[1].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("relative position in the completion")
        ax.legend(fontsize=8)
    fig.suptitle("The gap along the completion")
    fig.tight_layout()
    paths.append(out / PLOT_POSITIONS)
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def _nan(values):
    return [math.nan if v is None else v for v in values]

