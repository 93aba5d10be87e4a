"""Tokenizers built locally (no hub): the demo's character tokenizer, and a byte-level BPE of another family."""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, EOS, UNK, *ROLE_TOKENS]
# Every character the demo task writes, plus lowercase letters so free text in tests stays tokenizable
CHARACTERS = sorted(set(string.digits + string.ascii_letters + "+-*/=()., ?!:;_#<>'\"\n"))

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] != 'assistant' or not loop.last or not continue_final_message %}<eos>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(characters: str | list[str] = CHARACTERS) -> PreTrainedTokenizerFast:
    """Character tokenizer: one id per character, special tokens first, left padding (as GRPO expects)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(set(characters))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(""), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        padding_side="left",
        truncation_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Another family's chat markers (ChatML, as Qwen's and many others'), for a teacher with its own tokenizer
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_level_tokenizer(corpus, vocab_size: int, regex_split: bool = False) -> PreTrainedTokenizerFast:
    """
    A byte-level BPE (the family of Llama-3's, gpt-oss's and Qwen's tokenizers) trained on `corpus` (an iterable of
    strings), with ChatML markers and template. `regex_split=False` lets merges cross digits and separators (`"2,"`,
    `":1"`), so its tokens rarely start where a character tokenizer's do; `True` pre-splits like GPT-2.
    """
    from tokenizers import trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex_split)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=CHATML_SPECIAL_TOKENS[:2], padding_side="left", truncation_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
