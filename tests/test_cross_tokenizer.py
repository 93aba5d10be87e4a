"""A teacher with another tokenizer: byte alignment checked by hand, the vocabulary map, and the permutation identity
(a teacher that is the student's teacher with its vocabulary permuted scores exactly like the shared-vocabulary path)."""

import math

import pytest
import torch
from conftest import make_trainer, train_logs
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tgpo_trl.alignment import CrossTokenizerAlignment, TokenBytes, merge_topk
from tgpo_trl.demo.tokenizer import CHARACTERS, CHAT_TEMPLATE, build_char_tokenizer
from tgpo_trl.lm_head import TeacherScores


TEXT = " café 😀 12+34=46"  # multi-byte characters, leading spaces, digits the BPE merges
TEACHER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEACHER_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _wrap(backend, path, **special):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **special)
    tokenizer.save_pretrained(path)  # as users load a tokenizer: from disk
    return AutoTokenizer.from_pretrained(path)


def byte_level_teacher_tokenizer(path):
    """A byte-level BPE (as Llama-3's, gpt-oss's, Qwen's) with hand-written merges: ' ca', 'é', '12', '34' and the
    first two bytes of the emoji."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(TEACHER_SPECIALS + alphabet + ["Ġc", "Ġca", "Ã©", "12", "34", "ðŁ"])}
    merges = [("Ġ", "c"), ("Ġc", "a"), ("Ã", "©"), ("1", "2"), ("3", "4"), ("ð", "Ł")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = _wrap(backend, path, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                      additional_special_tokens=TEACHER_SPECIALS[1:])
    tokenizer.chat_template = TEACHER_TEMPLATE
    return tokenizer


def sentencepiece_teacher_tokenizer(path):
    """A SentencePiece-style BPE (Llama-2 / Mistral): `▁` for spaces, a dummy prefix, byte fallback."""
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["<unk>", "<s>", "</s>", *bytes_, "▁", "c", "a", "f", "é", "1", "2", "▁c", "▁ca", "12"]
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[("▁", "c"), ("▁c", "a"), ("1", "2")],
                                   byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _wrap(backend, path, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def char_student_tokenizer(tmp_path):
    tokenizer = build_char_tokenizer(CHARACTERS + ["é", "😀"])
    tokenizer.save_pretrained(tmp_path / "student_tokenizer")
    return AutoTokenizer.from_pretrained(tmp_path / "student_tokenizer")


def student_ids(tokenizer, text, eos=True):
    ids = [tokenizer.convert_tokens_to_ids(ch) for ch in text]
    return ids + ([tokenizer.eos_token_id] if eos else [])


def align(student_tokenizer, teacher_tokenizer, text, prompt):
    alignment = CrossTokenizerAlignment(student_tokenizer, teacher_tokenizer, student_rows=len(student_tokenizer))
    ids = torch.tensor([student_ids(student_tokenizer, text)])
    return alignment, alignment.teacher_batch([prompt], ids, torch.ones_like(ids)), ids


def test_byte_level_teacher_and_character_student_align_as_worked_by_hand(tmp_path, char_student_tokenizer):
    teacher = byte_level_teacher_tokenizer(tmp_path / "teacher")
    alignment, batch, ids = align(char_student_tokenizer, teacher, TEXT, [{"role": "user", "content": "1+2="}])
    # the teacher reads its own chat template, not the student's markers
    prompt = teacher.decode(batch.prompt_ids[0][batch.prompt_mask[0].bool()])
    assert prompt == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    completion = teacher.convert_ids_to_tokens(batch.completion_ids[0][batch.completion_mask[0].bool()])
    assert completion == ["Ġca", "f", "Ã©", "Ġ", "ðŁ", "ĺ", "Ģ", "Ġ", "12", "+", "34", "=", "4", "6", "<|im_end|>"]
    # student positions: ' ' c a f é ' ' 😀 ' ' 1 2 + 3 4 = 4 6 EOS; a target only where a teacher token starts too
    assert batch.sync_index[0].tolist() == [0, -1, -1, 1, 2, 3, 4, 7, 8, -1, 9, 10, -1, 11, 12, 13, 14]
    # groups cover the same bytes on both sides: ' ca' | f | é | ' ' | 😀 | ' ' | 12 | + | 34 | = | 4 | 6 | EOS
    assert batch.group_index[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 7, 8, 8, 9, 10, 11, 12]
    assert batch.group_size[0].tolist() == [3, 3, 3, 1, 1, 1, 1, 1, 2, 2, 1, 2, 2, 1, 1, 1, 1]
    assert batch.teacher_group[0].tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12]

    # teacher scores at its own 15 positions: log p_T of each teacher token is -(j + 1); argmax = the token itself
    t_ids = batch.completion_ids
    n = t_ids.size(1)
    logps = -torch.arange(1.0, n + 1).unsqueeze(0)
    scores = TeacherScores(logps=logps, argmax=t_ids.clone(), valid=torch.ones_like(t_ids, dtype=torch.bool))
    mapped = alignment.to_student(scores, batch)
    group_logp = [-1 / 3] * 3 + [-2, -3, -4, -(5 + 6 + 7), -8, -9 / 2, -9 / 2, -10, -11 / 2, -11 / 2, -12, -13, -14,
                                 -15]
    assert mapped.logps[0].tolist() == pytest.approx(group_logp)
    assert mapped.logps[0].sum().item() == pytest.approx(logps.sum().item())  # the chain rule, spread: nothing lost
    assert mapped.valid.all()
    s = char_student_tokenizer.convert_tokens_to_ids
    # ' ca' -> the longest student token it starts with (' '), 'é' -> 'é', the emoji's first two bytes -> no student
    # token, '12' -> '1', '34' -> '3', the end of turn -> the student's EOS
    expected = [s(" "), 0, 0, s("f"), s("é"), s(" "), 0, s(" "), s("1"), 0, s("+"), s("3"), 0, s("="), s("4"), s("6"),
                char_student_tokenizer.eos_token_id]
    aligned = [True, False, False, True, True, True, False, True, True, False, True, True, False, True, True, True, True]
    assert mapped.aligned[0].tolist() == aligned
    assert torch.where(mapped.aligned[0], mapped.argmax[0], 0).tolist() == expected


def test_sentencepiece_teacher_with_dummy_prefix_and_byte_fallback(tmp_path, char_student_tokenizer):
    teacher = sentencepiece_teacher_tokenizer(tmp_path / "teacher")
    alignment, batch, _ = align(char_student_tokenizer, teacher, "café 😀 12", "Sum:")
    # a plain-text prompt is passed as it is, with the teacher's own BOS
    assert teacher.convert_ids_to_tokens(batch.prompt_ids[0][batch.prompt_mask[0].bool()])[0] == "<s>"
    completion = teacher.convert_ids_to_tokens(batch.completion_ids[0][batch.completion_mask[0].bool()])
    assert completion == ["▁ca", "f", "é", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁", "12", "</s>"]
    # student: c a f é ' ' 😀 ' ' 1 2 EOS; the dummy prefix's space is not the text's
    assert batch.sync_index[0].tolist() == [0, -1, 1, 2, 3, 4, 8, 9, -1, 10]
    assert batch.group_index[0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 6, 7]
    assert batch.teacher_group[0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 5, 6, 7]
    s = char_student_tokenizer.convert_tokens_to_ids
    table = alignment.vocabulary.teacher_to_student
    t = teacher.convert_tokens_to_ids
    assert table[t("▁ca")] == s(" ") and table[t("<0xF0>")] == -1 and table[t("12")] == s("1")
    assert table[t("</s>")] == char_student_tokenizer.eos_token_id  # the end of turn, by role
    assert table[t("<unk>")] == s("<unk>") and table[t("<s>")] == -1  # other special tokens by content, or none


def test_topk_entries_on_the_same_student_id_add_up():
    ids = torch.tensor([[[5, 7, 5, -1]]])
    logps = torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]))
    merged_ids, merged, valid = merge_topk(ids, logps)
    assert valid.tolist() == [[[True, True, False, False]]]
    assert merged_ids[valid].tolist() == [5, 7]
    assert merged[valid].exp().tolist() == pytest.approx([0.6, 0.3])
    assert (merged[~valid].exp() == 0).all()


def test_tokenizer_without_byte_mapping_fails_naming_it(tmp_path, char_student_tokenizer):
    backend = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    wordpiece = _wrap(backend, tmp_path / "wp", unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"The teacher's tokenizer .* has a decoder \(WordPiece\)"):
        TokenBytes.of(wordpiece, "teacher")


# ------------------------------------------------------------------ the permutation identity


def permuted_char_tokenizer(tokenizer, permutation):
    """The same characters, specials and chat template, each id `i` moved to `permutation[i]`."""
    from tokenizers import Regex

    vocab = {token: int(permutation[index]) for token, index in tokenizer.get_vocab().items()}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(""), behavior="isolated")
    backend.decoder = decoders.Fuse()
    permuted = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                       unk_token="<unk>", additional_special_tokens=["<|system|>", "<|user|>",
                                                                                    "<|assistant|>"],
                                       padding_side="left")
    permuted.chat_template = CHAT_TEMPLATE
    return permuted


def permuted_model(model, permutation, num_ids):
    """`model` with the rows of its first `num_ids` ids moved as the tokenizer's ids moved (padding rows stay)."""
    import copy

    moved = copy.deepcopy(model)
    index = torch.arange(model.config.vocab_size)
    index[torch.as_tensor(permutation)] = torch.arange(num_ids)  # new id -> old id
    with torch.no_grad():
        for new, old in ((moved.get_input_embeddings(), model.get_input_embeddings()),
                         (moved.get_output_embeddings(), model.get_output_embeddings())):
            new.weight.copy_(old.weight[index])
    return moved


LOSS_METRICS = ("guidance/loss", "guidance/coef", "gap/reverse_kl", "gap/mismatch_ratio", "gap/aligned_ratio")
MODES = ["tgpo", "tgpo_topk", "rkl_topk", "rkl_k3", "kdrl", "opd"]


@pytest.mark.parametrize("mode", MODES)
def test_permuted_teacher_scores_exactly_like_the_shared_vocabulary(tmp_path, student, teacher, tokenizer, dataset,
                                                                    mode):
    import copy

    generator = torch.Generator().manual_seed(0)
    permutation = torch.randperm(len(tokenizer), generator=generator).tolist()
    permuted_tokenizer = permuted_char_tokenizer(tokenizer, permutation)
    twin = copy.deepcopy(student)
    settings = dict(guidance=mode, guidance_top_k=4, loss_type="bnpo", guidance_schedule="constant")
    shared = make_trainer(tmp_path / "shared", student, teacher, tokenizer, dataset, **settings)
    cross = make_trainer(tmp_path / "cross", twin, permuted_model(teacher, permutation, len(tokenizer)), tokenizer,
                         dataset, trainer_kwargs={"teacher_processing_class": permuted_tokenizer}, **settings)
    assert cross.teacher_scoring.cross_tokenizer and not shared.teacher_scoring.cross_tokenizer

    shared.model.train()
    shared.current_gradient_accumulation_steps = cross.current_gradient_accumulation_steps = 1
    batch = [dataset[i // shared.num_generations] for i in range(shared.args.per_device_train_batch_size)]
    torch.manual_seed(0)
    inputs = shared._generate_and_score_completions(batch)
    cross.model.train()
    scores = cross.score_with_teacher(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                      inputs["completion_mask"], prompts=[row["prompt"] for row in batch])
    cross_inputs = {**inputs, **scores.as_dict()}
    if mode == "opd":
        cross_inputs["advantages"] = inputs["advantages"]
    mask = inputs["completion_mask"].bool()
    assert scores.aligned[mask].all()  # a character tokenizer against itself: every token aligned
    assert torch.allclose(scores.logps[mask], inputs["teacher_logps"][mask], atol=1e-5)
    assert torch.equal(scores.argmax[mask], inputs["teacher_argmax"][mask])
    if mode in ("tgpo_topk", "rkl_topk"):
        assert torch.equal(scores.topk_ids[mask].sort(-1).values, inputs["teacher_topk_ids"][mask].sort(-1).values)

    results = []
    for trainer, batch_inputs in ((shared, inputs), (cross, cross_inputs)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch_inputs)
        loss.backward()
        metrics = {key: trainer._metrics["train"][key][-1] for key in LOSS_METRICS}
        results.append((loss.item(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None],
                        metrics))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    assert metrics_a["gap/aligned_ratio"] == metrics_b["gap/aligned_ratio"] == 1
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-5, abs=1e-6), key
    assert len(grads_a) == len(grads_b)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))


# ------------------------------------------------------------------ training with a teacher of another family


@pytest.fixture(scope="module")
def bpe_teacher_dir(tmp_path_factory):
    """A Llama teacher with a byte-level BPE that merges digits and separators, saved and loaded as users load it."""
    from tgpo_trl.demo.build import cross_tokenizer_corpus
    from tgpo_trl.demo.models import tiny_llama
    from tgpo_trl.demo.tokenizer import build_byte_level_tokenizer

    path = tmp_path_factory.mktemp("bpe_teacher")
    bpe = build_byte_level_tokenizer(cross_tokenizer_corpus(), vocab_size=400)
    tiny_llama(bpe, hidden_size=48, num_layers=2, seed=1).save_pretrained(path)
    bpe.save_pretrained(path)
    return str(path)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode, loss_type", [("tgpo", "dapo"), ("tgpo_topk", "grpo"), ("tgpo_sample", "bnpo"),
                                             ("rkl_topk", "dr_grpo"), ("rkl_k3", "sapo"), ("kdrl", "cispo"),
                                             ("opd", "grpo"), ("none", "luspo")])
def test_teacher_of_another_tokenizer_trains_every_mode(tmp_path, student, tokenizer, dataset, bpe_teacher_dir, mode,
                                                        loss_type):
    before = snapshot(student)
    trainer = make_trainer(tmp_path, student, None, tokenizer, dataset, guidance=mode, loss_type=loss_type,
                           teacher_model_name_or_path=bpe_teacher_dir, guidance_top_k=5)
    assert trainer.teacher_scoring.cross_tokenizer  # detected from the tokenizer beside the teacher's weights
    logs = train_logs(trainer)
    for row in logs:
        assert 0 < row["gap/aligned_ratio"] < 1  # a BPE that merges digits and separators: some positions only
        assert math.isfinite(row["gap/reverse_kl"]) and 0 <= row["gap/mismatch_ratio"] <= 1
        if mode != "none":
            assert math.isfinite(row["guidance/loss"]) and row["guidance/loss"] != 0
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, after[name]) for name, p in before.items())


def test_teacher_object_with_its_tokenizer_passed_and_lora(tmp_path, student, tokenizer, dataset, bpe_teacher_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(bpe_teacher_dir)
    teacher_tokenizer = AutoTokenizer.from_pretrained(bpe_teacher_dir)
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset,
                           trainer_kwargs={"teacher_processing_class": teacher_tokenizer,
                                           "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])})
    assert trainer.teacher_scoring.cross_tokenizer
    (log, *_) = train_logs(trainer)
    assert 0 < log["gap/aligned_ratio"] < 1 and log["guidance/loss"] > 0


def test_shared_tokenizer_logs_an_aligned_ratio_of_one(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset)
    assert not trainer.teacher_scoring.cross_tokenizer
    assert all(row["gap/aligned_ratio"] == 1.0 for row in train_logs(trainer))


def test_teacher_tokenizer_without_byte_mapping_fails_at_construction(tmp_path, student, teacher, tokenizer, dataset):
    backend = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "[PAD]": 1, "a": 2, "##b": 3}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    wordpiece = _wrap(backend, tmp_path / "wp", unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(ValueError, match=r"The teacher's tokenizer .*\(WordPiece\)"):
        make_trainer(tmp_path, student, teacher, tokenizer, dataset,
                     trainer_kwargs={"teacher_processing_class": wordpiece})


def test_tokenizer_that_is_not_fast_fails_naming_it():
    class SlowTokenizer:  # what a Python-only tokenizer offers: no `backend_tokenizer`
        name_or_path = "some/slow-tokenizer"

    with pytest.raises(ValueError, match=r"The student's tokenizer \(some/slow-tokenizer, SlowTokenizer\) is not a fast"):
        TokenBytes.of(SlowTokenizer(), "student")


def test_unmatched_teacher_token_maps_to_the_longest_student_prefix():
    import numpy as np

    from tgpo_trl.alignment import VocabularyMap

    def token_bytes(pieces):
        return TokenBytes(pieces, [None] * len(pieces), np.array([len(p) for p in pieces]),
                          np.zeros(len(pieces), dtype=bool), "plain")

    student = token_bytes([b"a", b"b", b"ab"])
    teacher = token_bytes([b"a", b"b", b"abb", b"aba", b"ba", b"ab"])
    # 'abb' and 'aba' are longer than any student token: their longest student prefix is 'ab'
    assert VocabularyMap(teacher, student, [], None, 3).teacher_to_student.tolist() == [0, 1, 2, 2, 1, 2]
    # a student id beyond the student's rows is never a target
    assert VocabularyMap(teacher, student, [], None, 2).teacher_to_student.tolist() == [0, 1, 0, 0, 1, 0]


# ------------------------------------------------------------------ continuation targets


def test_continuation_targets_inside_teacher_tokens_as_worked_by_hand(tmp_path, char_student_tokenizer):
    teacher = byte_level_teacher_tokenizer(tmp_path / "teacher")
    alignment = CrossTokenizerAlignment(char_student_tokenizer, teacher, len(char_student_tokenizer),
                                        targets="continuation")
    ids = torch.tensor([student_ids(char_student_tokenizer, TEXT)])
    batch = alignment.teacher_batch([[{"role": "user", "content": "1+2="}]], ids, torch.ones_like(ids))
    # inside ' ca' at offsets 1, 2; inside '12' and '34' at offset 1
    assert batch.cover_index[0].tolist() == [-1, 0, 0, -1, -1, -1, -1, -1, -1, 8, -1, -1, 10, -1, -1, -1, -1]
    assert batch.cover_offset[0][[1, 2, 9, 12]].tolist() == [1, 2, 1, 1]
    t_ids = batch.completion_ids
    argmax = t_ids.clone()
    argmax[0, 10] = teacher.convert_tokens_to_ids("12")  # at '34' the teacher predicts '12', which the text denies
    scores = TeacherScores(logps=torch.zeros(t_ids.shape), argmax=argmax, valid=torch.ones_like(t_ids, dtype=torch.bool))
    mapped = alignment.to_student(scores, batch)
    s = char_student_tokenizer.convert_tokens_to_ids
    aligned = mapped.aligned[0].tolist()
    assert aligned == [True, True, True, True, True, True, False, True, True, True, True, True, False, True, True,
                       True, True]
    # ' ca' continues as 'c', 'a'; '12' as '2'; position 11 is a sync point whose predicted '12' maps to '1'
    assert [mapped.argmax[0, t].item() for t in (1, 2, 9, 11)] == [s("c"), s("a"), s("2"), s("1")]
    # sync-point targets are unchanged by the rule
    sync_only = CrossTokenizerAlignment(char_student_tokenizer, teacher, len(char_student_tokenizer))
    sync_batch = sync_only.teacher_batch([[{"role": "user", "content": "1+2="}]], ids, torch.ones_like(ids))
    sync_mapped = sync_only.to_student(scores, sync_batch)
    both = sync_mapped.aligned[0]
    assert torch.equal(mapped.argmax[0][both], sync_mapped.argmax[0][both]) and mapped.aligned[0][both].all()


def test_continuation_targets_train_every_target_mode(tmp_path, student, tokenizer, dataset, bpe_teacher_dir):
    ratios = {}
    for rule in ("sync", "continuation"):
        for mode in ("tgpo", "tgpo_topk", "tgpo_sample"):
            trainer = make_trainer(tmp_path / rule / mode, student, None, tokenizer, dataset, guidance=mode,
                                   teacher_model_name_or_path=bpe_teacher_dir, cross_tokenizer_targets=rule,
                                   guidance_top_k=5, max_steps=1)
            (log,) = train_logs(trainer)
            assert math.isfinite(log["guidance/loss"]) and log["guidance/loss"] != 0
            ratios[rule, mode] = log["gap/aligned_ratio"]
    assert ratios["continuation", "tgpo"] > ratios["sync", "tgpo"]  # more positions guided
    with pytest.raises(ValueError, match="cross_tokenizer_targets"):
        from tgpo_trl import TGPOConfig

        TGPOConfig(output_dir="unused", use_cpu=True, cross_tokenizer_targets="inside")


def test_a_padding_row_the_student_sampled_gets_no_share_and_moves_nothing_else(tmp_path, char_student_tokenizer):
    """A student's sampler (vLLM's or HF's) can emit a padding row beyond its tokenizer: it writes no bytes, gets no
    target and no share of any group's log-probability, and every other position aligns as without it."""
    teacher = byte_level_teacher_tokenizer(tmp_path / "teacher")
    rows = len(char_student_tokenizer) + 4
    alignment = CrossTokenizerAlignment(char_student_tokenizer, teacher, student_rows=rows)
    plain = student_ids(char_student_tokenizer, TEXT)
    padded = [*plain[:5], rows - 1, *plain[5:]]  # a padding id sampled after ' café'
    batches = [alignment.teacher_batch([[{"role": "user", "content": "1+2="}]], torch.tensor([ids]),
                                       torch.ones(1, len(ids), dtype=torch.long)) for ids in (plain, padded)]
    assert torch.equal(batches[0].completion_ids, batches[1].completion_ids)  # the same text for the teacher
    t_ids = batches[0].completion_ids
    scores = [TeacherScores(logps=-torch.arange(1.0, t_ids.size(1) + 1).unsqueeze(0), argmax=t_ids.clone(),
                            valid=torch.ones_like(t_ids, dtype=torch.bool)) for _ in batches]
    plain_scores, padded_scores = (alignment.to_student(score, batch) for score, batch in zip(scores, batches,
                                                                                                   strict=True))
    keep = [index for index in range(len(padded)) if index != 5]
    assert not padded_scores.aligned[0, 5] and not padded_scores.valid[0, 5]
    for key in ("logps", "valid", "aligned", "argmax"):
        assert torch.equal(getattr(padded_scores, key)[0, keep], getattr(plain_scores, key)[0]), key
