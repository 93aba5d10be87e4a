"""
Vision-language students: an in-process teacher that shares the student's processor gets the student's image inputs
(as GRPO splits them between chunks), in every guidance mode and in the gap report; every teacher that cannot see the
images is refused before training, naming why, unless `teacher_without_images=True` says it may score without them.
Tiny LLaVA-Next and Gemma 3 models built locally (tests/vlm_models.py), saved to disk and loaded back.
"""

import math

import pytest
import torch
import vlm_models as V
from conftest import config_settings, length_reward, train_logs
from datasets import Dataset
from transformers import AutoTokenizer
from transformers.testing_utils import CaptureLogger
from vllm_standin import StandInServer

import tgpo_trl.gap_report as R
import tgpo_trl.trainer as trainer_module
from tgpo_trl import TGPOConfig, TGPOTrainer
from tgpo_trl.demo.models import tiny_llama
from tgpo_trl.demo.tokenizer import CHATML_TEMPLATE, build_byte_level_tokenizer
from tgpo_trl.teacher import score_completions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODES = ["tgpo", "tgpo_sample", "tgpo_topk", "rkl_topk", "rkl_k3", "kdrl", "opd", "none"]
BLIND_WARNING = "`teacher_without_images=True`: the teacher scores the image prompts without their images"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: a student, a larger teacher, the student's twin (the same weights, saved apart), a teacher of the
    same family whose vision tower cuts images in other patches; and text-only teachers: one sharing the LLaVA-Next
    student's tokenizer, one with a byte-level BPE of its own."""
    root = tmp_path_factory.mktemp("vlm")
    paths = {}
    for family in V.FAMILIES:
        paths[family] = {
            "student": V.save(family, root / family / "student", seed=0),
            "teacher": V.save(family, root / family / "teacher", seed=1, hidden_size=48),
            "twin": V.save(family, root / family / "twin", seed=0),
            "other_patches": V.save(family, root / family / "other_patches", seed=1, patch_size=8),
        }
    tokenizer = V.tokenizer("llava_next")
    tiny_llama(tokenizer, hidden_size=32, seed=2).save_pretrained(root / "text_teacher")
    tokenizer.save_pretrained(root / "text_teacher")
    bpe = build_byte_level_tokenizer([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], vocab_size=300)
    bpe.chat_template = CHATML_TEMPLATE
    tiny_llama(bpe, hidden_size=32, seed=3).save_pretrained(root / "bpe_teacher")
    bpe.save_pretrained(root / "bpe_teacher")
    paths["text_teacher"], paths["bpe_teacher"] = str(root / "text_teacher"), str(root / "bpe_teacher")
    return paths


def vlm_trainer(tmp_path, models, family, teacher="teacher", dataset=None, **overrides):
    """A trainer of `family`'s student on image prompts: 8 rollouts per generation batch, scored in chunks of 4."""
    settings = config_settings(tmp_path, **{"per_device_train_batch_size": 4, "steps_per_generation": 2,
                                            "max_completion_length": 6, "guidance_top_k": 4, **overrides})
    student = models[family]["student"]
    return TGPOTrainer(
        model=student, reward_funcs=length_reward, args=TGPOConfig(**settings),
        train_dataset=dataset if dataset is not None else V.image_dataset(),
        processing_class=V.load(student)[1],
        teacher_model=models[family].get(teacher, models.get(teacher)) if teacher else None,
    )


def generation_batch(trainer, dataset):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = [dataset[i // trainer.num_generations] for i in range(8)]
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(batch)


def image_kwargs(output, with_images=True):
    """The batch's image inputs as a model's own forward takes them, for the whole batch at once."""
    if not with_images:
        return {}
    return {key: output[key] for key in ("pixel_values", "image_sizes", "token_type_ids") if key in output}


@torch.no_grad()
def teacher_log_softmax(teacher, output, with_images=True):
    """The teacher's own forward over the whole batch (no chunks, no scoring pass): log-softmax at every position that
    predicts a completion token."""
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    logits = teacher(input_ids=ids, attention_mask=mask, **image_kwargs(output, with_images)).logits
    return torch.log_softmax(logits[:, output["prompt_ids"].size(1) - 1 : -1].float(), dim=-1)


# ---------------------------------------------------------------------------------------------- the teacher sees them


@pytest.mark.parametrize("family", V.FAMILIES)
def test_the_teacher_scores_with_the_images_the_student_sees(tmp_path, models, family):
    trainer = vlm_trainer(tmp_path, models, family, guidance="tgpo_topk")
    assert trainer._image_refusal is None
    output = generation_batch(trainer, V.image_dataset())
    assert output["pixel_values"] is not None and trainer._forward_batch_size == 4  # scored in 2 chunks
    mask = output["completion_mask"].bool()
    teacher, _ = V.load(models[family]["teacher"])
    seen = teacher_log_softmax(teacher, output)
    y = output["completion_ids"]
    assert torch.allclose(output["teacher_logps"][mask], seen.gather(-1, y[..., None])[..., 0][mask], atol=1e-4)
    assert torch.equal(output["teacher_argmax"][mask], seen.argmax(-1)[mask])
    assert torch.equal(output["teacher_topk_ids"][mask], seen.topk(4, dim=-1).indices[mask])
    # what the teacher predicted without the images: another distribution (what it used to score, silently)
    blind = teacher_log_softmax(teacher, output, with_images=False)
    difference = (output["teacher_logps"] - blind.gather(-1, y[..., None])[..., 0])[mask].abs()
    assert difference.max() > 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", V.FAMILIES)
def test_every_guidance_mode_trains_on_image_prompts(tmp_path, models, family, mode):
    trainer = vlm_trainer(tmp_path, models, family, guidance=mode, max_steps=1)
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    (row,) = train_logs(trainer)
    assert math.isfinite(row["loss"]) and math.isfinite(row["gap/reverse_kl"]) and row["gap/aligned_ratio"] == 1.0
    if mode != "none":  # (without guidance, rewards of equal length leave GRPO nothing to move the student by)
        assert math.isfinite(row["guidance/loss"])
        assert any(not torch.equal(param, before[name]) for name, param in trainer.model.named_parameters())


@pytest.mark.parametrize("family", V.FAMILIES)
def test_a_copy_of_the_student_as_teacher_has_no_gap_on_image_prompts(tmp_path, models, family):
    """The student's twin sees what the student sees: reverse KL 0 and its argmax is the student's. Without the images
    (`teacher_without_images`), the same twin is another model."""
    # one step: the student's first, scored before it moves away from its twin
    (row,) = train_logs(vlm_trainer(tmp_path / "seeing", models, family, teacher="twin", guidance="tgpo", max_steps=1))
    assert abs(row["gap/reverse_kl"]) < 1e-5
    (blind,) = train_logs(vlm_trainer(tmp_path / "blind", models, family, teacher="twin", guidance="tgpo", max_steps=1,
                                      teacher_without_images=True))
    assert abs(blind["gap/reverse_kl"]) > 1e-3


def test_scores_with_images_are_the_same_at_any_chunk_size(tmp_path, models):
    """`score_completions` with the trainer's chunked forward and the image inputs equals the one-forward reference at
    any chunk size (chunks of 1, 3 and 8 rows: GRPO's split of the images, reused)."""
    trainer = vlm_trainer(tmp_path, models, "llava_next", guidance="tgpo")
    output = generation_batch(trainer, V.image_dataset())
    teacher, _ = V.load(models["llava_next"]["teacher"])
    reference = teacher_log_softmax(teacher, output)
    mask = output["completion_mask"].bool()
    for batch_size in (1, 3, 8):
        scores = score_completions(
            trainer.teacher_model, output["prompt_ids"], output["prompt_mask"], output["completion_ids"],
            output["completion_mask"], trainer.teacher_vocab_size, batch_size,
            forward=trainer._get_per_token_logps_and_entropies, image_inputs=trainer._image_inputs(output))
        assert torch.allclose(scores.logps[mask], reference.gather(-1, output["completion_ids"][..., None])[..., 0][mask],
                              atol=1e-4)


# ---------------------------------------------------------------------------------------------- refused, with the reason


def test_a_served_teacher_is_refused_before_any_connection(tmp_path, models):
    with pytest.raises(ValueError, match=r"`image` column.*teacher is served \(`teacher_server_url`\).*carries no "
                                         r"images.*teacher_without_images=True"):
        vlm_trainer(tmp_path, models, "llava_next", teacher=None, teacher_server_url="http://127.0.0.1:9",
                    teacher_model_name_or_path="anything")


@pytest.mark.parametrize(
    ("teacher", "reason"),
    [
        ("text_teacher", r"is a text-only model: it has no vision tower"),
        ("bpe_teacher", r"has another tokenizer: it reads each rollout re-rendered as text"),
        ("other_patches", r"lays images out otherwise than the student's processor \(vision patch size 8 against the "
                          r"student's 4"),
    ],
    ids=["text_only", "other_tokenizer", "other_processor"],
)
def test_a_teacher_that_cannot_see_the_images_is_refused_naming_why(tmp_path, models, teacher, reason):
    with pytest.raises(ValueError, match=rf"`image` column.*{reason}.*teacher_without_images=True"):
        vlm_trainer(tmp_path, models, "llava_next", teacher=teacher)


@pytest.mark.parametrize("teacher", ["text_teacher", "bpe_teacher"])
def test_teacher_without_images_trains_and_says_so_once(tmp_path, models, teacher):
    trainer = vlm_trainer(tmp_path, models, "llava_next", teacher=teacher, teacher_without_images=True,
                          cross_tokenizer_targets="continuation")
    with CaptureLogger(trainer_module.logger) as captured:
        logs = train_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(row["guidance/loss"]) for row in logs)
    assert captured.out.count(BLIND_WARNING) == 1


def test_a_served_text_teacher_without_images(tmp_path, models):
    """The served teacher's token-id protocol carries no images: allowed with `teacher_without_images`, scoring the
    prompts' text and image placeholder tokens."""
    with StandInServer(models["text_teacher"]) as server:
        trainer = vlm_trainer(tmp_path, models, "llava_next", teacher=None, teacher_server_url=server.url,
                              teacher_model_name_or_path=models["text_teacher"], teacher_without_images=True,
                              teacher_server_max_retries=0)
        logs = train_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(row["guidance/loss"]) for row in logs)
    image_id = AutoTokenizer.from_pretrained(models["text_teacher"]).convert_tokens_to_ids("<image>")
    assert any(image_id in prompt for request in server.requests[1:] for prompt in request["prompt"])


def test_evaluation_datasets_with_images_count_too(tmp_path, models):
    """Images in any of several evaluation datasets refuse a teacher that cannot see them; a teacher's processing class
    given as a bare tokenizer leaves the comparison to the models' configs."""
    text = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+1="}] for i in range(8)]})
    settings = config_settings(tmp_path, per_device_train_batch_size=4, steps_per_generation=2, eval_strategy="no")
    student = models["llava_next"]["student"]
    with pytest.raises(ValueError, match=r"`image` column.*text-only model"):
        TGPOTrainer(model=student, reward_funcs=length_reward, args=TGPOConfig(**settings), train_dataset=text,
                    eval_dataset={"plain": text, "pictures": V.image_dataset()}, processing_class=V.load(student)[1],
                    teacher_model=models["text_teacher"])
    with pytest.raises(ValueError, match=r"vision patch size 8 against the student's 4"):
        TGPOTrainer(model=student, reward_funcs=length_reward, args=TGPOConfig(**settings),
                    train_dataset=V.image_dataset(), processing_class=V.load(student)[1],
                    teacher_model=models["llava_next"]["other_patches"],
                    teacher_processing_class=AutoTokenizer.from_pretrained(models["llava_next"]["other_patches"]))


def test_images_met_at_a_batch_are_refused_there(tmp_path, models):
    """A dataset whose image column is not known up front (here: a text dataset at construction) is checked at the
    batch that brings images."""
    text = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+1="}] for i in range(8)]})
    trainer = vlm_trainer(tmp_path, models, "llava_next", teacher="text_teacher", dataset=text)
    with pytest.raises(ValueError, match=r"This batch's prompts have images, but the teacher .* is a text-only model"):
        generation_batch(trainer, V.image_dataset())


# ---------------------------------------------------------------------------------------------- the gap report


@pytest.mark.parametrize("family", V.FAMILIES)
def test_the_gap_report_on_image_prompts(tmp_path, models, family):
    """The twin on image prompts: no token gap (student statistics and teacher scores both with the images), and from
    every prefix it writes exactly the student's continuation (both generate with the images)."""
    def report_for(teacher_without_images):
        trainer = vlm_trainer(tmp_path / str(teacher_without_images), models, family, teacher="twin",
                              teacher_without_images=teacher_without_images, guidance="tgpo",
                              per_device_eval_batch_size=4)
        finished = []
        finish = R.Measurement.finish

        def recording(self, role, *args, **kwargs):
            result = finish(self, role, *args, **kwargs)
            finished.append((role, result[1]))
            return result

        options = R.GapReportOptions(gap_num_prompts=4, gap_prompts_per_batch=2, gap_prefix_fractions=[0.5])
        R.Measurement.finish = recording
        try:
            report = R.measure_gap(trainer, V.image_dataset(4), options)
        finally:
            R.Measurement.finish = finish
        return report, finished

    report, finished = report_for(False)
    assert abs(report["reverse_kl"]) < 1e-5 and report["guidance_loss"] > 0
    teacher_ids = [ids for role, ids in finished if role == "teacher"]
    student_ids = [ids for role, ids in finished if role == "student"]
    assert teacher_ids and teacher_ids == student_ids
    assert report["teacher_prefix_accuracy"] == report["student_prefix_accuracy"]
    blind, _ = report_for(True)
    assert abs(blind["reverse_kl"]) > 1e-3
