"""What a new user trips over when TGPO replaces GRPO: models saved and loaded back from disk, the model card of a
distilled model, Mixture-of-Experts students, the on-policy `opd` forward, and transformers' deprecations."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from trl import GRPOTrainer

from tgpo_trl import CHECKPOINTING_FIELD, TGPOConfig, TGPOTrainer
from tgpo_trl.demo.models import tiny_qwen2
from tgpo_trl.demo.tokenizer import CHAT_TEMPLATE, CHARACTERS, ROLE_TOKENS, build_char_tokenizer


ROOT = Path(__file__).resolve().parents[1]

from conftest import config_settings, length_reward, make_config, make_trainer, train_logs


def _tokenizer_without_unk(tokenizer):
    """The demo's character tokenizer with no unknown token, as byte-level tokenizers have none."""
    plain = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", eos_token="<eos>",
        additional_special_tokens=ROLE_TOKENS, padding_side="left",
    )
    plain.chat_template = CHAT_TEMPLATE
    return plain


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------ 1. the vocabulary rule, models loaded from disk


def test_pair_saved_and_loaded_back_trains_like_grpo(tmp_path, tokenizer, dataset):
    """Under transformers 5 a tokenizer saved next to a `qwen2` config loads back as `Qwen2Tokenizer`, which adds
    `<|endoftext|>` beyond the embedding's rows. The student can never emit it, so the pair must be accepted."""
    plain = _tokenizer_without_unk(tokenizer)
    student_dir = _save(tiny_qwen2(plain, hidden_size=32, seed=0), plain, tmp_path / "student")
    teacher_dir = _save(tiny_qwen2(plain, hidden_size=48, seed=1), plain, tmp_path / "teacher")
    loaded = AutoTokenizer.from_pretrained(student_dir)
    rows = AutoModelForCausalLM.from_pretrained(student_dir).config.vocab_size
    if len(loaded) > rows:  # transformers >= 5.x with Qwen2Tokenizer: the trap is real
        assert len(loaded) == rows + 1 and loaded.convert_ids_to_tokens(rows) == "<|endoftext|>"

    args = make_config(tmp_path, teacher_model_name_or_path=teacher_dir, max_steps=1)
    trainer = TGPOTrainer(model=student_dir, reward_funcs=length_reward, args=args, train_dataset=dataset)
    assert trainer.teacher_vocab_size == rows
    logs = train_logs(trainer)
    assert math.isfinite(logs[0]["guidance/loss"]) and logs[0]["guidance/skipped_tokens"] == 0


def test_ids_beyond_the_students_rows_are_not_checked(tmp_path, student, teacher, tokenizer, dataset):
    """Whatever the transformers version: a student tokenizer with an id its output layer has no row for."""
    from tgpo_trl.teacher import shared_vocab_size

    grown = AutoTokenizer.from_pretrained(_save(student, tokenizer, tmp_path / "student"))
    grown.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    rows = student.config.vocab_size
    assert len(grown) == rows + 1
    other = AutoTokenizer.from_pretrained(tmp_path / "student")
    other.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # differs only at the unemittable id
    assert shared_vocab_size(grown, student, teacher, other) == rows
    reordered = build_char_tokenizer([c for c in CHARACTERS if c != "0"])
    with pytest.raises(ValueError, match="maps tokens differently"):
        shared_vocab_size(grown, student, teacher, reordered)


def test_teacher_that_cannot_score_an_emittable_id_is_still_refused(tmp_path, tokenizer, dataset):
    student_dir = _save(tiny_qwen2(tokenizer, hidden_size=32, seed=0), tokenizer, tmp_path / "student")
    small = tiny_qwen2(tokenizer, hidden_size=48, seed=1, vocab_size=len(tokenizer) - 3)
    teacher_dir = _save(small, tokenizer, tmp_path / "teacher")
    args = make_config(tmp_path, teacher_model_name_or_path=teacher_dir)
    with pytest.raises(ValueError, match=rf"has {len(tokenizer) - 3} rows, but the student can emit {len(tokenizer)}"):
        TGPOTrainer(model=student_dir, reward_funcs=length_reward, args=args, train_dataset=dataset)


# ------------------------------------------------------------------ 4. opd on policy: one student forward, same numbers


def _scored_batch(trainer, dataset):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = [dataset[i // trainer.num_generations] for i in range(trainer.args.per_device_train_batch_size)]
    return trainer._generate_and_score_completions(batch)


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("use_task_reward, loss_type", [(True, "dapo"), (False, "grpo"), (True, "sapo")])
def test_on_policy_opd_takes_old_logps_from_the_loss_forward(
    tmp_path, student, teacher, tokenizer, dataset, use_task_reward, loss_type
):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance="opd",
                               use_task_reward=use_task_reward, loss_type=loss_type)
    calls = []
    forward = trainer._get_per_token_logps_and_entropies
    # the student's forwards (the teacher's scoring pass runs through the same chunked forward)
    trainer._get_per_token_logps_and_entropies = lambda model, *a, **k: (
        calls.append(1) if model is not trainer.teacher_model else None) or forward(model, *a, **k)
    inputs = _scored_batch(trainer, dataset)
    assert "old_per_token_logps" not in inputs  # on policy: GRPO skips them
    loss, grads = _loss_and_grads(trainer, inputs)
    assert len(calls) == 1  # the loss forward only: no second student forward for `log p_old`

    # the reference: `log p_old` from a separate no-grad forward, advantages built before the loss, as GRPO takes them
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        old, _, _ = forward(trainer.model, ids, mask, inputs["completion_ids"].size(1))
    advantages = trainer.guidance_coef * (inputs["teacher_logps"] - old) * inputs["teacher_valid"]
    if use_task_reward:
        advantages = advantages + inputs["advantages"].unsqueeze(1)
    assert advantages.abs().sum() > 0
    ref_loss, ref_grads = _loss_and_grads(trainer, {**inputs, "advantages": advantages, "old_per_token_logps": old})
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    assert len(grads) == len(ref_grads) and all(
        torch.allclose(g, r, rtol=1e-4, atol=1e-7) for g, r in zip(grads, ref_grads, strict=True)
    )



# ------------------------------------------------------------------ 3. Mixture-of-Experts students


def tiny_moe(tokenizer, family: str, seed: int = 0):
    """A tiny Mixture-of-Experts causal LM of `family` (4 experts, 2 per token), built from its config."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                  num_experts_per_tok=2, router_aux_loss_coef=0.02)
    if family == "qwen2_moe":
        config = Qwen2MoeConfig(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                intermediate_size=64, **common)
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(num_experts=4, moe_intermediate_size=16, intermediate_size=64, head_dim=8, **common)
    else:
        config = MixtralConfig(num_local_experts=4, intermediate_size=16, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _grpo_twin(tmp_path, student, tokenizer, dataset, **overrides):
    from trl import GRPOConfig

    settings = {k: v for k, v in config_settings(tmp_path, **overrides).items() if k in GRPOConfig.__dataclass_fields__}
    return GRPOTrainer(model=student, reward_funcs=length_reward, args=GRPOConfig(**settings), train_dataset=dataset,
                       processing_class=tokenizer)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_moe_student_counts_its_load_balancing_loss_as_grpo_does(tmp_path, tokenizer, teacher, dataset, family):
    # guidance_coef=0: TGPO's loss is GRPO's, so with the same seed every step, aux loss included, must match GRPO's
    runs = {}
    for name in ("grpo", "tgpo"):
        student = tiny_moe(tokenizer, family)
        if name == "grpo":
            trainer = _grpo_twin(tmp_path / name, student, tokenizer, dataset, max_steps=2)
        else:
            trainer = make_trainer(tmp_path / name, student, teacher, tokenizer, dataset, max_steps=2,
                                   guidance_coef=0.0)
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02
        runs[name] = (train_logs(trainer), [p.detach().clone() for p in trainer.model.parameters()])
    (grpo_logs, grpo_params), (tgpo_logs, tgpo_params) = runs["grpo"], runs["tgpo"]
    for grpo_log, tgpo_log in zip(grpo_logs, tgpo_logs, strict=True):
        assert tgpo_log["aux_loss"] > 0
        assert tgpo_log["aux_loss"] == pytest.approx(grpo_log["aux_loss"], rel=1e-5)
        assert tgpo_log["loss"] == pytest.approx(grpo_log["loss"], rel=1e-5, abs=1e-7)
    assert all(torch.allclose(t, g, atol=1e-6) for t, g in zip(tgpo_params, grpo_params, strict=True))


def test_moe_student_with_guidance_adds_the_aux_term_once(tmp_path, tokenizer, teacher, dataset):
    """The loss of one batch with the router coefficient on, minus the same with it off, is `coef * aux_loss`."""
    trainer = make_trainer(tmp_path, tiny_moe(tokenizer, "qwen3_moe"), teacher, tokenizer, dataset, guidance="tgpo")
    inputs = _scored_batch(trainer, dataset)
    with torch.no_grad():
        with_aux = trainer.compute_loss(trainer.model, inputs).item()
        aux = trainer._metrics["train"]["aux_loss"][-1]
        trainer.aux_loss_enabled = False
        without_aux = trainer.compute_loss(trainer.model, inputs).item()
    assert aux > 0 and math.isfinite(with_aux)
    assert with_aux - without_aux == pytest.approx(0.02 * aux, rel=1e-4)
    assert trainer._metrics["train"]["guidance/loss"][-1] > 0


# ------------------------------------------------------------------ 2. the model card names the teacher


def _card(trainer, **kwargs):
    trainer.create_model_card(model_name="tiny-tgpo", **kwargs)
    with open(f"{trainer.args.output_dir}/README.md") as file:
        return file.read()


def _front_matter(card):
    import yaml

    return yaml.safe_load(card.split("---")[1])


def test_card_of_a_local_student_names_its_teacher_and_links_nothing_local(tmp_path, tokenizer, teacher, dataset):
    student_dir = _save(tiny_qwen2(tokenizer, hidden_size=32, seed=0), tokenizer, tmp_path / "student")
    teacher_dir = _save(teacher, tokenizer, tmp_path / "teacher")
    args = make_config(tmp_path, teacher_model_name_or_path=teacher_dir, teacher_model_revision="v1.2",
                       guidance="tgpo_topk", guidance_coef=0.002, guidance_schedule="linear", guidance_decay_steps=200,
                       guidance_top_k=7)
    trainer = TGPOTrainer(model=student_dir, reward_funcs=length_reward, args=args, train_dataset=dataset)
    card = _card(trainer, dataset_name=str(tmp_path / "prompts.jsonl"))
    assert "[None]" not in card and 'model="None"' not in card and "huggingface.co/None" not in card
    assert f"the local model `{teacher_dir}` at revision `v1.2`" in card  # the teacher, named, not linked
    assert f"the local model `{student_dir}`" in card and f"huggingface.co/{student_dir}" not in card
    assert "`tgpo_topk`" in card and "| `lambda_0` (`guidance_coef`) | 0.002 |" in card
    assert "`D` = 200 optimizer steps" in card and "| Teacher top-k (`guidance_top_k`) | 7 |" in card
    assert f"the local dataset `{tmp_path / 'prompts.jsonl'}`" in card and "huggingface.co/datasets" not in card
    assert f'pipeline("text-generation", model="{args.output_dir}"' in card  # where the model actually is
    assert "@article{tgpo2026" in card and "2605.13230" in card
    meta = _front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta and {"trl", "tgpo"} <= set(meta["tags"])


def test_card_of_a_hub_student_links_student_teacher_and_dataset(tmp_path, student, teacher, tokenizer, dataset):
    student.config._name_or_path = "Qwen/Qwen2.5-Math-1.5B"  # as `from_pretrained("Qwen/...")` sets it; no download
    teacher.config._name_or_path = "Qwen/Qwen3-30B-A3B-Thinking-2507"
    teacher.config._commit_hash = "0123abcd"
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, guidance="tgpo", guidance_coef=0.05,
                           guidance_schedule="constant")
    card = _card(trainer, dataset_name="open-r1/OpenR1-Math-220k")
    assert ("[Qwen/Qwen3-30B-A3B-Thinking-2507](https://huggingface.co/Qwen/Qwen3-30B-A3B-Thinking-2507) at revision "
            "`0123abcd`") in card
    assert "[Qwen/Qwen2.5-Math-1.5B](https://huggingface.co/Qwen/Qwen2.5-Math-1.5B)" in card
    assert "https://huggingface.co/datasets/open-r1/OpenR1-Math-220k" in card
    assert "| `lambda_0` (`guidance_coef`) | 0.05 |" in card and "`constant`: `lambda_k = lambda_0`" in card
    assert "`D` =" not in card  # no decay to describe
    meta = _front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-Math-1.5B" and meta["datasets"] in ("open-r1/OpenR1-Math-220k", ["open-r1/OpenR1-Math-220k"])


def test_card_without_a_teacher_says_so(tmp_path, student, tokenizer, dataset):
    trainer = TGPOTrainer(model=student, reward_funcs=length_reward, args=make_config(tmp_path, guidance="none"),
                          train_dataset=dataset, processing_class=tokenizer)
    card = _card(trainer)
    assert "without a teacher" in card and "| Teacher | none |" in card and "distilled from" not in card


# ------------------------------------------------------------------ 5. deprecations


def _deprecations(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    found = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
             and "checkpointing" in str(w.message)]
    return result, found


def test_default_config_raises_no_checkpointing_deprecation_and_keeps_grpos_default():
    args, found = _deprecations(lambda: TGPOConfig(output_dir="unused", use_cpu=True))
    assert found == [] and args.gradient_checkpointing is True  # GRPO's default, under whatever name is current


def test_old_checkpointing_name_is_still_honoured():
    args = TGPOConfig(output_dir="unused", use_cpu=True, gradient_checkpointing=False)
    assert args.gradient_checkpointing is False and getattr(args, CHECKPOINTING_FIELD) is False


@pytest.mark.parametrize("argv", [[], ["--config", "recipes/qwen2.5-math-1.5b_tgpo.yaml"],
                                  ["--config", "recipes/qwen2.5-math-1.5b_tgpo_lora.yaml"]],
                         ids=["demo", "paper-recipe", "lora-recipe"])
def test_demo_and_recipes_parse_without_deprecation_warnings(argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    from tgpo_trl.scripts import train as script

    (_, args, _), found = _deprecations(lambda: script.parse_args([*argv, "--use_cpu", "true"]))
    assert found == []
    assert args.gradient_checkpointing is bool(argv)  # the demo turns checkpointing off, the recipes keep GRPO's default
