"""
A test-only stand-in for a vLLM OpenAI-compatible server (`vllm serve`), serving a tiny Hugging Face causal LM.

Real vLLM runs in this project's tests too (its CPU build, `tests/real_vllm.py`), but it takes a minute to start and
cannot be made slow, flaky or broken on demand. This stand-in answers `GET /health`, `GET /v1/models` and
`POST /v1/completions` (token-id prompts only: it does not tokenize text, and does not stream) in vLLM 0.32's formats,
starts in a second, and has hooks for the faults real vLLM cannot produce on demand. `test_real_vllm_served.py`
compares its answers with real vLLM's for the same model and requests, so the two cannot drift apart. What real vLLM
showed, and the stand-in reproduces:

- `prompt_logprobs` has one entry per prompt token and the first is `null` (nothing predicts the first token);
- keys are token ids as *strings* (JSON object keys), values `{"logprob", "rank", "decoded_token"}`;
- each entry starts with the actual prompt token, ranked by counting the vocabulary entries whose log-prob is >= its
  own (ties share the worse rank), followed by the top-k in rank order, ranked 1..k; an actual token that is also in
  the top-k keeps its first position but takes its top-k rank, so an entry holds k or k+1 items, not in rank order;
  `prompt_logprobs: 0` gives the actual token alone;
- prompt log-probs are the model's raw full-vocabulary log-softmax in float32: the request's temperature is not
  applied;
- `-inf` is clamped to -9999.0 (its rank is the vocabulary size) and NaN (or +inf) is written as `null`;
- `decoded_token` is the id decoded alone, except for an id that decodes alone to text ending in U+FFFD (a piece of a
  multi-byte character; every byte-level BPE has them): that is the text it completes after up to 4 earlier prompt
  tokens, or `""` (`tgpo_trl.served.vllm_decoded_token`);
- ids up to the model's last row are accepted (padding rows beyond the tokenizer too); beyond, "Token id N is out of
  vocabulary";
- `max_tokens` is cut to what `max_model_len` leaves after the prompt; a prompt of exactly `max_model_len` tokens
  fails with "max_tokens must be at least 1, got 0.", a longer one with "This model's maximum context length is ...";
- `prompt_logprobs` above `--max-logprobs` (default 20; -1 counts as the model's row count) is refused;
- a choice echoes no token ids (`prompt_token_ids` and `token_ids` are `null`); generation is greedy here and stops at
  EOS (`finish_reason` "stop") or after `max_tokens` ("length");
- errors are vLLM's `ErrorResponse` body `{"error": {"message", "type", "param", "code"}}`; a message whose error has a
  parameter ends with `(parameter=..., value=...)`, and file paths in messages read `<path>`; a request its schema
  refuses (a negative id) is type "Bad Request" with `param` the field's location and pydantic's long message (not
  reproduced here).

Test hooks: `delay_s` (a slow server), `request_hook` (hold or inspect a request before it is answered), `logprob_hook`
(inject NaN or -inf), `fail_next` (transient 5xx), `stop` (a killed server), and the `requests` / `max_in_flight`
records.
"""

import argparse
import json
import math
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgpo_trl.served import vllm_decoded_token


class _RequestError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None,
                 value=None, validation: bool = True):
        super().__init__(message)
        # vLLM's validation errors end their message with the parameter and value; its other errors only set `param`
        extras = [f"{key}={item}" for key, item in (("parameter", param), ("value", value)) if item is not None]
        self.message = f"{message} ({', '.join(extras)})" if extras and validation else message
        self.status, self.err_type, self.param = status, err_type, param


def _sanitize(message: str) -> str:
    """vLLM's error messages name no file path."""
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    return re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message).strip()


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def _json_float(value: float):
    """vLLM clamps -inf to -9999.0 before serialising; pydantic then writes NaN and +inf as null."""
    if value == -math.inf:
        return -9999.0
    return None if math.isnan(value) or math.isinf(value) else value


class StandInServer:
    """Serve `model_path` over HTTP like `vllm serve model_path` would; see the module docstring."""

    def __init__(self, model_path, *, served_model_name=None, max_model_len=None, max_logprobs=20, delay_s=0.0,
                 host="127.0.0.1", port=0, logprob_hook=None, request_hook=None):
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.served_model_name = served_model_name or self.model_path
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        self.max_logprobs, self.delay_s, self.logprob_hook = max_logprobs, delay_s, logprob_hook
        self.request_hook = request_hook  # called with each completions request's body before it is answered
        self.host, self.port = host, port
        self.url = None
        self.requests: list[dict] = []
        self.max_in_flight = 0
        self._in_flight, self._fail_count, self._fail_status = 0, 0, 503
        self._state_lock, self._model_lock = threading.Lock(), threading.Lock()
        self._decoded: dict[int, str] = {}
        self._httpd, self._thread = None, None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def _bind(self):
        server = self

        class Handler(_Handler):
            standin = server

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://{self.host}:{self.port}"

    def start(self) -> "StandInServer":
        self._bind()
        # A short poll interval: `stop` waits for the serving loop to notice, and tests start and stop many servers
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True,
                                        name="vllm-standin")
        self._thread.start()
        return self

    def serve_forever(self):
        """Foreground serving for the command line: prints `ready <url>` once listening."""
        self._bind()
        print(f"ready {self.url}", flush=True)
        try:
            self._httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.server_close()

    def stop(self):
        """Like a killed server: stop serving and close the listening socket, so later connections are refused."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = self._thread = None

    def fail_next(self, count: int, status: int = 503):
        """Answer the next `count` completions requests with `status` (a transient server failure)."""
        with self._state_lock:
            self._fail_count, self._fail_status = count, status

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- completions ---------------------------------------------------------------------------------------------

    def _decode(self, token_id: int, context: list[int]) -> str:
        if token_id not in self._decoded:
            self._decoded[token_id] = self.tokenizer.decode([token_id]) or ""
        if not self._decoded[token_id].endswith("\ufffd"):
            return self._decoded[token_id]
        return vllm_decoded_token(self.tokenizer, token_id, context)

    def _validate(self, body: dict) -> tuple[list[list[int]], list[int], int | None]:
        """vLLM's checks and messages, in the order the clients meet them; the prompts and each one's `max_tokens`."""
        if body.get("model") != self.served_model_name:
            raise _RequestError(404, f"The model `{body.get('model')}` does not exist. Valid aliases: "
                                f"{self.served_model_name}.", "NotFoundError", param="model",
                                validation=False)
        k = body.get("prompt_logprobs")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise _RequestError(400, "`prompt_logprobs` must be an integer.")
        if k is not None and body.get("stream") and (k > 0 or k == -1):
            raise _RequestError(400, "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
        if k is not None and k < 0 and k != -1:
            raise _RequestError(400, "`prompt_logprobs` must be a positive value or -1.")
        if body.get("stream"):
            raise _RequestError(400, "The vLLM stand-in does not stream.")
        prompt = body.get("prompt")
        if prompt == []:
            raise _RequestError(400, "You must pass at least one prompt")
        prompts = [prompt] if _is_ids(prompt) else prompt
        if not (isinstance(prompts, list) and prompts and all(_is_ids(p) for p in prompts)):
            raise _RequestError(400, "The stand-in takes `prompt` as a list of token ids or a list of such lists.")
        if any(not p for p in prompts):
            raise _RequestError(400, "The decoder prompt cannot be empty")
        last_id = max(self.vocab_size - 1, max(self.tokenizer.get_vocab().values()))
        max_tokens = body.get("max_tokens", 16)
        budgets = []
        for ids in prompts:
            negative = [index for index, i in enumerate(ids) if i < 0]
            if negative:  # refused by the request's schema, before vLLM's own checks
                raise _RequestError(400, "validation errors: prompt ids must be >= 0", "Bad Request",
                                    param=f"body.prompt.{negative[0]}", validation=False)
            if max(ids) > last_id:
                raise _RequestError(400, f"Token id {max(ids)} is out of vocabulary")
            if len(ids) > self.max_model_len:
                raise _RequestError(
                    400, f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                    f"contains {len(ids)} input tokens, which exceeds this limit even without any output tokens. "
                    "Please reduce the length of the input prompt.", param="input_tokens", value=len(ids))
            room = self.max_model_len - len(ids)  # vLLM cuts `max_tokens` to what the context leaves
            budget = room if max_tokens is None else min(max_tokens, room)
            if budget < 1:
                raise _RequestError(400, f"max_tokens must be at least 1, got {budget}.", param="max_tokens",
                                    value=budget)
            budgets.append(budget)
        if k is not None:
            requested = self.vocab_size if k == -1 else k
            allowed = self.vocab_size if self.max_logprobs == -1 else self.max_logprobs
            if requested > allowed:
                raise _RequestError(400, f"Requested prompt logprobs of {requested}, which is greater than max "
                                    f"allowed: {allowed}", param="prompt_logprobs", value=requested)
        return prompts, budgets, k

    @torch.no_grad()
    def _complete_one(self, ids: list[int], max_tokens: int, k: int | None) -> tuple[dict, int]:
        with self._model_lock:
            logits = self.model(torch.tensor([ids])).logits[0].float()
            generated, sequence, finish = [], list(ids), "length"
            next_logits = logits[-1]
            while len(generated) < max_tokens:
                token = int(next_logits.argmax())
                generated.append(token)
                if token == self.tokenizer.eos_token_id:
                    finish = "stop"
                    break
                sequence.append(token)
                if len(generated) < max_tokens:
                    next_logits = self.model(torch.tensor([sequence])).logits[0, -1].float()
        prompt_logprobs = None
        if k is not None:
            log_probs = torch.log_softmax(logits, dim=-1)
            if self.logprob_hook is not None:
                log_probs = self.logprob_hook(log_probs, list(ids))
            prompt_logprobs = [None] + self._format(log_probs[:-1], ids[1:], log_probs.shape[-1] if k == -1 else k)
        choice = {
            "index": 0,
            "text": self.tokenizer.decode(generated, skip_special_tokens=True),
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": None,
            "prompt_logprobs": prompt_logprobs,
            "prompt_token_ids": None,
            "routed_experts": None,
        }
        return choice, len(generated)

    def _format(self, log_probs: torch.Tensor, targets: list[int], k: int) -> list[dict]:
        """vLLM's dicts: the actual token (rank by count of >= log-probs) first, then topk's k with ranks 1..k, each
        decoded against the earlier prompt tokens (`targets[:row]`: entry 0, the first token's, has none)."""
        target = torch.tensor(targets).unsqueeze(1)
        actual = log_probs.gather(1, target)
        ranks = (log_probs >= actual).sum(-1).tolist()
        top_values, top_ids = torch.topk(log_probs, k, dim=-1) if k > 0 else (log_probs[:, :0], target[:, :0])
        entries = []
        for row, token in enumerate(targets):
            ids = [token, *top_ids[row].tolist()]
            values = [actual[row, 0].item(), *top_values[row].tolist()]
            row_ranks = [ranks[row], *range(1, k + 1)]
            entries.append({
                str(i): {"logprob": _json_float(v), "rank": r, "decoded_token": self._decode(i, targets[:row])}
                for i, v, r in zip(ids, values, row_ranks, strict=True)
            })
        return entries

    def handle_completions(self, body: dict) -> tuple[int, dict]:
        with self._state_lock:
            self.requests.append(body)
            failing = self._fail_count > 0
            if failing:
                self._fail_count -= 1
                status = self._fail_status
        if failing:
            err_type = "ServiceUnavailableError" if status == 503 else "InternalServerError"
            return status, _error_body(status, "injected failure", err_type)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.request_hook is not None:
            self.request_hook(body)
        try:
            prompts, budgets, k = self._validate(body)
        except _RequestError as e:
            return e.status, _error_body(e.status, e.message, e.err_type, e.param)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for ids, budget in zip(prompts, budgets, strict=True):
            choice, generated = self._complete_one(ids, budget, k)
            choice["index"] = len(choices)
            choices.append(choice)
            prompt_tokens += len(ids)
            completion_tokens += generated
        return 200, {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.served_model_name,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": "vllm-standin",
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                      "completion_tokens": completion_tokens, "prompt_tokens_details": None,
                      "completion_tokens_details": None},
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    def models_body(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": self.model_path, "parent": None, "max_model_len": self.max_model_len, "permission": [],
        }]}


def _error_body(status: int, message: str, err_type: str, param: str | None = None) -> dict:
    return {"error": {"message": _sanitize(message), "type": err_type, "param": param, "code": status}}


class _Handler(BaseHTTPRequestHandler):
    standin: StandInServer

    def log_message(self, format, *args):
        pass  # no access log on stderr: tests and benchmarks read that stream

    def _send(self, status: int, body: dict | None):
        data = b"" if body is None else json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, None)
        elif self.path == "/v1/models":
            self._send(200, self.standin.models_body())
        else:
            self._send(404, _error_body(404, f"Not Found: {self.path}", "NotFoundError"))

    def do_POST(self):
        if self.path != "/v1/completions":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(404, _error_body(404, f"Not Found: {self.path}", "NotFoundError"))
            return
        standin = self.standin
        with standin._state_lock:
            standin._in_flight += 1
            standin.max_in_flight = max(standin.max_in_flight, standin._in_flight)
        try:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if not isinstance(body, dict):
                    raise TypeError("the request body must be a JSON object")
            except (ValueError, TypeError) as e:
                status, response = 400, _error_body(400, f"Invalid JSON body: {e}", "BadRequestError")
            else:
                try:
                    status, response = standin.handle_completions(body)
                except Exception as e:  # noqa: BLE001 - a bug or a hook's error is vLLM's 500, not a dropped socket
                    status, response = 500, _error_body(500, repr(e), "InternalServerError")
        finally:
            # done before the answer leaves: a client that gets it may send its next request at once, which must not
            # count as a third in flight beside the two it allows
            with standin._state_lock:
                standin._in_flight -= 1
        self._send(status, response)


def main():
    parser = argparse.ArgumentParser(description="Serve a local causal LM with vLLM's OpenAI-compatible protocol.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--served-model-name")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    StandInServer(args.model, served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                  max_logprobs=args.max_logprobs, delay_s=args.delay_s, host=args.host,
                  port=args.port).serve_forever()


if __name__ == "__main__":
    main()
