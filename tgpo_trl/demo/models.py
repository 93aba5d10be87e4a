"""Tiny causal language models built from configs (random weights, no hub): Qwen2 for the demo's family, Llama for a
teacher of another family."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerBase, Qwen2Config


def _tiny(config_class, tokenizer, hidden_size=64, num_layers=2, num_heads=4, vocab_size=None, seed=0,
          max_position_embeddings=512):
    config = config_class(
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


def tiny_qwen2(tokenizer: PreTrainedTokenizerBase, *args, **kwargs):
    """A small Qwen2 with the tokenizer's special ids: `(hidden_size=64, num_layers=2, num_heads=4, vocab_size=None,
    seed=0, max_position_embeddings=512)`. `vocab_size` above `len(tokenizer)` pads the embedding."""
    return _tiny(Qwen2Config, tokenizer, *args, **kwargs)


def tiny_llama(tokenizer: PreTrainedTokenizerBase, *args, **kwargs):
    """A small Llama, with the arguments of `tiny_qwen2`: saved next to a `llama` config, a byte-level BPE loads back
    as it was saved (next to `qwen2`, transformers 5 would give it Qwen's pre-tokenizer)."""
    return _tiny(LlamaConfig, tokenizer, *args, **kwargs)
