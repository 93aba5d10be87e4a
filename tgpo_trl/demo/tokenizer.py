"""A character-level tokenizer with a chat template, built locally (no hub)."""

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
