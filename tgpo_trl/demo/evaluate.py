"""Greedy evaluation of demo models, and the teacher-student gap measured by teacher forcing."""

from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..rewards import exact_match_reward


@dataclass(frozen=True)
class GreedyEvaluation:
    """Held-out greedy accuracy and mean completion length (in tokens, <eos> included, as TRL's
    `completions/mean_length`).

    The length is kept because a collapsing policy shows it first: completions run to the length limit.
    """

    accuracy: float
    mean_length: float


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]]) -> list[list[int]]:
    """Token ids of conversational prompts with the chat template's generation prompt (`<|assistant|>`)."""
    # `list()`: a dataset column is a lazy sequence, which `apply_chat_template` would not treat as a batch.
    texts = tokenizer.apply_chat_template(list(prompts), tokenize=False, add_generation_prompt=True)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask. Prompts go on the left and completions on the right, so that every completion
    starts at the same column."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _cut_after_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefixes: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 64,
    temperature: float | None = None,
) -> list[list[int]]:
    """Completion ids after token-id prefixes (greedy, or sampled at `temperature` when one is given), cut after the
    first <eos> (kept, as GRPO's mask keeps it)."""
    model.eval()
    sampling = {"do_sample": False}
    if temperature is not None:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    completions = []
    for start in range(0, len(prefixes), batch_size):
        ids, mask = pad_rows(prefixes[start : start + batch_size], tokenizer.pad_token_id, "left")
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        completions += [_cut_after_eos(row, tokenizer.eos_token_id) for row in out[:, ids.shape[1] :].tolist()]
    return completions


def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy completion ids for conversational prompts, cut after the first <eos>."""
    return generate_completions(model, tokenizer, encode_prompts(tokenizer, prompts), max_new_tokens, batch_size)


def greedy_evaluation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    max_new_tokens: int,
    batch_size: int = 64,
) -> GreedyEvaluation:
    """Exact match of `extract_answer` on greedy completions against the dataset's `answer` column."""
    completions = greedy_completions(model, tokenizer, dataset["prompt"], max_new_tokens, batch_size)
    return evaluate_completions(tokenizer, completions, dataset["answer"])


def evaluate_completions(tokenizer: PreTrainedTokenizerBase, completions: list[list[int]], answers) -> GreedyEvaluation:
    """Exact-match accuracy (the `exact_match` reward) and mean length (<eos> included) of completion ids."""
    return GreedyEvaluation(
        accuracy=exact_match_accuracy(tokenizer.batch_decode(completions, skip_special_tokens=True), answers),
        mean_length=sum(map(len, completions)) / len(completions),
    )


def exact_match_accuracy(texts: list[str], answers) -> float:
    """Share of `texts` whose `####` answer is the reference (`tgpo_trl.rewards.exact_match_reward`)."""
    return sum(exact_match_reward(texts, answer=list(answers))) / len(texts)


@torch.no_grad()
def teacher_mismatch_ratio(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    completions: list[list[int]],
    batch_size: int = 64,
) -> float:
    """Token mean of `1[argmax p_T(. | s_t) != y_t]` over the completion tokens, teacher forced on `completions`.

    The same quantity the trainer logs as `gap/mismatch_ratio`; near 1 means the student writes tokens the
    teacher would not (a large gap), near 0 means the student already follows the teacher.
    """
    teacher.eval()
    prompt_ids = encode_prompts(tokenizer, prompts)
    mismatches = tokens = 0
    for start in range(0, len(prompt_ids), batch_size):
        batch_prompts = prompt_ids[start : start + batch_size]
        batch_completions = completions[start : start + batch_size]
        prompt, prompt_mask = pad_rows(batch_prompts, tokenizer.pad_token_id, "left")
        completion, completion_mask = pad_rows(batch_completions, tokenizer.pad_token_id, "right")
        logits = teacher(
            input_ids=torch.cat([prompt, completion], 1), attention_mask=torch.cat([prompt_mask, completion_mask], 1)
        ).logits
        # The logit at column i predicts the token at column i + 1.
        predicted = logits[:, prompt.shape[1] - 1 : -1].argmax(-1)
        mismatches += ((predicted != completion) & completion_mask.bool()).sum().item()
        tokens += completion_mask.sum().item()
    return mismatches / tokens


def accuracy_from_prefixes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    rollouts: list[list[int]],
    fraction: float,
    max_new_tokens: int,
    batch_size: int = 64,
) -> float:
    """Exact match when `model` greedily finishes each rollout cut after `fraction` of its tokens.

    With the teacher as `model` and student rollouts: TGPO's target at a position is the teacher's prediction on the
    student's own prefix, and this says whether that prediction still leads anywhere once the prefix is the student's
    (1.0 = as good as from the prompt, 0 = the teacher has no correct continuation to point at). With the student
    itself as `model`, it is the baseline a prefix allows.
    """
    prefixes, heads = [], []
    for prompt, rollout in zip(encode_prompts(tokenizer, dataset["prompt"]), rollouts, strict=True):
        body = [token for token in rollout if token != tokenizer.eos_token_id]
        head = body[: int(len(body) * fraction)]
        prefixes.append(prompt + head)
        heads.append(head)
    continuations = generate_completions(model, tokenizer, prefixes, max_new_tokens, batch_size)
    texts = tokenizer.batch_decode([h + c for h, c in zip(heads, continuations, strict=True)], skip_special_tokens=True)
    return exact_match_accuracy(texts, dataset["answer"])
