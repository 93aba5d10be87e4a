import json
import os


os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402

from tgpo_trl.data import (  # noqa: E402
    DatasetArguments,
    filter_long_prompts,
    load_prompt_dataset,
    prepare_dataset,
    to_conversation,
)
from tgpo_trl.demo.tokenizer import build_char_tokenizer  # noqa: E402


SYSTEM = "Put the answer after ####."


def args(name, **overrides):
    return DatasetArguments(dataset_name=str(name), **overrides)


@pytest.fixture
def saved_dataset(tmp_path):
    """A `save_to_disk` folder with string prompts in `question` and integer answers in `solution`."""
    rows = {"question": ["1+2", "3+4", "5+6"], "solution": [3, 7, 11], "source": ["a", "b", "c"]}
    path = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows).select([0])}).save_to_disk(path)
    return path


def test_saved_dataset_with_renamed_columns_and_system_prompt(saved_dataset):
    dataset = load_prompt_dataset(
        args(saved_dataset, dataset_prompt_column="question", dataset_answer_column="solution", system_prompt=SYSTEM),
        "train",
    )
    assert sorted(dataset.column_names) == ["answer", "prompt", "source"]  # sources renamed away, others kept
    assert dataset[1]["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "3+4"}]
    assert dataset["answer"] == ["3", "7", "11"]  # strings, as the rewards compare them
    assert len(load_prompt_dataset(args(saved_dataset, dataset_prompt_column="question",
                                        dataset_answer_column="solution"), "test")) == 1


def test_jsonl_file_with_conversations_and_a_nested_answer(tmp_path):
    """The verl layout (e.g. OpenR1-Math-46k-8192): conversational prompts, the answer inside `reward_model`."""
    path = tmp_path / "train.jsonl"
    rows = [
        {"prompt": [{"role": "system", "content": "old"}, {"role": "user", "content": "2+2"}],
         "reward_model": {"ground_truth": "4", "style": "rule"}},
        {"prompt": [{"role": "user", "content": "2+3"}], "reward_model": {"ground_truth": "5", "style": "rule"}},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    dataset = load_prompt_dataset(
        args(path, dataset_answer_column="reward_model.ground_truth", system_prompt=SYSTEM), "train"
    )
    assert dataset["answer"] == ["4", "5"]
    assert dataset[0]["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "2+2"}]
    assert dataset[1]["prompt"][0] == {"role": "system", "content": SYSTEM}
    # Without a system prompt, the dataset's own conversation is kept as it is
    assert load_prompt_dataset(args(path, dataset_answer_column="reward_model.ground_truth"), "train")[0]["prompt"] \
        == rows[0]["prompt"]


def test_csv_file_and_dataset_kwargs(tmp_path):
    (tmp_path / "a.csv").write_text("problem,answer\n1+1,2\n2+2,4\n")
    (tmp_path / "b.csv").write_text("problem,answer\n3+3,6\n")
    dataset = load_prompt_dataset(args(tmp_path / "a.csv", dataset_prompt_column="problem"), "train")
    assert dataset["answer"] == ["2", "4"] and dataset[0]["prompt"] == [{"role": "user", "content": "1+1"}]
    # `load_dataset` options through --dataset_kwargs (JSON on the command line)
    kwargs = json.dumps({"data_files": {"train": str(tmp_path / "b.csv")}})
    dataset = load_prompt_dataset(args("csv", dataset_kwargs=kwargs, dataset_prompt_column="problem"), "train")
    assert dataset["answer"] == ["6"]


def test_tsv_file_is_tab_separated(tmp_path):
    (tmp_path / "a.tsv").write_text("problem\tanswer\n1,1+1\t2\n")
    dataset = load_prompt_dataset(args(tmp_path / "a.tsv", dataset_prompt_column="problem"), "train")
    assert dataset["answer"] == ["2"] and dataset[0]["prompt"] == [{"role": "user", "content": "1,1+1"}]


def test_missing_column_is_one_line_naming_it_and_the_columns_there_are(saved_dataset):
    with pytest.raises(ValueError) as error:
        load_prompt_dataset(args(saved_dataset, dataset_answer_column="solution"), "train")
    message = str(error.value)
    assert "'prompt'" in message and "--dataset_prompt_column" in message and "question, solution, source" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="no column 'answer'.*--dataset_answer_column"):
        load_prompt_dataset(args(saved_dataset, dataset_prompt_column="question"), "train")


def test_missing_split_and_missing_dataset(saved_dataset, tmp_path):
    with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
        load_prompt_dataset(args(saved_dataset, dataset_prompt_column="question", dataset_answer_column="solution"),
                            "validation")
    with pytest.raises(ValueError, match="Could not load dataset .*nowhere") as error:
        load_prompt_dataset(args(tmp_path / "nowhere"), "train")
    assert "\n" not in str(error.value)
    (tmp_path / "data.xyz").write_text("?")
    with pytest.raises(ValueError, match="unknown data file type '.xyz'"):
        load_prompt_dataset(args(tmp_path / "data.xyz"), "train")
    with pytest.raises(ValueError, match="--dataset_name"):
        load_prompt_dataset(DatasetArguments(), "train")


def test_dataset_arguments_validation():
    assert DatasetArguments(dataset_kwargs='{"data_dir": "x"}').dataset_kwargs == {"data_dir": "x"}
    with pytest.raises(ValueError, match="dataset_kwargs.*JSON"):
        DatasetArguments(dataset_kwargs="{data_dir: x")
    with pytest.raises(ValueError, match="max_prompt_length"):
        DatasetArguments(max_prompt_length=0)


def test_to_conversation():
    assert to_conversation("hi") == [{"role": "user", "content": "hi"}]
    messages = [{"role": "user", "content": "hi"}]
    assert to_conversation(messages, "sys") == [{"role": "system", "content": "sys"}, *messages]
    assert messages == [{"role": "user", "content": "hi"}]  # not modified in place


def test_prepare_keeps_an_already_prepared_dataset():
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1"}]], "answer": ["2"]})
    assert prepare_dataset(dataset).to_list() == dataset.to_list()


def test_filter_long_prompts_counts_chat_template_tokens():
    tokenizer = build_char_tokenizer()  # one token per character; the template adds <|user|>, <eos>, <|assistant|>
    dataset = prepare_dataset(Dataset.from_dict({"prompt": ["1+1", "10+10+10"], "answer": ["2", "30"]}))
    assert filter_long_prompts(dataset, tokenizer, 6)["answer"] == ["2"]  # 3 characters + 3 template tokens
    assert len(filter_long_prompts(dataset, tokenizer, 5)) == 0
    assert len(filter_long_prompts(dataset, tokenizer, 11)) == 2
