"""
A test-only stand-in for a vLLM OpenAI-compatible server (`vllm serve`), serving a tiny Hugging Face causal LM.

vLLM cannot run in this project's CI (it needs a GPU and its own heavy install), so the client code that asks a vLLM
server for prompt log-probs is tested against this protocol-faithful stand-in instead. It answers `GET /health`,
`GET /v1/models` and `POST /v1/completions` (token-id prompts only: it does not tokenize text, and does not stream)
with vLLM's response and error formats, and reproduces the quirks a client has to cope with:

- `prompt_logprobs` has one entry per prompt token and the first is `null` (nothing predicts the first token);
- keys are token ids as *strings* (JSON object keys), values `{"logprob", "rank", "decoded_token"}`;
- each entry starts with the actual prompt token, ranked by counting the vocabulary entries whose log-prob is >= its
  own (so ties share the worse rank), followed by `torch.topk`'s k tokens ranked 1..k; an actual token that is also in
  the top-k keeps its first position but takes the top-k value, so an entry holds k or k+1 items, not in rank order;
- prompt log-probs are the model's raw full-vocabulary log-softmax: the request's temperature is not applied;
- `-inf` is clamped to -9999.0 and NaN (or +inf) is written as `null`, as pydantic serialises it;
- `decoded_token` decodes each id alone (`tokenizer.decode([id])`, special tokens kept);
- `prompt_logprobs=-1` means the whole vocabulary, which is refused unless the server's max-logprobs is -1 too
  (vLLM counts -1 as the vocabulary size against `--max-logprobs`, default 20);
- generation is greedy and stops at EOS (`finish_reason` "stop") or after `max_tokens` ("length");
- errors are vLLM's `ErrorResponse` body `{"error": {"message", "type", "param", "code"}}` with its messages.

Test hooks: `delay_s` (a slow server), `logprob_hook` (inject NaN or -inf), `fail_next` (transient 5xx), `stop`
(a killed server), and the `requests` / `max_in_flight` records.
"""

import argparse
import json
import math
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class _RequestError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.err_type = status, message, err_type


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
                 host="127.0.0.1", port=0, logprob_hook=None):
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.served_model_name = served_model_name or self.model_path
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        self.max_logprobs, self.delay_s, self.logprob_hook = max_logprobs, delay_s, logprob_hook
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

    def _decode(self, token_id: int) -> str:
        if token_id not in self._decoded:
            self._decoded[token_id] = self.tokenizer.decode([token_id]) or ""
        return self._decoded[token_id]

    def _validate(self, body: dict) -> tuple[list[list[int]], int, int | None]:
        """vLLM's checks and messages, in the order the clients meet them."""
        if body.get("model") != self.served_model_name:
            raise _RequestError(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        k = body.get("prompt_logprobs")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise _RequestError(400, "`prompt_logprobs` must be an integer.")
        if k is not None and body.get("stream") and (k > 0 or k == -1):
            raise _RequestError(400, "`prompt_logprobs` are not available when `stream=True`.")
        if k is not None and k < 0 and k != -1:
            raise _RequestError(400, "`prompt_logprobs` must be a positive value or -1.")
        if body.get("stream"):
            raise _RequestError(400, "The vLLM stand-in does not stream.")
        if k is not None:
            requested = self.vocab_size if k == -1 else k
            allowed = self.vocab_size if self.max_logprobs == -1 else self.max_logprobs
            if requested > allowed:
                raise _RequestError(
                    400, f"Requested prompt logprobs of {requested}, which is greater than max allowed: {allowed}")
        prompt = body.get("prompt")
        prompts = [prompt] if _is_ids(prompt) else prompt
        if not (isinstance(prompts, list) and prompts and all(_is_ids(p) for p in prompts)):
            raise _RequestError(400, "The stand-in takes `prompt` as a list of token ids or a list of such lists.")
        if any(not p for p in prompts):
            raise _RequestError(400, "The decoder prompt cannot be empty")
        max_tokens = body.get("max_tokens", 16)
        for ids in prompts:
            bad = [i for i in ids if i < 0 or i >= self.vocab_size]
            if bad:
                raise _RequestError(400, f"Token id {max(bad) if max(bad) >= 0 else min(bad)} is out of vocabulary")
            tokens = max_tokens if max_tokens is not None else self.max_model_len - len(ids)
            if len(ids) + tokens > self.max_model_len:
                raise _RequestError(
                    400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                    f"requested {len(ids) + tokens} tokens ({len(ids)} in the messages, {tokens} in the completion). "
                    "Please reduce the length of the messages or completion.")
            if tokens < 1:
                raise _RequestError(400, f"max_tokens must be at least 1, got {tokens}.")
        return prompts, max_tokens, k

    @torch.no_grad()
    def _complete_one(self, ids: list[int], max_tokens: int | None, k: int | None) -> tuple[dict, int]:
        max_tokens = max_tokens if max_tokens is not None else self.max_model_len - len(ids)
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
            "prompt_logprobs": prompt_logprobs,
            "prompt_token_ids": list(ids),
        }
        return choice, len(generated)

    def _format(self, log_probs: torch.Tensor, targets: list[int], k: int) -> list[dict]:
        """vLLM's dicts: the actual token (rank by count of >= log-probs) first, then topk's k with ranks 1..k."""
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
                str(i): {"logprob": _json_float(v), "rank": r, "decoded_token": self._decode(i)}
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
        try:
            prompts, max_tokens, k = self._validate(body)
        except _RequestError as e:
            return e.status, _error_body(e.status, e.message, e.err_type)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for ids in prompts:
            choice, generated = self._complete_one(ids, max_tokens, k)
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
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                      "completion_tokens": completion_tokens},
        }

    def models_body(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": self.model_path, "parent": None, "max_model_len": self.max_model_len, "permission": [],
        }]}


def _error_body(status: int, message: str, err_type: str) -> dict:
    return {"error": {"message": message, "type": err_type, "param": None, "code": status}}


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
                self._send(400, _error_body(400, f"Invalid JSON body: {e}", "BadRequestError"))
                return
            try:
                status, response = standin.handle_completions(body)
            except Exception as e:  # noqa: BLE001 - a bug or a hook's error is vLLM's 500, not a dropped socket
                status, response = 500, _error_body(500, repr(e), "InternalServerError")
            self._send(status, response)
        finally:
            with standin._state_lock:
                standin._in_flight -= 1


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
