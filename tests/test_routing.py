"""Several teachers, each row routed to the teacher its `teacher_id` column names: every row is scored by its own
teacher and only by it, the per-teacher metrics against a recomputation from full logits, one teacher exactly as
before, unknown ids refused early, in-process and served, shared-vocabulary and cross-tokenizer teachers in one run, a
resume, the model card, and the mapping syntax of the config, YAML and the command line."""

import json
import math

import pytest
import torch
import yaml
from conftest import config_settings, length_reward, make_config, train_logs
from datasets import Dataset
from test_served_teacher import Recorded, models, rows_of  # noqa: F401  (`models`: the served tests' saved models)
from test_trainer import full_logps
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import TrlParser
from vllm_standin import StandInServer

from tgpo_trl import TGPOConfig, TGPOTrainer
from tgpo_trl.demo.models import tiny_qwen2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def teachers(tokenizer):
    """Two teachers that disagree at every position on purpose: `b` is `a` with its output rows shifted by one id, so
    `b`'s logit for id `i` is `a`'s for `i + 1` and its argmax is always `a`'s minus one."""
    a = tiny_qwen2(tokenizer, hidden_size=48, num_layers=2, seed=1)
    b = tiny_qwen2(tokenizer, hidden_size=48, num_layers=2, seed=1)
    with torch.no_grad():
        b.lm_head.weight.copy_(torch.roll(a.lm_head.weight, shifts=-1, dims=0))
    return {"a": a, "b": b}


def routed_dataset(ids=("a", "b")):
    prompts = [[{"role": "user", "content": f"{i}+{i + 1}="}] for i in range(16)]
    return Dataset.from_dict({"prompt": prompts, "teacher_id": [ids[i % len(ids)] for i in range(16)]})


def routed_trainer(tmp_path, student, teachers, tokenizer, dataset=None, **overrides):
    settings = {"guidance": "tgpo", "use_task_reward": False, "loss_type": "grpo", "guidance_schedule": "constant",
                "max_steps": 1, **overrides}
    return TGPOTrainer(model=student, reward_funcs=length_reward, args=make_config(tmp_path, **settings),
                       train_dataset=dataset if dataset is not None else routed_dataset(), processing_class=tokenizer,
                       teacher_model=teachers)


def test_each_row_is_scored_by_its_own_teacher_and_the_metrics_are_per_teacher(tmp_path, student, teachers,
                                                                             tokenizer):
    trainer = routed_trainer(tmp_path, student, teachers, tokenizer, per_device_train_batch_size=16)
    assert trainer.teachers.names == ["a", "b"] and trainer.teacher_model is None
    references = []
    compute_loss = trainer.compute_loss

    def recompute(model, inputs, *args, **kwargs):
        with torch.no_grad():
            mask = inputs["completion_mask"].bool()
            student_logps = full_logps(trainer.model, inputs)
            own = {name: full_logps(teacher.model, inputs) for name, teacher in zip(
                trainer.teachers.names, trainer.teachers, strict=True)}
            y = inputs["completion_ids"]
            expected = {}
            for index, name in enumerate(trainer.teachers.names):
                rows = (inputs["teacher_index"] == index).unsqueeze(1) & mask
                other = own["b" if name == "a" else "a"]
                # the row's targets are its own teacher's, and the two teachers disagree at every token
                assert torch.equal(inputs["teacher_argmax"][rows], own[name].argmax(-1)[rows])
                assert (other.argmax(-1)[rows] != own[name].argmax(-1)[rows]).all()
                s_y, t_y = (logps.gather(-1, y[..., None])[..., 0] for logps in (student_logps, own[name]))
                term = -student_logps.gather(-1, own[name].argmax(-1, keepdim=True))[..., 0]
                expected[name] = {
                    "guidance/loss": term[rows].mean().item(),
                    "gap/reverse_kl": (s_y - t_y)[rows].mean().item(),
                    "gap/mismatch_ratio": (own[name].argmax(-1) != y)[rows].float().mean().item(),
                    "gap/aligned_ratio": 1.0,
                    "teacher/token_share": (rows.sum() / mask.sum()).item(),
                }
            references.append(expected)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recompute
    (log,) = train_logs(trainer)
    (expected,) = references
    assert 0 < expected["a"]["teacher/token_share"] < 1
    for name, metrics in expected.items():
        for key, value in metrics.items():
            assert log[f"{key}/{name}"] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{key}/{name}"
    assert log["teacher/token_share/a"] + log["teacher/token_share/b"] == pytest.approx(1.0)


def scored_batch(trainer, dataset):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    batch = [dataset[i // trainer.num_generations] for i in range(trainer.args.per_device_train_batch_size)]
    inputs = trainer._generate_and_score_completions(batch)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return inputs, loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None], metrics


def test_one_teacher_named_by_a_mapping_is_the_single_teacher_exactly(tmp_path, teachers, tokenizer):
    dataset = routed_dataset()
    runs = {}
    for name, teacher in (("plain", teachers["a"]), ("mapping", {"a": teachers["a"]})):
        student = tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0)
        runs[name] = scored_batch(routed_trainer(tmp_path / name, student, teacher, tokenizer, dataset), dataset)
    (inputs_a, loss_a, grads_a, metrics_a), (inputs_b, loss_b, grads_b, metrics_b) = runs["plain"], runs["mapping"]
    assert "teacher_index" not in inputs_b and set(inputs_a) == set(inputs_b)
    for key in inputs_a:
        if isinstance(inputs_a[key], torch.Tensor):
            assert torch.equal(inputs_a[key], inputs_b[key]), key
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert metrics_a == metrics_b and not any(key.endswith("/a") for key in metrics_b)


def test_routing_over_two_copies_of_one_teacher_scores_as_that_teacher(tmp_path, teachers, tokenizer):
    """The routed scores come back in the batch's row order: two copies of one teacher, each scoring its own rows,
    give that teacher's scores of the whole batch."""
    dataset = routed_dataset()
    copy = tiny_qwen2(tokenizer, hidden_size=48, num_layers=2, seed=1)
    runs = {}
    for name, teacher in (("single", teachers["a"]), ("routed", {"a": teachers["a"], "b": copy})):
        student = tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0)
        runs[name] = scored_batch(routed_trainer(tmp_path / name, student, teacher, tokenizer, dataset,
                                                 guidance="tgpo_topk", guidance_top_k=4), dataset)
    (single, loss_a, _, _), (routed, loss_b, _, metrics) = runs["single"], runs["routed"]
    assert set(routed["teacher_index"].tolist()) == {0, 1}
    mask = single["completion_mask"].bool()
    assert torch.equal(single["teacher_argmax"][mask], routed["teacher_argmax"][mask])
    assert torch.equal(single["teacher_topk_ids"][mask], routed["teacher_topk_ids"][mask])
    assert torch.allclose(single["teacher_logps"][mask], routed["teacher_logps"][mask], atol=1e-6)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    assert metrics["teacher/token_share/a"] + metrics["teacher/token_share/b"] == pytest.approx(1.0)


def test_a_row_without_a_known_teacher_is_refused_before_training(tmp_path, student, teachers, tokenizer):
    with pytest.raises(ValueError, match=r"Row 2 of `train_dataset` has `teacher_id` = 'c', which is not one of the "
                                         r"run's teachers \['a', 'b'\]"):
        routed_trainer(tmp_path, student, teachers, tokenizer, routed_dataset(ids=("a", "b", "c")))
    with pytest.raises(ValueError, match=r"`train_dataset` has no `domain` column .*several teachers \['a', 'b'\]"):
        routed_trainer(tmp_path, student, teachers, tokenizer, teacher_id_column="domain")
    # an iterable dataset cannot be read up front: its first batch with an unknown id stops the run there
    trainer = routed_trainer(tmp_path, student, teachers, tokenizer,
                             routed_dataset(ids=("a", "z")).to_iterable_dataset())
    with pytest.raises(ValueError, match=r"A row of this batch has `teacher_id` = 'z', which is not one of"):
        trainer.train()
    # a single teacher needs no column
    single = routed_trainer(tmp_path, student, teachers["a"], tokenizer, Dataset.from_dict(
        {"prompt": routed_dataset()["prompt"]}))
    assert len(single.teachers) == 1 and not single.teachers.routed


@pytest.mark.parametrize("settings, message", [
    ({"teacher_model_name_or_path": {"a": "x"}, "teacher_server_url": "http://h:1"},
     r"`teacher_model_name_or_path` maps teacher ids.*`teacher_server_url` is a single value"),
    ({"teacher_model_name_or_path": {"math/v2": "x"}}, r"teacher ids \['math/v2'\]"),
    ({"teacher_model_name_or_path": {"a": "x"}, "teacher_model_revision": {"c": "main"}},
     r"`teacher_model_revision` names teachers \['c'\]"),
])
def test_inconsistent_teacher_mappings_name_the_field(tmp_path, student, tokenizer, settings, message):
    with pytest.raises(ValueError, match=message):
        TGPOTrainer(model=student, reward_funcs=length_reward, args=make_config(tmp_path, **settings),
                    train_dataset=routed_dataset(), processing_class=tokenizer)


def test_a_teacher_id_with_neither_model_nor_server_is_named(tmp_path, student, teachers, tokenizer):
    with pytest.raises(ValueError, match=r"Teacher 'b' has neither a model"):
        routed_trainer(tmp_path, student, {"a": teachers["a"], "b": None}, tokenizer)


def test_a_served_cross_tokenizer_teacher_beside_an_in_process_one(tmp_path, models):  # noqa: F811
    """`a` shares the student's tokenizer and runs in process; `b` has a byte-level BPE and is served: each row of
    each slice holds the scores its own teacher gives it alone."""
    dataset = routed_dataset()
    with StandInServer(models["bpe_teacher"]) as server:
        trainer = TGPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(models["student"]), reward_funcs=length_reward,
            args=TGPOConfig(**config_settings(
                tmp_path, teacher_model_name_or_path={"a": models["teacher"], "b": models["bpe_teacher"]},
                teacher_server_url={"b": server.url}, guidance="tgpo_topk", guidance_top_k=4,
                cross_tokenizer_targets="continuation", per_device_train_batch_size=8, gradient_accumulation_steps=2,
                steps_per_generation=2, max_steps=2, teacher_server_max_retries=1)),
            train_dataset=dataset, processing_class=models["tokenizer"],
        )
        a, b = trainer.teachers
        assert a.model is not None and not a.scoring.cross_tokenizer
        assert b.server is not None and b.scoring.cross_tokenizer
        recorded = Recorded(trainer)
        logs = train_logs(trainer)
        template = {tuple(models["tokenizer"].apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                                  tokenize=True, return_dict=False)): row["prompt"]
                    for row in dataset}
        seen = set()
        for inputs in recorded.slices:
            for row in range(inputs["completion_ids"].size(0)):
                tensors = rows_of(inputs, row)
                teacher = int(inputs["teacher_index"][row])
                seen.add(teacher)
                prompt = template[tuple(tensors[0][tensors[1].bool()].tolist())]
                alone = trainer.score_with_teacher(*tensors, prompts=[prompt], route=torch.tensor([teacher]))
                mask = tensors[3].bool()
                assert torch.equal(inputs["teacher_aligned"][row:row + 1][mask], alone.aligned[mask])
                aligned = mask & alone.aligned
                assert torch.equal(inputs["teacher_argmax"][row:row + 1][aligned], alone.argmax[aligned])
                valid = mask & alone.valid
                assert torch.allclose(inputs["teacher_logps"][row:row + 1][valid], alone.logps[valid], atol=1e-5)
        assert seen == {0, 1}
    both = [log for log in logs if "gap/aligned_ratio/a" in log and "gap/aligned_ratio/b" in log]
    assert both  # a step whose batch held rows of both teachers
    for log in both:
        assert log["gap/aligned_ratio/a"] == 1.0 and 0 < log["gap/aligned_ratio/b"] < 1
        assert log["teacher/token_share/a"] + log["teacher/token_share/b"] == pytest.approx(1.0)
        assert math.isfinite(log["guidance/loss/a"]) and math.isfinite(log["guidance/loss/b"])
    assert all(log["teacher/wait_time"] >= 0 for log in logs)  # the served teacher's wait, beside the in-process one


def test_a_resumed_run_keeps_routing_and_ends_where_an_uninterrupted_one_does(tmp_path, teachers, tokenizer):
    class StopAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    def run(path, resume=None, callbacks=()):
        student = tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0)
        trainer = routed_trainer(path, student, teachers, tokenizer, max_steps=3, save_strategy="steps",
                                 save_steps=1, use_task_reward=True)
        for callback in callbacks:
            trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a")
    run(tmp_path / "b", callbacks=[StopAfterFirstStep()])  # killed after its first step, as far as the checkpoint goes
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "out" / "checkpoint-1"))
    steps = [row for row in resumed.state.log_history if "loss" in row and row["step"] > 1]
    assert [row["step"] for row in steps] == [2, 3]
    assert all("gap/reverse_kl/a" in row and "gap/reverse_kl/b" in row for row in steps)
    expected = uninterrupted.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key


def test_the_model_card_names_every_teacher_and_the_column(tmp_path, student, teachers, tokenizer):
    teachers["a"].config._name_or_path, teachers["b"].config._name_or_path = "org/sum-teacher", "org/product-teacher"
    dataset = routed_dataset().rename_column("teacher_id", "domain")
    trainer = routed_trainer(tmp_path, student, teachers, tokenizer, dataset, teacher_id_column="domain")
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| Teacher `a` | [org/sum-teacher](https://huggingface.co/org/sum-teacher) |" in card
    assert "| Teacher `b` | [org/product-teacher](https://huggingface.co/org/product-teacher) |" in card
    assert "`domain` column" in card and "the teachers `a`" in card


def test_mappings_from_yaml_and_from_the_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "use_cpu": True,
        "teacher_model_name_or_path": {"math": "Qwen/Qwen2.5-Math-7B-Instruct", "code": "org/coder"},
        "teacher_server_url": {"code": ["http://a:8001", "http://b:8001"]},
        "teacher_model_revision": {"math": "main"},
    }))
    parser = TrlParser((TGPOConfig,))
    (config,) = parser.parse_args_and_config(["--config", str(recipe)])
    assert config.teacher_model_name_or_path == {"math": "Qwen/Qwen2.5-Math-7B-Instruct", "code": "org/coder"}
    assert config.teacher_server_url == {"code": ["http://a:8001", "http://b:8001"]}
    (config,) = parser.parse_args_and_config([
        "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
        "--teacher_model_name_or_path", '{"math": "m", "code": "c"}',
        "--teacher_server_url", '{"code": "http://a:8001,http://b:8001/v1"}', "--teacher_id_column", "domain",
    ])
    assert config.teacher_model_name_or_path == {"math": "m", "code": "c"}
    assert config.teacher_server_url == {"code": ["http://a:8001", "http://b:8001"]}
    assert config.teacher_id_column == "domain"
    with pytest.raises(ValueError, match=r"`teacher_model_name_or_path` looks like a JSON mapping"):
        TGPOConfig(str(tmp_path), use_cpu=True, teacher_model_name_or_path='{"math": ')


def test_the_gap_report_measures_each_teacher_on_its_own_prompts(tmp_path, teachers, tokenizer):
    """Each teacher's report is the single-teacher report of that teacher on the prompts routed to it (the same
    student, seed and prompts), and each has its own verdict."""
    from tgpo_trl.gap_report import GapReportOptions, RoutedGapReport, measure_gap

    dataset = routed_dataset()
    options = GapReportOptions(gap_num_prompts=4, gap_prompts_per_batch=2, gap_prefix_fractions=[0.5])
    student = tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0)
    routed = measure_gap(routed_trainer(tmp_path / "routed", student, teachers, tokenizer, dataset), dataset, options)
    assert isinstance(routed, RoutedGapReport) and list(routed.reports) == ["a", "b"]
    for name in ("a", "b"):
        own = dataset.filter(lambda row, name=name: row["teacher_id"] == name)
        alone = measure_gap(routed_trainer(tmp_path / name, tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0),
                                           teachers[name], tokenizer, own), own, options)
        assert routed[name]["settings"]["prompts"] == alone["settings"]["prompts"] == 4
        for key in ("reverse_kl", "mismatch_ratio", "guidance_loss", "teacher_prefix_accuracy"):
            assert routed[name][key] == alone[key], (name, key)
        assert routed.verdict["teachers"][name] == alone.verdict
    assert routed["a"]["reverse_kl"] != routed["b"]["reverse_kl"]  # the teachers disagree: the reports differ
    paths = routed.write(tmp_path / "report")
    assert (tmp_path / "report" / "a" / "gap_report.json").exists()
    assert (tmp_path / "report" / "b" / "gap_report.md").exists()
    summary = json.loads((tmp_path / "report" / "gap_report.json").read_text())
    assert set(summary["teachers"]) == {"a", "b"} and summary["teacher_id_column"] == "teacher_id"
    assert "| [b](b/gap_report.md) | 4 |" in (tmp_path / "report" / "gap_report.md").read_text()
    assert len(paths) >= 6


def test_per_teacher_tokenizers_and_revisions(tmp_path, models):  # noqa: F811
    """`teacher_processing_class` and `teacher_model_revision` per teacher: `b`, a model object whose tokenizer is
    given for it alone, is scored across tokenizers; `a` keeps the student's ids; the card shows each revision."""
    bpe = AutoTokenizer.from_pretrained(models["bpe_teacher"])
    trainer = TGPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(models["student"]), reward_funcs=length_reward,
        args=TGPOConfig(**config_settings(tmp_path, teacher_model_revision={"a": "v1", "b": "v2"})),
        train_dataset=routed_dataset(), processing_class=models["tokenizer"],
        teacher_model={"a": AutoModelForCausalLM.from_pretrained(models["teacher"]),
                       "b": AutoModelForCausalLM.from_pretrained(models["bpe_teacher"])},
        teacher_processing_class={"b": bpe},
    )
    a, b = trainer.teachers
    assert not a.scoring.cross_tokenizer and b.scoring.cross_tokenizer
    assert (a.source.revision, b.source.revision) == ("v1", "v2")
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "at revision `v1`" in card and "at revision `v2`" in card
