"""
A teacher served by vLLM (`teacher_server_url`), tested against `vllm_standin.StandInServer`: a test-only server that
answers in vLLM's format (quirks included, checked against real vLLM by `test_real_vllm_served.py`) from a tiny HF model
saved to disk, starts in a second, and can be made slow, flaky or broken on demand. The same client against real vLLM:
`test_real_vllm_served.py`.
"""

import math
import threading
import time

import pytest
import torch
from conftest import config_settings, length_reward
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from vllm_standin import StandInServer

import tgpo_trl.served as served_module
from tgpo_trl import TGPOConfig, TGPOTrainer
from tgpo_trl.demo.models import tiny_llama, tiny_qwen2
from tgpo_trl.demo.tokenizer import CHAT_TEMPLATE, build_byte_level_tokenizer, build_char_tokenizer
from tgpo_trl.served import ServedTeacher, TeacherServerError


LOSS_METRICS = ("guidance/loss", "gap/reverse_kl", "gap/mismatch_ratio", "gap/aligned_ratio", "guidance/skipped_tokens")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(served_module, "RETRY_BACKOFF_S", 0.01)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A student and a teacher with the same character tokenizer, saved and loaded back as users load them; the
    teacher has exactly the student's rows, so the server's full-vocabulary log-probs are the in-process ones."""
    root = tmp_path_factory.mktemp("served")
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(root / "tokenizer")
    rows = len(tokenizer)
    for name, hidden, seed in (("student", 32, 0), ("teacher", 48, 1)):
        tiny_qwen2(tokenizer, hidden_size=hidden, num_layers=2, seed=seed, vocab_size=rows).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    # a teacher of another family and tokenizer (byte-level BPE), for cross-tokenizer scoring through the server
    corpus = [f"{a}+{b}={a + b}" for a in range(60) for b in range(60)]
    bpe = build_byte_level_tokenizer(corpus, vocab_size=300)
    bpe.chat_template = CHAT_TEMPLATE
    tiny_llama(bpe, hidden_size=48, num_layers=2, seed=2, vocab_size=len(bpe)).save_pretrained(root / "bpe_teacher")
    bpe.save_pretrained(root / "bpe_teacher")
    # a teacher with too few rows for the student's ids
    tiny_qwen2(tokenizer, hidden_size=32, num_layers=1, seed=3, vocab_size=rows - 5).save_pretrained(root / "small")
    tokenizer.save_pretrained(root / "small")
    return {"root": root, "tokenizer": loaded, **{name: str(root / name) for name in
                                                  ("student", "teacher", "bpe_teacher", "small")}}


@pytest.fixture
def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i + 1}="}] for i in range(16)]})


@pytest.fixture
def server(models):
    with StandInServer(models["teacher"]) as running:
        yield running


def trainer_for(tmp_path, models, dataset, server_url=None, student=None, reward_funcs=length_reward,
                callbacks=None, tokenizer=None, teacher_tokenizer=None, **overrides):
    """A trainer whose teacher is in process (`server_url=None`) or served; `models["student"]` with
    `models["tokenizer"]` unless `student` and `tokenizer` are given."""
    defaults = {"guidance_top_k": 4, "loss_type": "bnpo", "guidance_schedule": "constant"}
    settings = config_settings(tmp_path, **{**defaults, **overrides})
    if server_url is None:
        teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    else:
        settings["teacher_server_url"] = server_url
        settings.setdefault("teacher_model_name_or_path", models["teacher"])
        settings.setdefault("teacher_server_max_retries", 1)
        teacher = None
    return TGPOTrainer(
        model=student if student is not None else AutoModelForCausalLM.from_pretrained(models["student"]),
        reward_funcs=reward_funcs, args=TGPOConfig(**settings), train_dataset=dataset,
        processing_class=tokenizer or models["tokenizer"], teacher_model=teacher, callbacks=callbacks,
        teacher_processing_class=teacher_tokenizer,
    )


def loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {key: trainer._metrics["train"][key][-1] for key in LOSS_METRICS}
    return loss.item(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None], metrics


def generate(trainer, dataset):
    trainer.model.train()
    batch = [dataset[i // trainer.num_generations] for i in range(trainer.args.per_device_train_batch_size)]
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(batch)


# ---------------------------------------------------------------------------------------------- same as in process


@pytest.mark.parametrize("mode", ["tgpo", "tgpo_topk", "opd", "kdrl"])
def test_served_teacher_trains_like_the_in_process_teacher_with_the_same_weights(tmp_path, models, dataset, server,
                                                                                mode):
    local = trainer_for(tmp_path / "local", models, dataset, guidance=mode)
    remote = trainer_for(tmp_path / "remote", models, dataset, server.url, guidance=mode)
    assert remote.teacher_model is None and remote.teacher_server is not None
    assert not remote.teacher_scoring.cross_tokenizer
    inputs_local, inputs_remote = generate(local, dataset), generate(remote, dataset)
    assert torch.equal(inputs_local["completion_ids"], inputs_remote["completion_ids"])  # the same rollouts
    assert len(server.requests) > 1  # the probe, then the batch
    mask = inputs_local["completion_mask"].bool()
    assert mask.sum() > 0
    for key in ("teacher_valid", "teacher_aligned"):
        assert torch.equal(inputs_local[key][mask], inputs_remote[key][mask]), key
    assert torch.allclose(inputs_local["teacher_logps"][mask], inputs_remote["teacher_logps"][mask], atol=1e-4)
    assert torch.equal(inputs_local["teacher_argmax"][mask], inputs_remote["teacher_argmax"][mask])
    if mode == "tgpo_topk":
        for key in ("teacher_topk_ids", "teacher_topk_logps"):
            assert torch.allclose(inputs_local[key][mask].double(), inputs_remote[key][mask].double(), atol=1e-4), key

    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = (loss_and_grads(local, inputs_local),
                                                                  loss_and_grads(remote, inputs_remote))
    assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-6)
    for key in LOSS_METRICS:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-6), key
    assert len(grads_a) == len(grads_b) > 0
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(grad_a, grad_b, rtol=1e-3, atol=1e-6)


def test_requests_go_out_before_the_rewards_are_computed(tmp_path, models, dataset, server):
    """The teacher's requests are sent as soon as the completions exist, so rewards and GRPO's forwards overlap them."""
    arrived_during_rewards = []

    def reward(completions, **kwargs):
        # while the rewards are being computed, the batch's request reaches the server
        deadline = time.monotonic() + 10
        while len(server.requests) == probes and time.monotonic() < deadline:
            time.sleep(0.01)
        arrived_during_rewards.append(len(server.requests) - probes)
        return [0.0] * len(completions)

    trainer = trainer_for(tmp_path, models, dataset, server.url, reward_funcs=reward)
    probes = len(server.requests)
    generate(trainer, dataset)
    assert arrived_during_rewards == [1] and len(server.requests) == probes + 1


def test_tgpo_sample_draws_from_the_teachers_top_k(tmp_path, models, dataset, server):
    local = trainer_for(tmp_path / "local", models, dataset, guidance="tgpo_topk")
    remote = trainer_for(tmp_path / "remote", models, dataset, server.url, guidance="tgpo_sample")
    inputs = generate(local, dataset)
    mask = inputs["completion_mask"].bool()
    draws = [remote.score_with_teacher(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                       inputs["completion_mask"]) for _ in range(4)]
    assert {request["prompt_logprobs"] for request in server.requests[-4:]} == {4}  # `guidance_top_k`
    for scores in draws:
        assert scores.aligned[mask].all()
        assert (scores.sample.unsqueeze(-1) == inputs["teacher_topk_ids"]).any(-1)[mask].all()
    assert any(not torch.equal(draws[0].sample[mask], other.sample[mask]) for other in draws[1:])  # a sample


def test_cross_tokenizer_scoring_composes_with_a_served_teacher(tmp_path, models, dataset):
    """Where the teacher runs and how its ids map are separate layers: a BPE teacher served scores like in process."""
    bpe = AutoTokenizer.from_pretrained(models["bpe_teacher"])
    with StandInServer(models["bpe_teacher"]) as server:
        settings = dict(guidance="tgpo_topk", cross_tokenizer_targets="continuation")
        local = TGPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(models["student"]), reward_funcs=length_reward,
            args=TGPOConfig(**config_settings(tmp_path / "local", guidance_top_k=4, **settings)), train_dataset=dataset,
            processing_class=models["tokenizer"], teacher_model=AutoModelForCausalLM.from_pretrained(models["bpe_teacher"]),
            teacher_processing_class=bpe,
        )
        remote = trainer_for(tmp_path / "remote", models, dataset, server.url, teacher_model_name_or_path=models[
            "bpe_teacher"], **settings)
        assert local.teacher_scoring.cross_tokenizer and remote.teacher_scoring.cross_tokenizer
        inputs_local, inputs_remote = generate(local, dataset), generate(remote, dataset)
    mask = inputs_local["completion_mask"].bool()
    assert torch.equal(inputs_local["teacher_aligned"], inputs_remote["teacher_aligned"])
    aligned = mask & inputs_local["teacher_aligned"]
    assert aligned.sum() > 0
    assert torch.equal(inputs_local["teacher_argmax"][aligned], inputs_remote["teacher_argmax"][aligned])
    valid = mask & inputs_local["teacher_valid"]
    assert torch.equal(valid, mask & inputs_remote["teacher_valid"])
    assert torch.allclose(inputs_local["teacher_logps"][valid], inputs_remote["teacher_logps"][valid], atol=1e-4)
    slots = inputs_local["teacher_topk_valid"] & aligned.unsqueeze(-1)
    assert torch.equal(slots, inputs_remote["teacher_topk_valid"] & aligned.unsqueeze(-1))
    assert torch.allclose(inputs_local["teacher_topk_logps"][slots], inputs_remote["teacher_topk_logps"][slots],
                          atol=1e-4)


# ---------------------------------------------------------------------------------------------- start-up probe


def test_server_down_at_start_fails_before_the_student_is_loaded(tmp_path, models, dataset, monkeypatch):
    with StandInServer(models["teacher"]) as server:
        url = server.url
    monkeypatch.setattr("trl.GRPOTrainer.__init__", lambda *args, **kwargs: pytest.fail("the student was loaded"))
    with pytest.raises(TeacherServerError, match=r"cannot connect") as error:
        TGPOTrainer(model=models["student"], reward_funcs=length_reward, train_dataset=dataset,
                    args=TGPOConfig(**config_settings(tmp_path, teacher_server_url=url, teacher_server_max_retries=1,
                                                      teacher_model_name_or_path=models["teacher"])))
    assert url in str(error.value) and "vllm serve" in str(error.value)


@pytest.mark.parametrize(
    ("server_kwargs", "overrides", "message"),
    [
        ({"served_model_name": "other"}, {}, r"serves \['other'\].*--served-model-name"),
        ({"max_logprobs": 3}, {"guidance": "tgpo_topk"}, r"greater than max allowed: 3.*--max-logprobs"),
        ({"max_model_len": 8}, {}, r"max_model_len` 8.*--max-model-len"),
        ({"delay_s": 1.0}, {"teacher_server_timeout": 0.2}, r"no answer within 0.2 s \(`teacher_server_timeout`\)"),
    ],
    ids=["model_name", "k_above_cap", "max_model_len", "slow"],
)
def test_a_misconfigured_server_is_named_with_the_flag_to_change(tmp_path, models, dataset, server_kwargs, overrides,
                                                                 message):
    with StandInServer(models["teacher"], **server_kwargs) as server:
        with pytest.raises(TeacherServerError, match=message) as error:
            trainer_for(tmp_path, models, dataset, server.url, **overrides)
    assert server.url in str(error.value)


def test_a_server_with_another_tokenizer_is_refused(tmp_path, models, dataset):
    """No teacher tokenizer is known locally (the name is not a path), so the shared vocabulary is assumed and the probe
    finds the served model decodes ids otherwise."""
    with StandInServer(models["bpe_teacher"], served_model_name="my-teacher") as server:
        with pytest.raises(TeacherServerError, match=r"decodes token ids differently from the student's tokenizer"):
            trainer_for(tmp_path, models, dataset, server.url, teacher_model_name_or_path="my-teacher")


def test_a_server_whose_vocabulary_is_too_small_is_refused(tmp_path, models, dataset):
    """vLLM takes ids up to its tokenizer's last (so the probe's highest id passes its check) and fails when its model
    has no row for one: the probe's failure says what it sent and why."""
    with StandInServer(models["small"]) as server:
        with pytest.raises(TeacherServerError, match=r"probe scores ids 0\.\.\d+.*fewer output rows"):
            trainer_for(tmp_path, models, dataset, server.url, teacher_model_name_or_path=models["small"])


def test_configuration_errors_name_the_field(tmp_path, models, dataset):
    with pytest.raises(ValueError, match="http:// or https://"):
        TGPOConfig(**config_settings(tmp_path, teacher_server_url="localhost:8000"))
    with pytest.raises(ValueError, match="`teacher_model_init_kwargs`.*`teacher_server_url`"):
        TGPOConfig(**config_settings(tmp_path, teacher_server_url="http://a:1", teacher_model_init_kwargs={"x": 1}))
    with pytest.raises(ValueError, match="`teacher_server_timeout`"):
        TGPOConfig(**config_settings(tmp_path, teacher_server_url="http://a:1", teacher_server_timeout=0))
    config = TGPOConfig(**config_settings(tmp_path, teacher_server_url="http://a:1/v1/, https://b:2"))
    assert config.teacher_server_url == ["http://a:1", "https://b:2"]
    # the command line's list flag with comma-separated replicas (`--teacher_server_url http://a:1,http://b:2`)
    assert TGPOConfig(**config_settings(tmp_path, teacher_server_url=["http://a:1,http://b:2"])).teacher_server_url == [
        "http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="`teacher_model` is a model object"):
        TGPOTrainer(model=models["student"], reward_funcs=length_reward, train_dataset=dataset,
                    args=TGPOConfig(**config_settings(tmp_path, teacher_server_url="http://a:1")),
                    teacher_model=AutoModelForCausalLM.from_pretrained(models["teacher"]))


# ---------------------------------------------------------------------------------------------- failures in a run


class StopServerAt(TrainerCallback):
    """Kill the server once `step` optimizer steps are done, and keep the student's weights at that point."""

    def __init__(self, server, step):
        self.server, self.step, self.weights = server, step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {key: value.clone() for key, value in model.state_dict().items()}
            self.server.stop()


def test_server_killed_mid_run_stops_before_the_optimizer_step_then_resumes(tmp_path, models, dataset):
    server = StandInServer(models["teacher"]).start()
    stop = StopServerAt(server, 2)
    trainer = trainer_for(tmp_path, models, dataset, server.url, callbacks=[stop], max_steps=4, save_strategy="steps",
                          save_steps=1)
    with pytest.raises(TeacherServerError, match=r"stopped at step 2 before the batch reached the optimizer") as error:
        trainer.train()
    assert "checkpoint-2" in str(error.value) and "resume_from_checkpoint" in str(error.value)
    assert trainer.state.global_step == 2
    after = trainer.model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in stop.weights.items())  # no step on the failed batch

    with StandInServer(models["teacher"]) as restarted:
        resumed = trainer_for(tmp_path, models, dataset, restarted.url, max_steps=4, save_strategy="steps",
                              save_steps=1)
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
        assert resumed.state.global_step == 4
        assert len(restarted.requests) >= 3  # the probe, then steps 3 and 4


def test_transient_5xx_is_retried_and_4xx_is_not(models, server):
    tokenizer = models["tokenizer"]
    client = ServedTeacher([server.url], models["teacher"], len(tokenizer), max_retries=2)
    prompt = torch.tensor([[5, 6, 7]])
    completion = torch.tensor([[8, 9, 10, 11]])
    ones = torch.ones_like
    first = client.submit(prompt, ones(prompt), completion, ones(completion)).result()
    server.fail_next(2)
    sent = len(server.requests)
    again = client.submit(prompt, ones(prompt), completion, ones(completion)).result()
    assert len(server.requests) == sent + 3 and torch.equal(first.logps, again.logps)
    server.fail_next(3)
    with pytest.raises(TeacherServerError, match=r"after 3 attempts.*503"):
        client.submit(prompt, ones(prompt), completion, ones(completion)).result()
    sent = len(server.requests)
    client.model = "not-served"
    with pytest.raises(TeacherServerError, match=r"refused the request \(404\).*does not exist"):
        client.submit(prompt, ones(prompt), completion, ones(completion)).result()
    assert len(server.requests) == sent + 1  # never retried


def test_requests_are_spread_over_replicas_bounded_in_tokens_and_in_flight(models):
    tokenizer = models["tokenizer"]
    torch.manual_seed(0)
    prompt = torch.randint(5, len(tokenizer), (12, 4))
    completion = torch.randint(5, len(tokenizer), (12, 6))
    mask = torch.ones_like(completion)
    mask[3, 2:] = 0  # a shorter completion: only its first two tokens are sent
    with StandInServer(models["teacher"]) as one, StandInServer(models["teacher"]) as two:
        client = ServedTeacher([one.url, two.url], models["teacher"], len(tokenizer), request_tokens=20)
        spread = client.submit(prompt, torch.ones_like(prompt), completion, mask).result()
        batches = one.requests + two.requests
    assert len(batches) == 6 and one.requests and two.requests  # 6 requests of 2 rollouts (<= 20 tokens), both busy
    assert sum(len(request["prompt"]) for request in batches) == 12
    assert all(sum(map(len, request["prompt"])) <= 20 for request in batches)
    assert all(request["max_tokens"] == 1 and request["prompt_logprobs"] == 1 for request in batches)
    assert spread.valid[3, :2].all() and not spread.valid[3, 2:].any() and spread.valid[mask.bool()].all()
    assert client._outstanding == [0, 0]  # every request's tokens released once answered

    with StandInServer(models["teacher"], delay_s=0.2) as slow:
        client = ServedTeacher([slow.url], models["teacher"], len(tokenizer), max_concurrent_requests=2,
                               request_tokens=20)
        bounded = client.submit(prompt, torch.ones_like(prompt), completion, mask).result()
    assert len(slow.requests) == 6 and slow.max_in_flight == 2  # 6 requests, never more than 2 at once
    assert torch.equal(bounded.logps, spread.logps) and torch.equal(bounded.argmax, spread.argmax)


def test_a_batch_is_split_over_the_replicas_and_a_slow_one_gets_less_of_it(models):
    """Each request goes to the replica with the fewest tokens outstanding: beside a replica that takes 1 s per request,
    a fast one answers the rest of the batch, where turns would give the slow one every other request (6 s of it)."""
    tokenizer = models["tokenizer"]
    torch.manual_seed(1)
    prompt = torch.randint(5, len(tokenizer), (12, 4))
    completion = torch.randint(5, len(tokenizer), (12, 6))
    ones = torch.ones_like
    with StandInServer(models["teacher"]) as one, StandInServer(models["teacher"]) as two:
        whole = ServedTeacher([one.url, two.url], models["teacher"], len(tokenizer))
        whole.submit(prompt, ones(prompt), completion, ones(completion)).result()
    assert len(one.requests) == len(two.requests) == 1  # 120 tokens, below `request_tokens`: one request per replica
    assert {len(one.requests[0]["prompt"]), len(two.requests[0]["prompt"])} == {6}

    with StandInServer(models["teacher"], delay_s=1.0) as slow, StandInServer(models["teacher"]) as fast:
        client = ServedTeacher([slow.url, fast.url], models["teacher"], len(tokenizer), max_concurrent_requests=2,
                               request_tokens=10)  # one rollout per request: 12 requests, 2 at a time
        start = time.perf_counter()
        scores = client.submit(prompt, ones(prompt), completion, ones(completion)).result()
        seconds = time.perf_counter() - start
    assert len(slow.requests) + len(fast.requests) == 12
    assert len(slow.requests) == 1 and seconds < 2.0  # only the first, sent while both were idle, went to it
    assert scores.valid.all()


def test_minus_9999_and_nan_are_skipped_and_counted(tmp_path, models, dataset):
    """-inf arrives as -9999.0 and NaN as null: those tokens are left out of the guidance and counted, as in process."""
    def hook(log_probs, prompt_ids):
        log_probs = log_probs.clone()
        log_probs[-3, prompt_ids[-2]] = -math.inf  # the next-to-last token: -9999.0
        log_probs[-2, prompt_ids[-1]] = math.nan  # the last token: null
        return log_probs

    with StandInServer(models["teacher"], logprob_hook=hook) as server:
        trainer = trainer_for(tmp_path, models, dataset, server.url, guidance="kdrl")
        inputs = generate(trainer, dataset)
    mask = inputs["completion_mask"].bool()
    lengths = mask.sum(1)
    expected = torch.ones_like(mask)
    for row, length in enumerate(lengths.tolist()):
        expected[row, max(length - 2, 0):length] = False
    assert torch.equal(inputs["teacher_valid"], mask & expected)
    skipped = trainer._metrics["train"]["guidance/skipped_tokens"][-1]
    assert skipped == (mask & ~expected).sum().item() > 0
    assert torch.isfinite(inputs["teacher_logps"]).all()



# ---------------------------------------------------------------------------------------------- scores per training slice


class Recorded:
    """The inputs `_prepare_inputs` hands to each micro-batch, as they were when handed over."""

    def __init__(self, trainer):
        self.slices, prepare = [], trainer._prepare_inputs

        def recording(batch):
            inputs = prepare(batch)
            self.slices.append({key: value.clone() if isinstance(value, torch.Tensor) else value
                                for key, value in inputs.items()})
            return inputs

        trainer._prepare_inputs = recording


def sliced(tmp_path, models, dataset, server_url=None, slices=4, **overrides):
    """A trainer whose generation batch (16 rollouts) is trained in `slices` slices of `16 / slices`."""
    settings = {"max_steps": 1, **overrides}
    return trainer_for(tmp_path, models, dataset, server_url, per_device_train_batch_size=16 // slices,
                       gradient_accumulation_steps=slices, steps_per_generation=slices, **settings)


def rows_of(inputs, row):
    return [inputs[key][row:row + 1] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]


@pytest.mark.parametrize("teacher", ["teacher", "bpe_teacher"])
def test_every_slice_carries_the_scores_of_its_own_rows(tmp_path, models, dataset, teacher):
    """Each row of each slice holds the scores the teacher gives its own prompt and completion scored alone: a row given
    another rollout's scores would train on that rollout's targets."""
    settings = {"guidance": "tgpo_topk", "teacher_model_name_or_path": models[teacher]}
    if teacher == "bpe_teacher":
        settings["cross_tokenizer_targets"] = "continuation"
    template = {tuple(models["tokenizer"].apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                              tokenize=True, return_dict=False)): row["prompt"]
                for row in dataset}
    with StandInServer(models[teacher]) as server:
        trainer = sliced(tmp_path, models, dataset, server.url, **settings)
        recorded = Recorded(trainer)
        trainer.train()
        assert len(recorded.slices) == 4 and len(server.requests) == 1 + 4  # the probe, then one request per slice
        rollouts, compared = set(), 0
        for inputs in recorded.slices:
            for row in range(inputs["completion_ids"].size(0)):
                tensors = rows_of(inputs, row)
                mask = tensors[3].bool()
                prompt = template[tuple(tensors[0][tensors[1].bool()].tolist())]
                alone = trainer.score_with_teacher(*tensors, prompts=[prompt])
                aligned = mask & alone.aligned
                compared += int(aligned.sum())
                assert torch.equal(inputs["teacher_aligned"][row:row + 1][mask], alone.aligned[mask])
                assert torch.equal(inputs["teacher_valid"][row:row + 1][mask], alone.valid[mask])
                assert torch.allclose(inputs["teacher_logps"][row:row + 1][mask & alone.valid],
                                      alone.logps[mask & alone.valid], atol=1e-5)
                assert torch.equal(inputs["teacher_argmax"][row:row + 1][aligned], alone.argmax[aligned])
                assert torch.equal(inputs["teacher_topk_ids"][row:row + 1][aligned], alone.topk_ids[aligned])
                rollouts.add((tuple(tensors[0][0].tolist()), tuple(tensors[2][0][mask[0]].tolist())))
    assert len(rollouts) == 16  # distinct rollouts, so a row given a neighbour's scores would be caught above
    assert compared >= 16


def test_slices_are_grpos_and_train_as_with_the_in_process_teacher(tmp_path, models, dataset, server):
    """With the same seed, the served run's slices are the in-process run's (GRPO's own shuffle-and-split), with the same
    scores, and the step ends at the same weights."""
    runs = {}
    for name, url in (("local", None), ("remote", server.url)):
        trainer = sliced(tmp_path / name, models, dataset, url, guidance="tgpo")
        recorded = Recorded(trainer)
        trainer.train()
        runs[name] = (recorded.slices, trainer.model.state_dict())
    (local, local_weights), (remote, remote_weights) = runs["local"], runs["remote"]
    assert len(local) == len(remote) == 4
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a["completion_ids"], b["completion_ids"]) and torch.equal(a["prompt_ids"], b["prompt_ids"])
        mask = a["completion_mask"].bool()
        assert torch.equal(a["teacher_argmax"][mask], b["teacher_argmax"][mask])
        assert torch.allclose(a["teacher_logps"][mask], b["teacher_logps"][mask], atol=1e-4)
    assert not torch.equal(local[0]["completion_ids"], local[1]["completion_ids"])
    for key, value in local_weights.items():
        assert torch.allclose(value, remote_weights[key], rtol=1e-4, atol=1e-6), key


def test_a_slice_waits_only_for_its_own_requests(tmp_path, models, dataset, server):
    """The requests of slices 2 to 4 are held at the server until slice 1 has been trained: the step completes, so slice
    1 never waited for them, and `teacher/wait_time` < `teacher/request_time`."""
    first_slice_trained, released = threading.Event(), []

    class FirstSlice(TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            first_slice_trained.set()

    trainer = sliced(tmp_path, models, dataset, server.url, callbacks=[FirstSlice()],
                     teacher_server_max_concurrent_requests=1)  # one request at a time, in the order sent
    answered = []

    def hold(body):
        if answered:  # every request after the first slice's
            released.append(first_slice_trained.wait(timeout=10))
        answered.append(time.perf_counter())

    server.request_hook = hold
    trainer.train()
    assert released == [True, True, True]
    logs = [entry for entry in trainer.state.log_history if "teacher/wait_time" in entry]
    assert len(logs) == 1 and 0 <= logs[0]["teacher/wait_time"] < logs[0]["teacher/request_time"]
    assert logs[0]["teacher/request_time"] >= answered[-1] - answered[0]


def test_a_slices_requests_go_out_once_the_previous_slices_are_answered(models, server):
    """A server answers the requests it holds together: the slices' requests are sent in turn, each once the previous
    one's answers are in, so the first slice is back after its own share (16 threads in the pool, all idle)."""
    tokenizer = models["tokenizer"]
    client = ServedTeacher([server.url], models["teacher"], len(tokenizer), max_concurrent_requests=16)
    torch.manual_seed(0)
    prompt, completion = torch.randint(5, len(tokenizer), (4, 4)), torch.randint(5, len(tokenizer), (4, 6))
    ones = torch.ones_like
    events, lock = [], threading.Lock()

    def hook(body):
        with lock:
            events.append(("sent", body["prompt"][0][:4]))
        time.sleep(0.2)

    server.request_hook = hook
    slices = [client.submit(prompt[i:i + 1], ones(prompt[i:i + 1]), completion[i:i + 1], ones(completion[i:i + 1]))
              for i in range(4)]
    answered = []
    for pending in slices:
        pending.result()
        answered.append(pending.answered)
    sent = [prompt for kind, prompt in events]
    assert sent == [prompt[i, :4].tolist() for i in range(4)]  # in slice order, one after another
    assert answered == sorted(answered) and answered[-1] - answered[0] >= 0.5  # not all answered at once


class FailingGroup:
    """The served teacher's `call`-th request (counted from 1 after the probe) fails as an unreachable server would."""

    def __init__(self, trainer, call):
        self.calls, self.call = 0, call
        self._score_group = trainer.teacher_server._score_group
        trainer.teacher_server._score_group = self

    def __call__(self, rows, num_logprobs, *args):
        self.calls += 1
        if self.calls == self.call:
            raise TeacherServerError("The teacher server did not answer POST /v1/completions (injected).")
        return self._score_group(rows, num_logprobs, *args)


@pytest.mark.parametrize("accumulation, failing", [(4, 3), (2, 4)])
def test_a_slice_without_scores_drops_the_generation_batch(tmp_path, models, dataset, server, accumulation, failing):
    """Slice `failing` of 4 cannot be scored: no optimizer step uses the batch (with 2 optimizer steps per batch, the
    first waits for every slice), the earlier slices' gradients are dropped, and the error names the step."""
    trainer = trainer_for(tmp_path, models, dataset, server.url, per_device_train_batch_size=4,
                          gradient_accumulation_steps=accumulation, steps_per_generation=4, max_steps=2,
                          teacher_server_max_concurrent_requests=1)
    FailingGroup(trainer, failing)
    trained = []
    loss = trainer.compute_loss
    trainer.compute_loss = lambda *args, **kwargs: trained.append(1) or loss(*args, **kwargs)
    before = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    with pytest.raises(TeacherServerError, match=r"stopped at step 0 before the batch reached the optimizer"):
        trainer.train()
    assert len(trained) == min(failing, accumulation) - 1 > 0  # slices trained before the failure...
    assert trainer.state.global_step == 0
    assert all(torch.equal(value, before[key]) for key, value in trainer.model.state_dict().items())
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())  # ...their gradients dropped
    assert trainer._buffered_inputs is None  # the next `train()` generates a new batch


def test_a_run_resumed_after_a_failed_slice_ends_where_an_uninterrupted_run_does(tmp_path, models, dataset, server):
    def run(path, failing=None, resume=None):
        trainer = trainer_for(path, models, dataset, server.url, per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, steps_per_generation=2, max_steps=3,
                              save_strategy="steps", save_steps=1, teacher_server_max_concurrent_requests=1)
        if failing:
            FailingGroup(trainer, failing)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(TeacherServerError, match=r"stopped at step 1 .*checkpoint-1"):
        run(tmp_path / "b", failing=4)  # the second slice of step 2
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "out" / "checkpoint-1"))
    assert resumed.state.global_step == 3
    expected = uninterrupted.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key


def test_several_iterations_reuse_the_slices_scores(tmp_path, models, dataset, server):
    trainer = sliced(tmp_path, models, dataset, server.url, slices=2, num_iterations=2, max_steps=2)
    recorded = Recorded(trainer)
    sent = len(server.requests)
    trainer.train()
    assert len(server.requests) == sent + 2  # one request per slice, for both iterations
    assert len(recorded.slices) == 4
    for first, again in ((0, 2), (1, 3)):
        for key in ("completion_ids", "teacher_logps", "teacher_argmax"):
            assert torch.equal(recorded.slices[first][key], recorded.slices[again][key]), key
