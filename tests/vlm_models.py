"""
Tiny vision-language models for the tests, built locally (no hub) and saved to disk with their processors, then loaded
back as users load them: LLaVA-Next (a CLIP vision tower, `image_sizes`, any-resolution tiles) and Gemma 3 (SigLIP,
`token_type_ids` marking the image tokens). Both take the demo's character tokenizer plus their image tokens, and
PIL image processors (the torchvision ones do not load on these CPUs).
"""

from pathlib import Path

import torch
from datasets import Dataset
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import (
    Gemma3ImageProcessorPil,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from tgpo_trl.demo.tokenizer import CHARACTERS, ROLE_TOKENS, SPECIAL_TOKENS

FAMILIES = ("llava_next", "gemma3")
IMAGE_TOKENS = {"llava_next": ["<image>"], "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]}
GRID = [[16, 16], [16, 32], [32, 16], [32, 32]]


def chat_template(image_marker: str) -> str:
    """The demo's chat format, with an image part written as `image_marker`."""
    return (
        "{% for message in messages %}<|{{ message['role'] }}|>"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image_marker + "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{% if message['role'] != 'assistant' or not loop.last or not continue_final_message %}<eos>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The demo's character tokenizer with the family's image tokens (special, after the role tokens)."""
    image_tokens = IMAGE_TOKENS[family]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *image_tokens, *sorted(set(CHARACTERS))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(""), behavior="isolated")
    backend.decoder = decoders.Fuse()
    extra = {"boi_token": image_tokens[0], "image_token": image_tokens[1], "eoi_token": image_tokens[2]} if (
        family == "gemma3") else {}
    built = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                    extra_special_tokens=extra, padding_side="left", truncation_side="left")
    built.add_tokens([*ROLE_TOKENS, *image_tokens], special_tokens=True)
    built.chat_template = chat_template(image_tokens[0])
    return built


def processor(family: str, tok=None):
    tok = tok if tok is not None else tokenizer(family)
    if family == "llava_next":
        images = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                            image_grid_pinpoints=GRID)
        return LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=4, image_token="<image>",
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=tok.chat_template)
    images = Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    return Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=tok.chat_template, image_seq_length=4)


def model(family: str, tok, seed: int, hidden_size: int = 32, patch_size: int = 4):
    """A tiny model of `family` for `tok`, random weights from `seed` (its image projection too: Gemma 3 starts it at
    zero, which would make every image look alike)."""
    text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
                max_position_embeddings=512)
    torch.manual_seed(seed)
    if family == "llava_next":
        vision = CLIPVisionConfig(image_size=16, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, projection_dim=32)
        config = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**text),
                                 image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=GRID,
                                 vision_feature_select_strategy="default", vision_feature_layer=-1)
        built = LlavaNextForConditionalGeneration(config)
    else:
        vision = SiglipVisionConfig(image_size=16, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4)
        text_config = Gemma3TextConfig(**text, head_dim=hidden_size // 4, sliding_window=64)
        config = Gemma3Config(text_config=text_config, vision_config=vision, mm_tokens_per_image=4,
                              boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                              image_token_index=tok.image_token_id)
        built = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():
            torch.nn.init.normal_(built.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    built.generation_config.eos_token_id = tok.eos_token_id
    built.generation_config.pad_token_id = tok.pad_token_id
    return built.eval()


def save(family: str, path: Path, seed: int, **sizes) -> str:
    """A model of `family` and its processor saved to `path`; the path."""
    proc = processor(family)
    model(family, proc.tokenizer, seed, **sizes).save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


def load(path) -> tuple:
    """`(model, processor)` loaded back from disk."""
    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def image(index: int) -> Image.Image:
    """A small image of its own colour and size (so each prompt's image gives other pixels and, for LLaVA-Next's
    tiles, another layout)."""
    sizes = [(20, 24), (24, 20), (16, 16), (30, 18)]
    return Image.new("RGB", sizes[index % len(sizes)], ((53 * index) % 256, (97 * index + 40) % 256, (31 * index) % 256))


def image_dataset(rows: int = 8) -> Dataset:
    """Prompts with one image each (the `image` column GRPO reads)."""
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i + 1}="}] for i in range(rows)],
                              "image": [image(i) for i in range(rows)]})
