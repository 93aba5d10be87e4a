"""
The vLLM stand-in (tests/vllm_standin.py) is only worth testing against if it is faithful: its prompt log-probs are
checked against the model's own log-softmax, and its format, errors and failure modes against vLLM's.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM
from vllm_standin import StandInServer

from tgpo_trl.demo.models import tiny_qwen2
from tgpo_trl.demo.tokenizer import build_char_tokenizer

TIMEOUT = 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("standin_model")
    tokenizer = build_char_tokenizer()
    tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(model_dir):
    with StandInServer(model_dir) as standin:
        yield standin


@pytest.fixture(scope="module")
def reference(model_dir):
    """The model's raw log-softmax over the full vocabulary, per position, as the stand-in must report it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def log_softmax(ids):
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return log_softmax


def complete(server, **body):
    return requests.post(f"{server.url}/v1/completions", json={"model": server.served_model_name, **body},
                         timeout=TIMEOUT)


def test_prompt_logprobs_match_the_models_log_softmax(server, reference):
    tok = server.tokenizer
    ids = tok.encode("12+34=46")
    # Extend the prompt greedily, so that later positions' actual tokens are their argmax (inside the top-k)
    for _ in range(4):
        ids.append(int(reference(ids)[-1].argmax()))
    k = 5
    response = complete(server, prompt=ids, max_tokens=1, prompt_logprobs=k, temperature=2.0)  # temperature ignored
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == server.served_model_name == server.model_path  # vLLM serves under the path it was given
    (choice,) = body["choices"]
    ref = reference(ids)
    assert choice["prompt_token_ids"] is None and choice["token_ids"] is None  # vLLM 0.32 echoes no ids
    assert choice["index"] == 0 and choice["logprobs"] is None
    greedy = int(ref[-1].argmax())
    assert choice["text"] == tok.decode([greedy], skip_special_tokens=True)
    assert choice["finish_reason"] == ("stop" if greedy == tok.eos_token_id else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids) + 1, "completion_tokens": 1,
                             "prompt_tokens_details": None, "completion_tokens_details": None}

    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    seen_inside = seen_outside = False
    for j in range(1, len(ids)):
        row, actual, entry = ref[j - 1], ids[j], entries[j]
        assert all(isinstance(key, str) for key in entry)
        assert next(iter(entry)) == str(actual)  # the actual token comes first, whatever its rank
        top_values, top_ids = torch.topk(row, k)
        inside = actual in top_ids.tolist()
        seen_inside, seen_outside = seen_inside or inside, seen_outside or not inside
        assert len(entry) == (k if inside else k + 1)
        assert entry[str(actual)]["logprob"] == pytest.approx(row[actual].item(), abs=1e-5)
        expected_rank = top_ids.tolist().index(actual) + 1 if inside else int((row >= row[actual]).sum())
        assert entry[str(actual)]["rank"] == expected_rank
        rank_one = [key for key, value in entry.items() if value["rank"] == 1]
        assert rank_one == [str(int(row.argmax()))]
        for rank, (value, token) in enumerate(zip(top_values.tolist(), top_ids.tolist(), strict=True), start=1):
            assert entry[str(token)] == {"logprob": pytest.approx(value, abs=1e-5), "rank": rank,
                                         "decoded_token": tok.decode([token])}
    assert seen_inside and seen_outside  # both shapes of entry were exercised


def test_whole_vocabulary_and_no_prompt_logprobs(model_dir, server, reference):
    ids = server.tokenizer.encode("7*8=")
    choice = complete(server, prompt=ids, max_tokens=1).json()["choices"][0]
    assert choice["prompt_logprobs"] is None
    with StandInServer(model_dir, max_logprobs=-1) as unlimited:
        entries = complete(unlimited, prompt=ids, max_tokens=1, prompt_logprobs=-1).json()["choices"][0][
            "prompt_logprobs"]
    vocab = reference(ids).shape[-1]
    assert all(len(entry) == vocab for entry in entries[1:])


def test_several_prompts_give_one_choice_each_in_order(server, reference):
    prompts = [server.tokenizer.encode(text) for text in ("1+1=", "23*4=9", "5")]
    body = complete(server, prompt=prompts, max_tokens=2, prompt_logprobs=1).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for ids, choice in zip(prompts, body["choices"], strict=True):
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        ref = reference(ids)
        for j in range(1, len(ids)):
            assert entries[j][str(ids[j])]["logprob"] == pytest.approx(ref[j - 1, ids[j]].item(), abs=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))


# Each case as a function of the vocabulary size, over the base body {"prompt": [5, 6, 7], "max_tokens": 1,
# "prompt_logprobs": 2}; None for "max_tokens" drops the key (vLLM's default of 16 applies). The messages are real
# vLLM 0.32's (`test_real_vllm_served.py` sends the same requests to it); the model is served under a path, which
# vLLM's error messages write as `<path>`
ERROR_CASES = {
    "unknown model": (lambda v: {"model": "other"}, 404, "NotFoundError", "model",
                      "The model `other` does not exist. Valid aliases: <path>"),
    "stream": (lambda v: {"stream": True}, 400, "BadRequestError", "prompt_logprobs",
               "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)"),
    "too many logprobs": (lambda v: {"prompt_logprobs": 21}, 400, "BadRequestError", "prompt_logprobs",
                          "Requested prompt logprobs of 21, which is greater than max allowed: 20 "
                          "(parameter=prompt_logprobs, value=21)"),
    "whole vocabulary over the limit": (lambda v: {"prompt_logprobs": -1}, 400, "BadRequestError", "prompt_logprobs",
                                        "Requested prompt logprobs of {v}, which is greater than max allowed: 20 "
                                        "(parameter=prompt_logprobs, value={v})"),
    "text prompt": (lambda v: {"prompt": "1+1="}, 400, "BadRequestError", None, None),
    "empty prompt": (lambda v: {"prompt": []}, 400, "BadRequestError", None, "You must pass at least one prompt"),
    "empty prompt in a batch": (lambda v: {"prompt": [[5, 6], []]}, 400, "BadRequestError", None, None),
    "id past the vocabulary": (lambda v: {"prompt": [5, v]}, 400, "BadRequestError", None,
                               "Token id {v} is out of vocabulary"),
    "negative id": (lambda v: {"prompt": [5, -3]}, 400, "Bad Request", "body.prompt.1", None),
    "prompt longer than the context": (
        lambda v: {"prompt": [5] * 600, "max_tokens": None}, 400, "BadRequestError", "input_tokens",
        "This model's maximum context length is 512 tokens. However, your prompt contains 600 input tokens, which "
        "exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
        "(parameter=input_tokens, value=600)"),
    "prompt filling the context": (
        lambda v: {"prompt": [5] * 512}, 400, "BadRequestError", "max_tokens",
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors(server, case):
    overrides, status, err_type, param, message = ERROR_CASES[case]
    body = {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2, **overrides(server.vocab_size)}
    body = {key: value for key, value in body.items() if value is not None}
    response = complete(server, **body)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == err_type and error["code"] == status and error["param"] == param
    if message is not None:
        assert error["message"] == message.format(v=server.vocab_size)


def test_max_tokens_is_cut_to_what_the_context_leaves(server):
    response = complete(server, prompt=[5] * 510, max_tokens=16, prompt_logprobs=0)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 2


def test_infinite_and_nan_logprobs_are_written_as_vllm_does(model_dir):
    def hook(log_probs, prompt_ids):
        log_probs = log_probs.clone()
        log_probs[0, prompt_ids[1]] = float("-inf")
        log_probs[1, prompt_ids[2]] = float("nan")
        return log_probs

    with StandInServer(model_dir, logprob_hook=hook) as standin:
        ids = standin.tokenizer.encode("3+4=7")
        response = complete(standin, prompt=ids, max_tokens=1, prompt_logprobs=2)
    assert response.status_code == 200
    assert '"logprob": -9999.0' in response.text and '"logprob": null' in response.text
    assert "NaN" not in response.text and "Infinity" not in response.text
    entries = response.json()["choices"][0]["prompt_logprobs"]
    assert entries[1][str(ids[1])] == {"logprob": -9999.0, "rank": standin.vocab_size,
                                       "decoded_token": standin.tokenizer.decode([ids[1]])}
    assert entries[2][str(ids[2])]["logprob"] is None


def test_requests_are_handled_concurrently(model_dir):
    with StandInServer(model_dir, delay_s=0.4) as standin:
        threads = [threading.Thread(target=complete, args=(standin,), kwargs={"prompt": [5, 6], "max_tokens": 1})
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert standin.max_in_flight > 1
    assert len(standin.requests) == 4 and all(r["prompt"] == [5, 6] for r in standin.requests)


def test_stopped_server_refuses_connections(model_dir):
    standin = StandInServer(model_dir).start()
    assert requests.get(f"{standin.url}/health", timeout=TIMEOUT).status_code == 200
    standin.stop()
    with pytest.raises(requests.ConnectionError):
        complete(standin, prompt=[5, 6], max_tokens=1)


def test_fail_next_then_recover(server):
    server.fail_next(2)
    before = len(server.requests)
    for _ in range(2):
        response = complete(server, prompt=[5, 6], max_tokens=1)
        assert response.status_code == 503
        assert response.json()["error"] == {"message": "injected failure", "type": "ServiceUnavailableError",
                                            "param": None, "code": 503}
    assert complete(server, prompt=[5, 6], max_tokens=1).status_code == 200
    assert len(server.requests) == before + 3


def test_health_models_and_unknown_path(model_dir):
    with StandInServer(model_dir, served_model_name="tiny", max_model_len=64) as standin:
        health = requests.get(f"{standin.url}/health", timeout=TIMEOUT)
        assert health.status_code == 200 and health.content == b""
        models = requests.get(f"{standin.url}/v1/models", timeout=TIMEOUT).json()
        assert models["object"] == "list"
        (card,) = models["data"]
        assert card["id"] == "tiny" and card["root"] == str(model_dir) and card["max_model_len"] == 64
        assert card["owned_by"] == "vllm" and card["object"] == "model" and card["parent"] is None
        response = complete(standin, prompt=[5] * 70, max_tokens=5)
        assert response.status_code == 400 and "maximum context length is 64 tokens" in response.json()["error"][
            "message"]
        missing = requests.get(f"{standin.url}/v2/nothing", timeout=TIMEOUT)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"


def test_command_line_prints_ready_and_serves(model_dir):
    script = Path(__file__).with_name("vllm_standin.py")
    process = subprocess.Popen([sys.executable, str(script), "--model", str(model_dir), "--port", "0",
                                "--threads", "1"], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("ready http://127.0.0.1:") and not line.endswith(":0")
        url = line.split()[1]
        response = requests.post(f"{url}/v1/completions", timeout=TIMEOUT,
                                 data=json.dumps({"model": str(model_dir), "prompt": [5, 6, 7], "max_tokens": 1,
                                                  "prompt_logprobs": 1}))
        assert response.status_code == 200 and response.json()["choices"][0]["prompt_logprobs"][0] is None
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)
