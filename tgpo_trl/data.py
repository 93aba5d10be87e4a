"""Load a prompt / reference-answer dataset and shape it the way `TGPOTrainer` and the reward functions expect.

Any `datasets` source works: a Hub name, a local data file (`.json`, `.jsonl`, `.csv`, `.parquet`, ...), a local folder
of data files, or a folder written by `save_to_disk`. The prompt column becomes the conversational `prompt` column
(GRPO applies the chat template to it), with an optional system prompt; the reference-answer column becomes `answer`,
the keyword the rewards in `tgpo_trl.rewards` read. Other columns are kept: GRPO passes them to every reward
function as keyword arguments.

Every check here runs before a model is loaded, and each failure is one `ValueError` line that names the column,
split or path at fault.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, Value
from transformers import PreTrainedTokenizerBase
from trl import ScriptArguments


PROMPT, ANSWER = "prompt", "answer"
# The packaged `datasets` builder for a single local data file, and its arguments, by suffix
_FILE_BUILDERS = {".json": ("json", {}), ".jsonl": ("json", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}),
                  ".parquet": ("parquet", {}), ".arrow": ("arrow", {}), ".txt": ("text", {})}


@dataclass
class DatasetArguments(ScriptArguments):
    """
    [`~trl.ScriptArguments`] (`dataset_name`, `dataset_config`, `dataset_train_split`, `dataset_test_split`,
    `dataset_streaming`) plus what TGPO needs to read a verifiable-reward dataset.

    Parameters:
        dataset_prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompts: plain strings (sent as one user message) or conversations (lists of
            `{"role", "content"}` messages). A dotted name (`"extra_info.question"`) reads a nested field.
        dataset_answer_column (`str`, *optional*, defaults to `"answer"`):
            Column holding the reference answers the reward functions check against (passed to them as `answer`).
            A dotted name (`"reward_model.ground_truth"`) reads a nested field.
        system_prompt (`str`, *optional*):
            System message put first in every prompt, replacing the dataset's own system message if it has one.
        dataset_kwargs (`dict` or `str`, *optional*):
            Extra keyword arguments for `datasets.load_dataset` (e.g. `{"data_files": "train.jsonl"}`); a JSON string
            on the command line.
        max_prompt_length (`int`, *optional*):
            Drop the prompts longer than this many tokens once the chat template is applied (the paper keeps prompts
            of at most 1024 tokens). GRPO itself never truncates prompts.
    """

    dataset_prompt_column: str = field(
        default=PROMPT,
        metadata={"help": "Column holding the prompts (strings or conversations). A dotted name reads a nested field."},
    )
    dataset_answer_column: str = field(
        default=ANSWER,
        metadata={"help": "Column holding the reference answers, passed to the reward functions as `answer`. A dotted "
                  "name (e.g. 'reward_model.ground_truth') reads a nested field."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message put first in every prompt (replaces the dataset's own system message)."},
    )
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Extra keyword arguments for `datasets.load_dataset`, as JSON on the command line, e.g. "
                  "'{\"data_files\": \"train.jsonl\"}'."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Drop prompts longer than this many tokens after the chat template (the paper: 1024)."},
    )

    def __post_init__(self):
        if isinstance(self.dataset_kwargs, str):
            try:
                self.dataset_kwargs = json.loads(self.dataset_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"`dataset_kwargs` is not valid JSON ({error}): {self.dataset_kwargs!r}") from None
        if self.dataset_kwargs is not None and not isinstance(self.dataset_kwargs, dict):
            raise ValueError(f"`dataset_kwargs` must be a mapping, got {self.dataset_kwargs!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"`max_prompt_length` must be >= 1, got {self.max_prompt_length}")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json"))


def load_raw_dataset(
    name: str, config: str | None = None, streaming: bool = False, **kwargs
) -> Dataset | DatasetDict | IterableDataset | IterableDatasetDict:
    """The dataset `name` as `datasets` gives it: `load_from_disk` for a saved folder, the packaged builder for one
    local data file, `load_dataset` for anything else (a Hub name, a folder of data files)."""
    path = Path(name).expanduser()
    try:
        if _is_saved_dataset(path):
            return datasets.load_from_disk(str(path))
        if path.is_file():
            if path.suffix.lower() not in _FILE_BUILDERS:
                raise ValueError(f"unknown data file type {path.suffix!r} (known: {', '.join(_FILE_BUILDERS)})")
            builder, builder_kwargs = _FILE_BUILDERS[path.suffix.lower()]
            return datasets.load_dataset(builder, data_files=str(path), streaming=streaming, **builder_kwargs, **kwargs)
        return datasets.load_dataset(name, config, streaming=streaming, **kwargs)
    except Exception as error:  # hub, file and format errors alike: one line that names the dataset
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"Could not load dataset {name!r}: {message}") from error


def select_split(dataset, split: str, name: str):
    """`dataset[split]` for a dataset with splits; a dataset saved without splits is its own (only) split."""
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        if split not in dataset:
            raise ValueError(f"Dataset {name!r} has no split {split!r} (its splits: {', '.join(dataset)})")
        return dataset[split]
    return dataset


def _flatten_for(dataset, columns: list[str]):
    """Expose dotted (nested) column names as top-level columns when the dataset has them only as struct fields."""
    names = dataset.column_names
    if names is None or all(column in names for column in columns):
        return dataset
    if any("." in column and column.split(".")[0] in names for column in columns):
        return dataset.flatten()
    return dataset


def check_columns(dataset, name: str, prompt_column: str, answer_column: str) -> None:
    """Stop with one line naming a missing prompt or answer column and the columns there are."""
    names = dataset.column_names
    if names is None:  # a streamed dataset whose features are unknown until read
        return
    for column, flag in ((prompt_column, "dataset_prompt_column"), (answer_column, "dataset_answer_column")):
        if column not in names:
            raise ValueError(
                f"Dataset {name!r} has no column {column!r} (set --{flag}; its columns: {', '.join(names)})"
            )


def to_conversation(prompt: str | list[dict], system_prompt: str | None = None) -> list[dict]:
    """A prompt as a conversation: a string becomes one user message; `system_prompt` replaces any system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt is not None:
        if messages and messages[0].get("role") == "system":
            messages = messages[1:]
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def prepare_dataset(
    dataset,
    name: str = "dataset",
    prompt_column: str = PROMPT,
    answer_column: str = ANSWER,
    system_prompt: str | None = None,
):
    """Map `prompt_column` to a conversational `prompt` and `answer_column` to a string `answer`, keeping the rest.

    The columns are checked first, so a wrong column name fails here, before any model is loaded.
    """
    dataset = _flatten_for(dataset, [prompt_column, answer_column])
    check_columns(dataset, name, prompt_column, answer_column)

    features = dataset.features  # None for a streamed dataset whose features are unknown
    if features is not None and features.get(answer_column) != Value("string"):
        dataset = dataset.cast_column(answer_column, Value("string"))  # `map` would keep a numeric type

    def convert(row):
        return {PROMPT: to_conversation(row[prompt_column], system_prompt), ANSWER: str(row[answer_column]).strip()}

    names = dataset.column_names
    source_columns = [c for c in (prompt_column, answer_column) if names is None or c in names]
    return dataset.map(convert, remove_columns=list(dict.fromkeys(source_columns)))


def filter_long_prompts(dataset, tokenizer: PreTrainedTokenizerBase, max_length: int):
    """Drop the rows whose `prompt`, with the chat template and the generation prompt applied, exceeds `max_length`
    tokens (GRPO would feed them whole)."""

    def short_enough(batch):
        texts = tokenizer.apply_chat_template(list(batch[PROMPT]), tokenize=False, add_generation_prompt=True)
        return [len(ids) <= max_length for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return dataset.filter(short_enough, batched=True)


def load_prompt_dataset(args: DatasetArguments, split: str):
    """Load `split` of `args.dataset_name` and prepare it (see `prepare_dataset`): the whole data path of the CLI."""
    if not args.dataset_name:
        raise ValueError("No dataset: set --dataset_name (a Hub name, a local data file, or a saved dataset folder)")
    raw = load_raw_dataset(
        args.dataset_name, args.dataset_config, args.dataset_streaming, **(args.dataset_kwargs or {})
    )
    dataset = select_split(raw, split, args.dataset_name)
    return prepare_dataset(
        dataset, args.dataset_name, args.dataset_prompt_column, args.dataset_answer_column, args.system_prompt
    )
