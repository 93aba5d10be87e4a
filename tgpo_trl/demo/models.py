"""Tiny Qwen2 causal language models built from configs (random weights, no hub)."""

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Qwen2Config


def tiny_qwen2(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
):
    """A small Qwen2 with the tokenizer's special ids. `vocab_size` above `len(tokenizer)` pads the embedding."""
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
