"""Build and cache the demo's tokenizer, teacher and two students (large gap, small gap), all offline.

Entry point: `build_demo_models`. The models are pretrained with a plain supervised torch loop on the synthetic
task (`task.py`): the demo only needs starting points for RL, and a bare loop has no per-step overhead to pay on
two CPU cores. Builds are cached outside the repository under a key that hashes the settings, so changed
settings rebuild and unchanged ones are reused.
"""

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .evaluate import encode_prompts, evaluate_completions, greedy_completions, pad_rows, teacher_mismatch_ratio
from .models import tiny_llama, tiny_qwen2
from . import product_task
from . import task as sum_task
from .task import MAX_COMPLETION_LENGTH, build_dataset, iter_problems, solution_text
from .tokenizer import build_byte_level_tokenizer, build_char_tokenizer


# Bump when the task, the tokenizer or the training loop changes in a way the settings do not show.
BUILD_VERSION = 1
REPORT_FILE = "build.json"
MODEL_NAMES = ("teacher", "student_large_gap", "student_small_gap")


@dataclass(frozen=True)
class ModelSpec:
    """One model: its architecture and its supervised pretraining (solution `style`, steps, peak lr, seed)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    style: str
    steps: int
    learning_rate: float
    seed: int
    # Fraction of the examples whose completion starts with a prefix in other separators (`reread_prefix`): the
    # model learns to read such prefixes and to continue them in its own style (the loss skips the prefix)
    foreign_prefix_fraction: float = 0.0
    # Fraction of the examples written in the teacher's style instead of `style`: a model that mostly writes its own
    # way but can write the teacher's tokens too (as any language model can, with a low probability)
    teacher_style_fraction: float = 0.0


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines a build; its hash is the cache key."""

    teacher: ModelSpec
    student_large_gap: ModelSpec
    student_small_gap: ModelSpec
    batch_size: int
    eval_size: int
    eval_seed: int
    version: int = BUILD_VERSION

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _student_pair(hidden_size: int, num_layers: int, num_heads: int, steps: int) -> dict[str, ModelSpec]:
    """
    The two students: the same model trained the same way on the same column method, written in other separators
    with 10% of the examples in the teacher's (large gap) or in the teacher's own (small gap). They differ in family,
    not in skill.
    """
    small = ModelSpec(hidden_size, num_layers, num_heads, "teacher", steps=steps, learning_rate=3e-3, seed=2)
    return {"student_small_gap": small,
            "student_large_gap": replace(small, style="commas", teacher_style_fraction=0.1)}


SIZES = {
    # The teacher-style student's accuracy jumps between 200 and 300 steps (to ~50%): 250 keeps it weak. Measured
    # figures: build.json.
    "full": BuildSettings(
        teacher=ModelSpec(128, 4, 4, "teacher", steps=1000, learning_rate=3e-3, seed=0, foreign_prefix_fraction=0.5),
        **_student_pair(64, 2, 4, steps=250),
        batch_size=32,
        eval_size=500,
        eval_seed=0,
    ),
    # For tests: the same pipeline at a fraction of the cost; accuracies are not meaningful.
    "quick": BuildSettings(
        teacher=ModelSpec(32, 2, 2, "teacher", steps=150, learning_rate=3e-3, seed=0, foreign_prefix_fraction=0.5),
        **_student_pair(16, 1, 2, steps=150),
        batch_size=16,
        eval_size=64,
        eval_seed=0,
    ),
}


@dataclass(frozen=True)
class DemoModels:
    """Paths of a built demo (each model directory also holds the tokenizer) and its `build.json` report."""

    root: Path
    tokenizer: Path
    teacher: Path
    student_large_gap: Path
    student_small_gap: Path
    report: dict


def default_cache_dir() -> Path:
    """`$TGPO_DEMO_CACHE`, else `~/.cache/tgpo_trl/demo`."""
    return Path(os.environ.get("TGPO_DEMO_CACHE", Path.home() / ".cache" / "tgpo_trl" / "demo"))


# Separators a foreign prefix may use instead of `+`, `=` and the line break
FOREIGN_SEPARATORS = ",:;/_ *<>"


def reread_prefix(text: str, rng: random.Random) -> tuple[str, int]:
    """
    `text` with a random prefix rewritten in other separators (each `+`, `=` or line break before the cut replaced by a
    random one of `FOREIGN_SEPARATORS`), and the cut: the number of characters rewritten. Same length, same digits.
    """
    cut = rng.randint(1, len(text) - 1)
    prefix = "".join(rng.choice(FOREIGN_SEPARATORS) if ch in "+=\n" else ch for ch in text[:cut])
    return prefix + text[cut:], cut


def _training_batches(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, batch_size: int, family=sum_task):
    """
    Endless batches of fresh training problems of the task module `family`: left-padded prompt + completion + <eos>,
    loss on the completion (after the rewritten prefix, for the `foreign_prefix_fraction` of the examples that have
    one).
    """
    problems = family.iter_problems(spec.seed, "train")
    rng = random.Random(f"prefixes-{spec.seed}")
    style_rng = random.Random(f"styles-{spec.seed}")
    while True:
        batch = list(islice(problems, batch_size))
        prompt_ids = encode_prompts(tokenizer, [[{"role": "user", "content": p["question"]}] for p in batch])
        prefixes, rests = [], []
        for problem in batch:
            style = "teacher" if style_rng.random() < spec.teacher_style_fraction else spec.style
            text, cut = family.solution_text(problem, style), 0
            if rng.random() < spec.foreign_prefix_fraction:
                text, cut = reread_prefix(text, rng)
            prefixes.append(text[:cut])
            rests.append(text[cut:] + tokenizer.eos_token)
        # The prefix is encoded on its own, so that the loss starts at a token boundary whatever the tokenizer (with
        # the character tokenizer this is the same as encoding the whole text)
        prefix_ids = [ids if prefix else [] for ids, prefix in zip(
            tokenizer(prefixes, add_special_tokens=False)["input_ids"], prefixes, strict=True)]
        rest_ids = tokenizer(rests, add_special_tokens=False)["input_ids"]
        completion_ids = [p + r for p, r in zip(prefix_ids, rest_ids, strict=True)]
        skipped = [len(p) for p in prefix_ids]
        rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
        input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, "left")
        labels = torch.full_like(input_ids, -100)
        for i, (c, cut) in enumerate(zip(completion_ids, skipped, strict=True)):
            labels[i, -len(c) + cut :] = torch.tensor(c[cut:])
        yield input_ids, attention_mask, labels


def _warmup_cosine(steps: int, warmup_fraction: float = 0.05):
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero (converges fast at a high peak lr)."""
    warmup = max(1, int(steps * warmup_fraction))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return multiplier


def train_supervised(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, batch_size: int, progress: bool,
    family=sum_task,
) -> float:
    """Supervised pretraining on `spec.style` solutions of the task module `family` (AdamW, loss on completion
    tokens); returns the last loss."""
    torch.manual_seed(spec.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(spec.steps))
    batches = _training_batches(tokenizer, spec, batch_size, family)
    bar = tqdm(range(spec.steps), desc=f"{spec.style} {spec.hidden_size}x{spec.num_layers}", disable=not progress)
    for _ in bar:
        input_ids, attention_mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return loss.item()


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Train on one thread. Models this small gain little from a second one, and when another process shares the
    two cores, OpenMP threads waiting on each other slow everything down ~30x (quick build: 7 s vs 225 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build(root: Path, settings: BuildSettings, size: str, progress: bool, family=sum_task) -> dict:
    """Train, evaluate and save every model of the task module `family` under `root`; returns the report written to
    `build.json`."""
    started = time.perf_counter()
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    test_set = family.build_dataset(settings.eval_size, settings.eval_seed, "test")
    models, completions, report_models = {}, {}, {}
    for name in MODEL_NAMES:
        spec = getattr(settings, name)
        model_started = time.perf_counter()
        model = tiny_qwen2(tokenizer, spec.hidden_size, spec.num_layers, spec.num_heads, seed=spec.seed)
        final_loss = train_supervised(model, tokenizer, spec, settings.batch_size, progress, family)
        completions[name] = greedy_completions(model, tokenizer, test_set["prompt"], family.MAX_COMPLETION_LENGTH)
        evaluation = evaluate_completions(tokenizer, completions[name], test_set["answer"])
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        models[name] = model
        report_models[name] = {
            "accuracy": evaluation.accuracy,
            "mean_completion_length": evaluation.mean_length,
            "final_train_loss": final_loss,
            "seconds": round(time.perf_counter() - model_started, 1),
        }
    # The gap each student starts RL with: how often the teacher would have written another token.
    for name in ("student_large_gap", "student_small_gap"):
        report_models[name]["teacher_mismatch_ratio"] = teacher_mismatch_ratio(
            models["teacher"], tokenizer, test_set["prompt"], completions[name]
        )
    return {
        "key": settings.key(),
        "size": size,
        "settings": asdict(settings),
        "models": report_models,
        "build_seconds": round(time.perf_counter() - started, 1),
    }


def _build_atomically(root: Path, build) -> None:
    """Run `build(staging)` (which fills a staging directory and returns its report) in a directory renamed into place
    only when complete, so an interrupted build is never mistaken for a cached one (and leaves nothing behind)."""
    staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with _one_torch_thread():
            report = build(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        staging.rename(root)
    except OSError:
        if not (root / REPORT_FILE).exists():
            raise
        # Another process finished the same build first: keep theirs.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# The second task family (`product_task.py`): the same models and training as the column sum's, for longer. At 1000
# steps its teacher reached 76% held-out accuracy; the students' pretraining is calibrated to leave them about as weak
# as the column sum's (250 steps: 1%, 400: 19% on 300 test problems). Measured figures: its build.json.
PRODUCT_SIZES = {
    "full": replace(SIZES["full"], teacher=replace(SIZES["full"].teacher, steps=2000),
                    **_student_pair(64, 2, 4, steps=400)),
    "quick": SIZES["quick"],
}
TASKS = {"column_sum": (sum_task, SIZES), product_task.NAME: (product_task, PRODUCT_SIZES)}


def build_demo_models(
    cache_dir: str | os.PathLike | None = None, size: str = "full", progress: bool = True, task: str = "column_sum"
) -> DemoModels:
    """Return the demo models of `task` (a key of `TASKS`: the demo's "column_sum", or "column_product") for `size`
    ("full" or "quick") from the cache, building them first if needed."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    family, sizes = TASKS[task]
    if size not in sizes:
        raise ValueError(f"Unknown size {size!r}; valid sizes: {', '.join(sizes)}")
    settings = sizes[size]
    # The column sum's directories keep their names from before there was a second task
    name = f"{size}-{settings.key()}" if task == "column_sum" else f"{size}-{task}-{settings.key()}"
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name
    if not (root / REPORT_FILE).exists():
        _build_atomically(root, lambda staging: _build(staging, settings, size, progress, family))
    report = json.loads((root / REPORT_FILE).read_text())
    return DemoModels(root, root / "tokenizer", *(root / name for name in MODEL_NAMES), report=report)


# ---------------------------------------------------------------------------------------------------- another family

# The byte-level BPE of the cross-tokenizer teacher: trained on this many teacher-style solutions (and their prompts)
# with GPT-2's pre-split, as Llama-3's and Qwen's are, so it merges digits and separators into tokens of their own
# (`"17"`, `" 147"`, `"####"`) but not across them. Without the pre-split its merges cross separators (`"+9=18"`,
# `"4\n#### 14"`), and a teacher trained the demo's way on those tokens reached 5% held-out accuracy.
CROSS_TOKENIZER_VOCAB = 600
CROSS_TOKENIZER_CORPUS = 5000
CROSS_TOKENIZER_REGEX_SPLIT = True


def cross_tokenizer_corpus() -> list[str]:
    problems = islice(iter_problems(10_000, "train"), CROSS_TOKENIZER_CORPUS)
    return [text for p in problems for text in (p["question"], solution_text(p, "teacher"))]


def build_cross_tokenizer_teacher(
    cache_dir: str | os.PathLike | None = None, size: str = "full", progress: bool = True
) -> Path:
    """
    The demo's teacher rebuilt as another model family: a Llama with a byte-level BPE tokenizer and ChatML markers,
    the same size and supervised training as the demo teacher (`SIZES[size].teacher`). Inside its multi-digit and
    multi-character tokens the character-level students' tokens start where none of its own does, so guidance reaches
    the students through cross-tokenizer scoring, at the positions both tokenizations share. Cached like
    the demo models, next to them; returns the model directory (the tokenizer is saved beside the weights).
    """
    settings = SIZES[size]
    key = hashlib.sha256(json.dumps({"teacher": asdict(settings.teacher), "vocab": CROSS_TOKENIZER_VOCAB,
                                     "corpus": CROSS_TOKENIZER_CORPUS, "regex_split": CROSS_TOKENIZER_REGEX_SPLIT,
                                     "version": BUILD_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:12]
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{size}-teacher_bpe-{key}"
    if not (root / REPORT_FILE).exists():
        _build_atomically(root, lambda staging: _build_cross_tokenizer_teacher(staging, settings, key, size, progress))
    return root


def _build_cross_tokenizer_teacher(root: Path, settings: BuildSettings, key: str, size: str, progress: bool) -> dict:
    started = time.perf_counter()
    spec = settings.teacher
    tokenizer = build_byte_level_tokenizer(cross_tokenizer_corpus(), CROSS_TOKENIZER_VOCAB, CROSS_TOKENIZER_REGEX_SPLIT)
    model = tiny_llama(tokenizer, spec.hidden_size, spec.num_layers, spec.num_heads, seed=spec.seed)
    final_loss = train_supervised(model, tokenizer, spec, settings.batch_size, progress)
    test_set = build_dataset(settings.eval_size, settings.eval_seed, "test")
    completions = greedy_completions(model, tokenizer, test_set["prompt"], MAX_COMPLETION_LENGTH)
    evaluation = evaluate_completions(tokenizer, completions, test_set["answer"])
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return {"key": key, "size": size, "tokenizer_size": len(tokenizer), "accuracy": evaluation.accuracy,
            "mean_completion_tokens": evaluation.mean_length, "final_train_loss": final_loss,
            "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------------- both families

# A student of both task families for several teachers (`benchmarks/routing.py`): the demo's student architecture,
# pretrained on the two families' problems in a fixed pattern, written the teachers' way (a small gap to each family's
# teacher). Both families' builds use the demo's character tokenizer, so their teachers are reused as they are (the
# build checks that their tokenizers are one). Calibrated to leave it weak on both, as the single-family students
# (greedy accuracy on each build's 500 held-out problems, sum / product): one sum for one product learns the sum first
# (350 steps: 21% / 4%; 450: 44% / 17%; 650: 78% / 56%), one sum for two products the product first (450: 8% / 41%);
# two sums for three products at 400 steps leaves both weak. Measured figures: its build.json.
JOINT_PATTERN = ("column_sum", product_task.NAME, "column_sum", product_task.NAME, product_task.NAME)
JOINT_TASKS = tuple(dict.fromkeys(JOINT_PATTERN))
JOINT_SIZES = {
    "full": ModelSpec(64, 2, 4, "teacher", steps=400, learning_rate=3e-3, seed=2),
    "quick": ModelSpec(16, 1, 2, "teacher", steps=150, learning_rate=3e-3, seed=2),
}


class TaskMixture:
    """A task module (`iter_problems`, `solution_text`, `MAX_COMPLETION_LENGTH`) whose problems follow `pattern`, a
    sequence of `TASKS` names repeated endlessly (`("column_sum", "column_product", "column_product")`: one sum, then
    two products, ...), each problem tagged with its task (`"task"`)."""

    def __init__(self, pattern: tuple[str, ...]):
        unknown = [name for name in pattern if name not in TASKS]
        if unknown or not pattern:
            raise ValueError(f"Unknown tasks {unknown}; valid tasks: {', '.join(TASKS)}")
        self.pattern = tuple(pattern)
        self.MAX_COMPLETION_LENGTH = max(TASKS[name][0].MAX_COMPLETION_LENGTH for name in pattern)

    def iter_problems(self, seed: int, split: str) -> Iterator[dict]:
        streams = {name: TASKS[name][0].iter_problems(seed, split) for name in dict.fromkeys(self.pattern)}
        while True:
            for name in self.pattern:
                yield {**next(streams[name]), "task": name}

    def solution_text(self, problem: dict, style: str) -> str:
        return TASKS[problem["task"]][0].solution_text(problem, style)


@dataclass(frozen=True)
class JointStudent:
    """A built student of several tasks: its directory (tokenizer beside the weights), the shared tokenizer, each task's
    teacher (the task's own demo build) and the `build.json` report (per task: accuracy, and the mismatch ratio of every
    task's teacher on the student's completions)."""

    root: Path
    student: Path
    tokenizer: Path
    teachers: dict
    report: dict


def same_tokenizer(tokenizers: dict) -> None:
    """A `ValueError` unless the tokenizers ({name: tokenizer}) map every token to the same id and share special tokens
    and chat template: a student and teachers scored on each other's ids need one vocabulary."""
    def signature(tokenizer):
        return tokenizer.get_vocab(), tokenizer.all_special_tokens, tokenizer.chat_template

    (first, reference), *others = tokenizers.items()
    for name, tokenizer in others:
        if signature(tokenizer) != signature(reference):
            raise ValueError(f"the tokenizers of {first!r} and {name!r} differ: one student cannot share both teachers' "
                             "vocabulary; build the teachers for a joint tokenizer")


def build_joint_student(
    cache_dir: str | os.PathLike | None = None, size: str = "full", progress: bool = True, pattern=JOINT_PATTERN
) -> JointStudent:
    """Return a student pretrained on the tasks of `pattern` (keys of `TASKS`, in the order and proportions its
    problems follow: `TaskMixture`) in the teachers' writing, for `size` ("full" or "quick"), from the cache, building
    it first if needed; each task's demo models (its teacher) are built too if needed."""
    if size not in JOINT_SIZES:
        raise ValueError(f"Unknown size {size!r}; valid sizes: {', '.join(JOINT_SIZES)}")
    mixture = TaskMixture(tuple(pattern))
    builds = {name: build_demo_models(cache_dir, size, progress, task=name) for name in dict.fromkeys(pattern)}
    same_tokenizer({"student": build_char_tokenizer(),
                    **{name: AutoTokenizer.from_pretrained(build.tokenizer) for name, build in builds.items()}})
    spec, base = JOINT_SIZES[size], SIZES[size]
    settings = {"student": asdict(spec), "pattern": list(mixture.pattern),
                "tasks": {name: build.report["key"] for name, build in builds.items()},
                "batch_size": base.batch_size, "eval_size": base.eval_size, "eval_seed": base.eval_seed,
                "version": BUILD_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{size}-joint-{key}"
    if not (root / REPORT_FILE).exists():
        _build_atomically(root, lambda staging: _build_joint_student(staging, settings, key, size, builds, progress))
    report = json.loads((root / REPORT_FILE).read_text())
    return JointStudent(root, root / "student", root / "tokenizer", {name: build.teacher for name, build in
                                                                       builds.items()}, report)


def _build_joint_student(root: Path, settings: dict, key: str, size: str, builds: dict, progress: bool) -> dict:
    started = time.perf_counter()
    spec = ModelSpec(**settings["student"])
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    model = tiny_qwen2(tokenizer, spec.hidden_size, spec.num_layers, spec.num_heads, seed=spec.seed)
    mixture = TaskMixture(tuple(settings["pattern"]))
    final_loss = train_supervised(model, tokenizer, spec, settings["batch_size"], progress, mixture)
    model.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    teachers = {name: AutoModelForCausalLM.from_pretrained(build.teacher) for name, build in builds.items()}
    per_task = {}
    for name in builds:
        family = TASKS[name][0]
        test_set = family.build_dataset(settings["eval_size"], settings["eval_seed"], "test")
        completions = greedy_completions(model, tokenizer, test_set["prompt"], family.MAX_COMPLETION_LENGTH)
        evaluation = evaluate_completions(tokenizer, completions, test_set["answer"])
        per_task[name] = {
            "accuracy": evaluation.accuracy,
            "mean_completion_length": evaluation.mean_length,
            # Every task's teacher on this task's completions: the gap to its own teacher, and to the others
            "teacher_mismatch_ratio": {teacher_name: teacher_mismatch_ratio(teacher, tokenizer, test_set["prompt"],
                                                                            completions)
                                       for teacher_name, teacher in teachers.items()},
        }
    return {"key": key, "size": size, "settings": settings, "final_train_loss": final_loss, "tasks": per_task,
            "seconds": round(time.perf_counter() - started, 1)}
