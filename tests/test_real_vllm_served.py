"""
A served teacher (`teacher_server_url`) against real vLLM: `vllm serve` (its CPU build, tests/real_vllm.py) serves a
teacher that shares the student's byte-level BPE tokenizer. The served path gives the in-process teacher's scores,
loss and gradients; the start-up probe accepts what vLLM really writes and names the flag to change for real vLLM's
own error bodies; a generation batch trained in slices gets each slice's scores from two replicas as in process; a
killed server stops training before the optimizer step and the run resumes. The stand-in server
(tests/vllm_standin.py) is checked against the same server, request by request.
"""

import json
import math

import pytest
import real_vllm
import requests
import torch
from test_served_teacher import LOSS_METRICS, Recorded, StopServerAt, generate, loss_and_grads
from test_served_teacher import trainer_for as served_trainer_for
from test_vllm_standin import ERROR_CASES
from transformers import AutoModelForCausalLM
from vllm_standin import StandInServer

import tgpo_trl.served as served_module
from tgpo_trl.served import ServedTeacher, TeacherServerError
from tgpo_trl.teacher import score_completions

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_torch_thread")]

# The measured agreement of vLLM's float32 prompt log-probs with the HF log-softmax of the same weights is within
# 5e-7 here (3e-5 in the notes, with torch.compile): a tolerance well above it, far below any real difference
LOGP_ATOL = 1e-4


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(served_module, "RETRY_BACKOFF_S", 0.01)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return real_vllm.build_models(tmp_path_factory.mktemp("real_vllm"))


@pytest.fixture(scope="module")
def servers(models):
    """Two servers of the teacher, started side by side: `main`, and `spare`, which one test kills mid-run."""
    started = {name: real_vllm.VLLMServer(models["teacher"]).start() for name in ("main", "spare")}
    try:
        for server in started.values():
            server.wait()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def server(servers):
    if not servers["main"].alive:
        pytest.fail(f"the vLLM server died:\n{servers['main'].log()}")
    return servers["main"]


@pytest.fixture
def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i + 1}= café"}] for i in range(16)]})


def trainer_for(tmp_path, models, dataset, server_url=None, student="student", **overrides):
    """A trainer of `models[student]` whose teacher is in process (`server_url=None`, its tokenizer given) or served by
    `server_url` (its tokenizer found under its name)."""
    # 16 rollouts of up to 24 tokens: a random student samples its 8 padding rows (of 328) a few times per batch
    overrides = {"per_device_train_batch_size": 16, "max_completion_length": 24, **overrides}
    return served_trainer_for(
        tmp_path, models, dataset, server_url, student=AutoModelForCausalLM.from_pretrained(models[student]),
        tokenizer=models["tokenizer"] if student == "student" else models["char_tokenizer"],
        teacher_tokenizer=models["tokenizer"] if server_url is None else None, **overrides,
    )


def completions(server, model, **body):
    response = requests.post(f"{server.url}/v1/completions", json={"model": model, **body}, timeout=120)
    return response.status_code, response.json()


# ---------------------------------------------------------------------------------------------- the start-up probe


def test_probe_accepts_what_vllm_writes_for_a_piece_of_a_character(models, server):
    """vLLM writes `decoded_token: ""` for an id whose decoding alone is an incomplete UTF-8 sequence (the tokenizer
    gives U+FFFD), and the character it completes after the pieces before it: the probe accepts both, as the server
    decodes ids like the student's tokenizer."""
    tokenizer = models["tokenizer"]
    pieces = real_vllm.incomplete_ids(tokenizer)
    assert len(pieces) > 64  # every lone byte >= 0x80 of the byte-level alphabet
    accent = tokenizer.encode("é")  # two byte pieces
    prompt = [5, *pieces[:10], *accent]
    status, body = completions(server, models["teacher"], prompt=prompt, max_tokens=1, prompt_logprobs=0)
    assert status == 200
    entries = body["choices"][0]["prompt_logprobs"]
    written = [entries[position][str(token)]["decoded_token"] for position, token in enumerate(prompt) if position]
    assert written[:10] == [""] * 10  # what broke the probe: "" where the tokenizer gives U+FFFD
    assert written[-2:] == ["", "é"]  # the second piece completes the character after the first
    client = ServedTeacher([server.url], models["teacher"], models["rows"])
    client.probe(tokenizer, 4, 20, "student")  # no refusal
    assert client.max_model_len == 512


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"guidance": "tgpo_topk", "guidance_top_k": 21},
         r"refused the request \(400\): Requested prompt logprobs of 21, which is greater than max allowed: 20.*"
         r"Raise the server's `--max-logprobs`"),
        ({"max_completion_length": 600}, r"has `max_model_len` 512, but scoring needs at least 602.*--max-model-len"),
        ({"teacher_model_name_or_path": "not-served"}, r"serves \['.*teacher'\], not 'not-served'.*--served-model-name"),
    ],
    ids=["k_above_max_logprobs", "max_model_len", "model_name"],
)
def test_a_misconfigured_server_is_named_with_the_flag_to_change(tmp_path, models, dataset, server, overrides,
                                                                 message):
    with pytest.raises(TeacherServerError, match=message) as error:
        trainer_for(tmp_path, models, dataset, server.url, **overrides)
    assert server.url in str(error.value)


def test_a_server_with_another_tokenizer_is_refused(tmp_path, models, dataset, server):
    """No teacher tokenizer is known locally (no name: the trainer takes the one model served), so the shared vocabulary
    is assumed and the probe finds the server decodes ids otherwise than the character student's tokenizer."""
    with pytest.raises(TeacherServerError, match=r"decodes token ids differently from the student's tokenizer"):
        trainer_for(tmp_path, models, dataset, server.url, student="char_student", teacher_model_name_or_path=None)


def test_real_error_bodies_point_at_the_flag(models, server):
    """Real vLLM's 400 and 404 bodies, met by scoring requests, name the `vllm serve` flag to change."""
    client = ServedTeacher([server.url], models["teacher"], models["rows"], max_retries=0)
    cases = [  # (prompt length, what vLLM says, the hint)
        (600, r"maximum context length is 512 tokens.*600 input tokens", r"Raise the server's `--max-model-len`"),
        (512, r"max_tokens must be at least 1, got 0", r"Raise the server's `--max-model-len`"),
    ]
    for length, said, hint in cases:
        ids = torch.full((1, length), 5)
        with pytest.raises(TeacherServerError, match=rf"refused the request \(400\): .*{said}.*{hint}"):
            client.submit(ids[:, :1], torch.ones_like(ids[:, :1]), ids[:, 1:], torch.ones_like(ids[:, 1:])).result()
    client.model = "not-served"
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(TeacherServerError, match=r"refused the request \(404\): The model `not-served` does not exist"
                                                 r".*--served-model-name"):
        client.submit(ids, torch.ones_like(ids), ids, torch.ones_like(ids)).result()


# ---------------------------------------------------------------------------------------------- same as in process


@pytest.mark.parametrize("mode", ["tgpo", "tgpo_topk", "tgpo_sample", "opd", "kdrl"])
def test_served_teacher_trains_like_the_in_process_teacher(tmp_path, models, dataset, server, mode):
    local = trainer_for(tmp_path / "local", models, dataset, guidance=mode)
    remote = trainer_for(tmp_path / "remote", models, dataset, server.url, guidance=mode)
    assert not remote.teacher_scoring.cross_tokenizer and remote.teacher_vocab_size == models["rows"]
    inputs_local, inputs_remote = generate(local, dataset), generate(remote, dataset)
    assert torch.equal(inputs_local["completion_ids"], inputs_remote["completion_ids"])  # the same rollouts
    mask = inputs_local["completion_mask"].bool()
    tokenizer_ids = len(models["tokenizer"])
    sampled = inputs_local["completion_ids"][mask]
    assert (sampled >= tokenizer_ids).any()  # padding rows were sampled, and are scored on both sides
    for key in ("teacher_valid", "teacher_aligned"):
        assert torch.equal(inputs_local[key][mask], inputs_remote[key][mask]), key
    # the only unscored tokens: the one id the teacher gives probability 0 (vLLM's -9999.0)
    assert torch.equal(~inputs_local["teacher_valid"][mask], sampled == models["minus_inf_id"])
    assert torch.allclose(inputs_local["teacher_logps"][mask], inputs_remote["teacher_logps"][mask], atol=LOGP_ATOL)
    assert torch.equal(inputs_local["teacher_argmax"][mask], inputs_remote["teacher_argmax"][mask])
    if mode == "tgpo_topk":
        assert torch.equal(inputs_local["teacher_topk_ids"][mask], inputs_remote["teacher_topk_ids"][mask])
        assert torch.allclose(inputs_local["teacher_topk_logps"][mask], inputs_remote["teacher_topk_logps"][mask],
                              atol=LOGP_ATOL)
    if mode == "tgpo_sample":
        # served, the draw is from the teacher's top-k (all the server returns); in process, from its whole
        # distribution. Both draw real teacher tokens; the loss is then compared on the same draws
        top = score_completions(local.teacher_model, inputs_local["prompt_ids"], inputs_local["prompt_mask"],
                                inputs_local["completion_ids"], inputs_local["completion_mask"],
                                local.teacher_vocab_size, 8, top_k=4)
        assert (inputs_remote["teacher_sample"].unsqueeze(-1) == top.topk_ids).any(-1)[mask].all()
        inputs_local["teacher_sample"] = inputs_remote["teacher_sample"].clone()

    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = (loss_and_grads(local, inputs_local),
                                                                  loss_and_grads(remote, inputs_remote))
    assert math.isfinite(loss_a) and loss_b == pytest.approx(loss_a, rel=1e-3, abs=1e-6)
    for key in LOSS_METRICS:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-3, abs=1e-5), key
    assert metrics_b["gap/aligned_ratio"] == 1.0  # padding rows the student sampled are scored too
    assert len(grads_a) == len(grads_b) > 0
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(grad_a, grad_b, rtol=1e-3, atol=1e-6)


def test_a_teacher_of_another_tokenizer_through_real_vllm(tmp_path, models, dataset, server):
    """The character student with the BPE teacher: cross-tokenizer scoring through the server gives the in-process
    teacher's targets and log-probabilities."""
    settings = dict(guidance="tgpo_topk", cross_tokenizer_targets="continuation")
    local = trainer_for(tmp_path / "local", models, dataset, student="char_student", **settings)
    remote = trainer_for(tmp_path / "remote", models, dataset, server.url, student="char_student", **settings)
    assert local.teacher_scoring.cross_tokenizer and remote.teacher_scoring.cross_tokenizer
    inputs_local, inputs_remote = generate(local, dataset), generate(remote, dataset)
    mask = inputs_local["completion_mask"].bool()
    assert torch.equal(inputs_local["teacher_aligned"] & mask, inputs_remote["teacher_aligned"] & mask)
    aligned = mask & inputs_local["teacher_aligned"]
    assert aligned.sum() > 0
    assert torch.equal(inputs_local["teacher_argmax"][aligned], inputs_remote["teacher_argmax"][aligned])
    valid = mask & inputs_local["teacher_valid"]
    assert valid.sum() > 0 and torch.equal(valid, mask & inputs_remote["teacher_valid"])
    assert torch.allclose(inputs_local["teacher_logps"][valid], inputs_remote["teacher_logps"][valid], atol=LOGP_ATOL)
    slots = inputs_local["teacher_topk_valid"] & aligned.unsqueeze(-1)
    assert torch.equal(slots, inputs_remote["teacher_topk_valid"] & aligned.unsqueeze(-1))
    assert torch.allclose(inputs_local["teacher_topk_logps"][slots], inputs_remote["teacher_topk_logps"][slots],
                          atol=LOGP_ATOL)


def test_slices_scored_by_two_replicas_train_as_in_process(tmp_path, models, dataset, servers):
    """The generation batch trained in 4 slices, its requests sent slice by slice to two real vLLM replicas: every
    slice holds the rows, scores and targets of the in-process run's same slice, and the step ends at its weights."""
    shape = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "steps_per_generation": 4,
             "max_steps": 1, "guidance": "tgpo_topk"}
    runs = {}
    for name, url in (("local", None), ("remote", [servers["main"].url, servers["spare"].url])):
        trainer = trainer_for(tmp_path / name, models, dataset, url, **shape)
        recorded = Recorded(trainer)
        trainer.train()
        runs[name] = (recorded.slices, trainer.model.state_dict(), trainer.state.log_history)
    (local, local_weights, _), (remote, remote_weights, logs) = runs["local"], runs["remote"]
    assert len(local) == len(remote) == 4
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a["completion_ids"], b["completion_ids"])  # GRPO's slices, in GRPO's order
        mask = a["completion_mask"].bool()
        assert torch.equal(a["teacher_valid"][mask], b["teacher_valid"][mask])
        assert torch.allclose(a["teacher_logps"][mask], b["teacher_logps"][mask], atol=LOGP_ATOL)
        assert torch.equal(a["teacher_topk_ids"][mask], b["teacher_topk_ids"][mask])
    for key, value in local_weights.items():
        assert torch.allclose(value, remote_weights[key], rtol=1e-3, atol=1e-6), key
    step = next(row for row in logs if "teacher/wait_time" in row)
    assert 0 <= step["teacher/wait_time"] <= step["teacher/request_time"] + 0.05


# ---------------------------------------------------------------------------------------------- a killed server


def test_server_killed_mid_run_stops_before_the_optimizer_step_then_resumes(tmp_path, models, dataset, servers):
    spare, main = servers["spare"], servers["main"]
    kill = StopServerAt(spare, 2)  # `VLLMServer.stop` kills the server's process group
    trainer = trainer_for(tmp_path, models, dataset, spare.url, callbacks=[kill], max_steps=4, save_strategy="steps",
                          save_steps=1)
    with pytest.raises(TeacherServerError, match=r"stopped at step 2 before the batch reached the optimizer") as error:
        trainer.train()
    assert not spare.alive and spare.url in str(error.value)
    assert "checkpoint-2" in str(error.value) and "resume_from_checkpoint" in str(error.value)
    assert trainer.state.global_step == 2
    after = trainer.model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in kill.weights.items())  # no step on the failed batch
    # the teacher served again (here by the other server of the same weights): the run resumes where it stopped
    resumed = trainer_for(tmp_path, models, dataset, main.url, max_steps=4, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert [row["step"] for row in resumed.state.log_history if "loss" in row][-2:] == [3, 4]


# ---------------------------------------------------------------------------------------------- the stand-in


def _shape(body):
    """A response with its log-prob values taken out (compared apart, within tolerance)."""
    if isinstance(body, dict):
        # what sampling (vLLM) and greedy generation (the stand-in) write differently, and the values compared apart
        skipped = ("id", "created", "system_fingerprint", "text", "finish_reason", "stop_reason", "logprob")
        return {key: _shape(value) for key, value in body.items() if key not in skipped}
    if isinstance(body, list):
        return [_shape(item) for item in body]
    return body


def _logprobs(body):
    return [[(key, value["logprob"]) for key, value in entry.items()] if entry else entry
            for choice in body["choices"] for entry in (choice["prompt_logprobs"] or [])]


def test_the_stand_in_answers_as_real_vllm_does(models, server):
    """The same model and requests to both: the same keys in the same order, ranks, `decoded_token` strings, -9999.0
    for a zero probability, and the same error bodies, so the stand-in cannot drift from vLLM again."""
    tokenizer, model = models["tokenizer"], models["teacher"]
    rows, pieces = models["rows"], real_vllm.incomplete_ids(models["tokenizer"])
    text = tokenizer.encode("12+30=42 café ✓ 3×4")
    prompts = [
        [*text, models["minus_inf_id"], rows - 1, rows - 8, *pieces[:3], *tokenizer.encode("é")],
        text[:5],
    ]
    requests_sent = [
        {"prompt": prompts[0], "max_tokens": 1, "prompt_logprobs": 5, "temperature": 1.0},
        {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": 2},
        {"prompt": prompts[1], "max_tokens": 1, "prompt_logprobs": 0},
        {"prompt": prompts[1], "max_tokens": 1},
    ]
    with StandInServer(model) as standin:
        for body in requests_sent:
            (real_status, real), (stand_status, stand) = completions(server, model, **body), completions(
                standin, model, **body)
            assert real_status == stand_status == 200
            assert _shape(stand) == _shape(real), json.dumps(body)
            for real_entry, stand_entry in zip(_logprobs(real), _logprobs(stand), strict=True):
                if real_entry is None:
                    assert stand_entry is None
                    continue
                for (real_key, real_value), (stand_key, stand_value) in zip(real_entry, stand_entry, strict=True):
                    assert real_key == stand_key and stand_value == pytest.approx(real_value, abs=LOGP_ATOL)
        first = completions(server, model, **requests_sent[0])[1]["choices"][0]["prompt_logprobs"]
        zero = first[len(text)][str(models["minus_inf_id"])]
        assert zero["logprob"] == -9999.0 and zero["rank"] == rows  # the case -9999.0 stands for, really met
        # errors: the stand-in's cases (all but the text prompt, which real vLLM tokenizes and the stand-in refuses)
        for case, (overrides, status, _, _, message) in ERROR_CASES.items():
            if case == "text prompt":
                continue
            body = {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2, **overrides(rows)}
            body = {key: value for key, value in body.items() if value is not None}
            body.setdefault("model", model)
            real = requests.post(f"{server.url}/v1/completions", json=body, timeout=120)
            stand = requests.post(f"{standin.url}/v1/completions", json=body, timeout=120)
            assert real.status_code == stand.status_code == status, case
            real_error, stand_error = real.json()["error"], stand.json()["error"]
            if message is None:  # a message the stand-in does not reproduce (pydantic's list of schema errors)
                real_error.pop("message"), stand_error.pop("message")
            assert stand_error == real_error, case
        real_models = requests.get(f"{server.url}/v1/models", timeout=30).json()
        stand_models = requests.get(f"{standin.url}/v1/models", timeout=30).json()
        assert set(stand_models) == set(real_models) and set(stand_models["data"][0]) == set(real_models["data"][0])
        assert stand_models["data"][0]["max_model_len"] == real_models["data"][0]["max_model_len"] == 512
