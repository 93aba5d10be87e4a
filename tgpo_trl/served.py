"""
A teacher served by vLLM: rollouts are scored through its OpenAI-compatible `/v1/completions` endpoint, so the teacher
never enters training memory. This is the second place the teacher can run (the first is in process,
`tgpo_trl.teacher.score_completions`); how its ids map to the student's (`tgpo_trl.alignment`) is the same for both.

One request scores a group of rollouts: `prompt` = each rollout's prompt ids + completion ids, `max_tokens: 1`,
`prompt_logprobs: k`. What vLLM returns (and this module relies on): `choices[i].prompt_logprobs[j]` is `null` for
`j = 0` and otherwise maps token ids, *as strings*, to `{logprob, rank, decoded_token}` for the distribution predicting
token `j`; it holds the top-k (ranks 1..k) plus token `j` itself when that is outside them, in no guaranteed order;
`-inf` arrives as -9999.0 and NaN as `null`; no temperature is applied to prompt log-probs (the teacher is at
temperature 1, as in process); `--max-logprobs` (default 20) caps k; `--max-model-len` bounds prompt + completion + 1.

What differs from the in-process teacher: the server normalises over its whole vocabulary (in process, logits are
restricted to the ids it scores first: the rows both models have, or across tokenizers the teacher tokenizer's ids), so
top-k entries outside the scored ids are dropped, and a position whose top-k holds none of them has no target; `tgpo_sample` draws from the teacher renormalised on its top-k
(`guidance_top_k` entries), not from the whole distribution.
"""

import itertools
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import requests
import torch
from .alignment import NO_MASS
from .lm_head import TeacherScores


# The first wait before retrying a failed request (connection error, timeout, 5xx), doubled per retry up to the cap
RETRY_BACKOFF_S = 1.0
RETRY_BACKOFF_MAX_S = 30.0
# Rollouts are packed into one request up to this many tokens (a longer rollout goes alone): enough to amortise the
# HTTP round trip, small enough that one response (k + 1 entries per token, as JSON) stays a few MB
MAX_REQUEST_TOKENS = 16_384
# vLLM writes -inf log-probs as this value
VLLM_NEG_INF = -9999.0
# Ids read back from the server's `decoded_token`s at start-up, to check it tokenizes like the scoring tokenizer
PROBE_IDS = 64


class TeacherServerError(RuntimeError):
    """The teacher server could not score a batch (or failed its start-up probe); the message names the URL. `status`:
    the 4xx status of a refused request (which the message explains), None when no usable answer came."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def server_urls(value) -> list[str]:
    """`teacher_server_url` as a list of base URLs: one string (comma-separated replicas allowed) or a list; a
    trailing `/` or `/v1` is dropped (requests go to `<url>/v1/completions`)."""
    items = [part for item in ([value] if isinstance(value, str) else value) for part in str(item).split(",")]
    urls = []
    for item in items:
        url = item.strip().rstrip("/").removesuffix("/v1")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"`teacher_server_url` entries must start with http:// or https://, got {item!r}.")
        urls.append(url)
    if not urls:
        raise ValueError(f"`teacher_server_url` holds no URL: {value!r}.")
    return urls


def _error_message(response) -> str:
    """The message of a vLLM error response (`{"error": {"message"}}`, or older `{"message"}`), else its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return str(body)[:500]


def _flag_hint(message: str) -> str:
    """The `vllm serve` flag a refused request points at."""
    text = message.lower()
    if "max allowed" in text and "logprob" in text:
        return " Raise the server's `--max-logprobs` (or lower `guidance_top_k`)."
    if ("maximum context length" in text or "max_model_len" in text or "too long" in text
            or "max_tokens must be at least 1" in text):
        return " Raise the server's `--max-model-len` (it must hold prompt + completion + 1 tokens)."
    if "out of vocabulary" in text:
        return (" The served model's vocabulary is smaller than the ids sent: it is not the teacher TGPO checked; serve "
                "the teacher whose tokenizer the trainer uses.")
    if "does not exist" in text or "model" in text and "not found" in text:
        return " Serve it under this name (`vllm serve <model>` or `--served-model-name`)."
    return ""


@dataclass
class _Row:
    """One rollout to score: its index in the batch, token ids, and where its completion starts."""

    index: int
    ids: list[int]
    num_prompt: int
    num_completion: int


class ServedTeacher:
    """
    A client of one or several vLLM replicas serving the teacher. Each request goes to the replica with the fewest
    tokens outstanding from this process (sent, not yet answered), so a slow replica gets less of the work instead of
    holding up a turn; a batch is split into at least one request per replica, so that the replicas score it side by
    side. Requests are sent from a pool of at most `max_concurrent_requests` threads per process, each bounded by
    `timeout` seconds, and a `submit`'s requests go out once the previous `submit`'s are answered: a server scores the
    requests it holds together, so a generation batch's slices, sent at once, would all come back at the end; sent in
    turn, the first slice is back after its own share of the work. Connection errors, timeouts and 5xx answers are retried
    `max_retries` times with exponential backoff (each time on the least loaded of the other replicas), 4xx answers
    fail at once with the server's message.

    `vocab_size`: the teacher ids that can be targets (those the student can emit, with a shared vocabulary); others
    are dropped from the top-k. `sample_top_k`: the top-k `tgpo_sample` draws from. `max_model_len` is read from the
    server by `probe`.
    """

    def __init__(self, urls, model: str | None, vocab_size: int, sample_top_k: int = 20, timeout: float = 300.0,
                 max_concurrent_requests: int = 16, max_retries: int = 5, request_tokens: int = MAX_REQUEST_TOKENS):
        self.urls = server_urls(urls)
        self.model = model
        self.vocab_size = vocab_size
        self.sample_top_k = sample_top_k
        self.timeout = timeout
        self.max_retries = max_retries
        self.request_tokens = request_tokens
        self.max_model_len = None
        self._pool = ThreadPoolExecutor(max_concurrent_requests, thread_name_prefix="tgpo-teacher")
        self._sessions = threading.local()  # one keep-alive session per worker thread
        self._turn = itertools.count()  # breaks ties between equally loaded replicas
        self._outstanding = [0] * len(self.urls)  # tokens sent to each replica and not yet answered
        self._load_lock = threading.Lock()
        self._previous = []  # the requests of the last `submit`: the next one's wait until they are answered

    # ------------------------------------------------------------------ HTTP

    def _session(self) -> requests.Session:
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = requests.Session()
        return session

    def _pick_replica(self, tokens: int, avoid: int | None) -> int:
        """The replica with the fewest outstanding tokens (ties in turn), other than `avoid` where there is another;
        `tokens` are counted on it until `_release`."""
        with self._load_lock:
            turn = next(self._turn)
            count = len(self.urls)
            candidates = [index for index in range(count) if index != avoid] or [avoid]
            chosen = min(candidates, key=lambda index: (self._outstanding[index], (index - turn) % count))
            self._outstanding[chosen] += tokens
            return chosen

    def _release(self, replica: int, tokens: int) -> None:
        with self._load_lock:
            self._outstanding[replica] -= tokens

    def _request(self, method: str, path: str, payload: dict | None = None, replica: int | None = None,
                 tokens: int = 0) -> dict:
        """One call with the retry policy: to the least loaded replica (`tokens`: the request's size), each retry to
        the least loaded of the others; or, for the probe, to `replica` alone."""
        failures = []
        chosen = replica
        for attempt in range(self.max_retries + 1):
            if replica is None:
                chosen = self._pick_replica(tokens, avoid=chosen if attempt else None)
            try:
                body = self._attempt(method, self.urls[chosen], path, payload, failures)
            finally:
                if replica is None:
                    self._release(chosen, tokens)
            if body is not None:
                return body
            if attempt < self.max_retries:
                time.sleep(min(RETRY_BACKOFF_S * 2**attempt, RETRY_BACKOFF_MAX_S))
        raise TeacherServerError(
            f"The teacher server did not answer {method} {path} after {self.max_retries + 1} attempts "
            f"(`teacher_server_max_retries` = {self.max_retries}); last failure: {failures[-1]}. Check that "
            f"`vllm serve` is running at {', '.join(self.urls)}."
        )

    def _attempt(self, method: str, url: str, path: str, payload: dict | None, failures: list[str]) -> dict | None:
        """One try: the answer's JSON, or None with the failure appended to `failures` (a 4xx raises at once)."""
        try:
            response = self._session().request(method, url + path, json=payload, timeout=self.timeout)
        except requests.Timeout:
            failures.append(f"{url}: no answer within {self.timeout:g} s (`teacher_server_timeout`)")
        except requests.ConnectionError as error:
            failures.append(f"{url}: cannot connect ({type(error).__name__})")
        except requests.RequestException as error:  # e.g. a server killed while it was answering
            failures.append(f"{url}: {type(error).__name__}: {error}")
        else:
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    failures.append(f"{url}: answered 200 with a body that is not JSON")
            else:
                message = _error_message(response)
                if 400 <= response.status_code < 500:
                    raise TeacherServerError(
                        f"The teacher server at {url} refused the request ({response.status_code}): {message}."
                        + _flag_hint(message), status=response.status_code,
                    )
                failures.append(f"{url}: {response.status_code} {message}")
        return None

    # ------------------------------------------------------------------ start-up probe

    def probe(self, tokenizer, top_k: int, min_model_len: int, role: str) -> None:
        """
        Check every replica before training: it answers, serves `self.model` (the only model it serves when no name was
        given), its `max_model_len` holds `min_model_len`, it allows `prompt_logprobs=top_k`, reads the highest id that
        can be scored, and its `decoded_token`s agree with `tokenizer` (the `role` tokenizer whose ids are sent). Each
        failure is a `TeacherServerError` naming the URL and the server flag to change.
        """
        for index, url in enumerate(self.urls):
            served = self._request("GET", "/v1/models", replica=index)
            names = [entry.get("id") for entry in served.get("data", [])]
            if self.model is None:
                if len(names) != 1:
                    raise TeacherServerError(
                        f"The teacher server at {url} serves {names}: name the teacher with "
                        "`teacher_model_name_or_path`."
                    )
                self.model = names[0]
            if self.model not in names:
                raise TeacherServerError(
                    f"The teacher server at {url} serves {names}, not {self.model!r} (`teacher_model_name_or_path`): "
                    f"serve it under that name (`vllm serve {self.model}`, or `--served-model-name {self.model}`)."
                )
            model_len = next(entry for entry in served["data"] if entry.get("id") == self.model).get("max_model_len")
            if model_len is not None:
                if model_len < min_model_len:
                    raise TeacherServerError(
                        f"The teacher server at {url} has `max_model_len` {model_len}, but scoring needs at least "
                        f"{min_model_len} tokens (`max_completion_length` + 1, plus the prompt): raise its "
                        "`--max-model-len`."
                    )
                self.max_model_len = model_len if self.max_model_len is None else min(self.max_model_len, model_len)
            self._probe_tokens(tokenizer, top_k, index, role)

    def _probe_tokens(self, tokenizer, top_k: int, index: int, role: str) -> None:
        url = self.urls[index]
        ids = np.unique(np.linspace(0, self.vocab_size - 1, PROBE_IDS).round().astype(int)).tolist()
        prompt = [ids[-1], *ids]  # entry 0 has no log-probs: every probed id is read from entries 1.., the last too
        try:
            body = self._request("POST", "/v1/completions", self._payload([prompt], top_k), replica=index)
        except TeacherServerError as error:
            if error.status is not None:  # refused, with the server's own reason and its hint
                raise
            raise TeacherServerError(
                f"{error} (The start-up probe scores ids 0..{ids[-1]}, every id the student can emit: a served model "
                "with fewer output rows than that fails on them. Serve a teacher whose vocabulary covers the "
                "student's.)"
            ) from error
        entries = body["choices"][0].get("prompt_logprobs")
        if not entries or len(entries) != len(prompt):
            raise TeacherServerError(
                f"The teacher server at {url} returned no `prompt_logprobs` for {len(prompt)} prompt tokens: it is not "
                "a vLLM OpenAI-compatible server (`vllm serve`), or too old to support `prompt_logprobs`."
            )
        mismatches = []
        for position, token in enumerate(prompt[1:], start=1):
            entry = (entries[position] or {}).get(str(token))
            decoded = entry.get("decoded_token") if entry else None
            accepted = _decodings(tokenizer, token) | {vllm_decoded_token(tokenizer, token, prompt[1:position])}
            if decoded is None or decoded not in accepted:
                mismatches.append(f"id {token}: server {decoded!r}, {role} tokenizer {tokenizer.decode([token])!r}")
        if mismatches:
            raise TeacherServerError(
                f"The teacher server at {url} decodes token ids differently from the {role}'s tokenizer "
                f"({len(mismatches)} of {len(prompt) - 1} probed ids; {'; '.join(mismatches[:3])}): it serves a model "
                "with another tokenizer. Serve the teacher whose tokenizer the trainer checks (`vllm serve <teacher> "
                "--tokenizer <its tokenizer>`), or, for a teacher of another tokenizer, make that tokenizer available "
                "(`teacher_model_name_or_path` as a local path or Hub id, or `teacher_processing_class`)."
            )

    # ------------------------------------------------------------------ scoring

    def _payload(self, prompts: list[list[int]], top_k: int) -> dict:
        return {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": top_k}

    def logprobs_for(self, top_k: int = 0, sample: bool = False) -> int:
        """The `prompt_logprobs` a request asks for: the top-k kept, the top-k a sample is drawn from, else 1 (the
        argmax)."""
        return top_k if top_k else (self.sample_top_k if sample else 1)

    def submit(self, prompt_ids, prompt_mask, completion_ids, completion_mask, top_k: int = 0,
               sample: bool = False) -> "PendingScores":
        """
        Send the rollouts' requests now and return at once; `PendingScores.result()` collects them. Same inputs and
        outputs as `score_completions` (prompts left-padded, completions right-padded): `top_k` > 0 keeps the teacher's
        top-k, `sample` draws a token from its top-`sample_top_k` (renormalised).
        """
        num_logprobs = self.logprobs_for(top_k, sample)
        rows = []
        prompt_lists = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(),
                                                                         strict=True)]
        lengths = completion_mask.cpu().int()
        for index, (prompt, completion, mask) in enumerate(zip(prompt_lists, completion_ids.cpu().tolist(), lengths,
                                                               strict=True)):
            kept = torch.nonzero(mask).flatten()
            num = int(kept[-1]) + 1 if kept.numel() else 0
            if num == 0:
                continue  # nothing of this rollout is trained on
            ids = prompt + completion[:num]
            if self.max_model_len is not None and len(ids) + 1 > self.max_model_len:
                raise TeacherServerError(
                    f"A rollout of {len(ids)} tokens ({len(prompt)} prompt + {num} completion) does not fit the teacher "
                    f"server's `max_model_len` {self.max_model_len} (it needs {len(ids) + 1}): raise its "
                    "`--max-model-len` at " + ", ".join(self.urls) + "."
                )
            rows.append(_Row(index, ids, len(prompt), num))
        # at least one request per replica (where there are rows enough), so that the replicas share the batch
        limit = min(self.request_tokens, max(1, math.ceil(sum(len(row.ids) for row in rows) / len(self.urls))))
        groups, group, size = [], [], 0
        for row in rows:
            if group and size + len(row.ids) > limit:
                groups.append(group)
                group, size = [], 0
            group.append(row)
            size += len(row.ids)
        if group:
            groups.append(group)
        submitted = time.perf_counter()
        cancelled = threading.Event()
        # In submission order: these requests go out once the previous batch's are answered (a server answers the
        # requests it holds together, so slices sent at once would all come back at the end)
        previous, self._previous = self._previous, []
        futures = [self._pool.submit(self._score_group, group, num_logprobs, previous, cancelled) for group in groups]
        self._previous = futures
        return PendingScores(futures, completion_ids, completion_mask, top_k, sample, num_logprobs, submitted,
                             cancelled)

    def _score_group(self, rows: list[_Row], num_logprobs: int, after=(), cancelled=None) -> list[tuple[_Row, dict]]:
        wait(after)
        if cancelled is not None and cancelled.is_set():
            return []
        body = self._request("POST", "/v1/completions", self._payload([row.ids for row in rows], num_logprobs),
                             tokens=sum(len(row.ids) for row in rows))
        choices = sorted(body.get("choices", []), key=lambda choice: choice.get("index", 0))
        if len(choices) != len(rows):
            raise TeacherServerError(
                f"The teacher server answered {len(choices)} choices for {len(rows)} prompts."
            )
        return [(row, _parse_row(row, choice.get("prompt_logprobs"), num_logprobs, self.vocab_size))
                for row, choice in zip(rows, choices, strict=True)]


def _decodings(tokenizer, token: int) -> set[str]:
    """The strings vLLM versions write as `decoded_token` for an id decoded alone: the id decoded (with or without the
    tokenizer's clean-up of spaces, which the server's copy of the tokenizer may set otherwise), the raw vocabulary
    piece (older versions), or the decoded id with the leading spaces a SentencePiece `▁` stands for restored (newer
    ones)."""
    decoded = {tokenizer.decode([token], clean_up_tokenization_spaces=clean) for clean in (False, True)}
    raw = tokenizer.convert_ids_to_tokens(token) or ""
    markers = len(raw) - len(raw.lstrip("▁"))
    return decoded | {raw} | {" " * markers + text.lstrip(" ") for text in decoded}


# vLLM completes a piece of a multi-byte character with at most this many tokens before it
_UTF8_CONTEXT = 4


def vllm_decoded_token(tokenizer, token: int, context: list[int]) -> str:
    """
    The `decoded_token` vLLM (0.32) writes for `token` in the prompt log-probs of a position whose earlier prompt
    tokens are `context` (entry 0 has none, so the prompt's first token is never part of it). A token that decodes
    alone to text not ending in U+FFFD is that text. One that does is a piece of a multi-byte character (every
    byte-level BPE has such ids): vLLM decodes it after the last 1, 2, ... 4 context tokens and, at the first that
    completes the character, writes the text it adds beyond the context's own complete text; if none completes it,
    `""`. The top-k entries of a position are read against the same context.
    """
    text = tokenizer.decode([token]) or ""
    if not text.endswith("\ufffd"):
        return text
    for count in range(1, min(len(context), _UTF8_CONTEXT) + 1):
        before = list(context[-count:])
        joined = tokenizer.decode(before + [token])
        if joined.endswith("\ufffd"):
            continue
        # the context's own text ends before its trailing pieces of an incomplete character
        complete = len(before)
        while complete > 0 and tokenizer.decode([before[complete - 1]]).endswith("\ufffd"):
            complete -= 1
        own = tokenizer.decode(before[:complete]) if complete else ""
        return joined[len(os.path.commonprefix([own, joined])):]
    return ""


def _logprob(value) -> float:
    """A log-prob as vLLM writes it: -9999.0 is -inf, `null` is NaN."""
    if value is None:
        return math.nan
    value = float(value)
    return -math.inf if value <= VLLM_NEG_INF else value


def _parse_row(row: _Row, entries, num_logprobs: int, vocab_size: int) -> dict:
    """
    The completion positions of one choice's `prompt_logprobs`, as arrays: `logps` `log p_T(y_t)` and `valid` (y_t's
    entry present, finite, a scored id), and the scored ids among the top-`num_logprobs` by rank with their log-probs
    (the empty slots last, id -1).
    """
    n, k = row.num_completion, num_logprobs
    logps = np.zeros(n, dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    top_ids = np.full((n, k), -1, dtype=np.int64)
    top_logps = np.full((n, k), NO_MASS, dtype=np.float32)
    if entries is None or len(entries) < len(row.ids):
        raise TeacherServerError(
            f"The teacher server returned {0 if entries is None else len(entries)} `prompt_logprobs` entries for a "
            f"prompt of {len(row.ids)} tokens."
        )
    for t in range(n):
        position = row.num_prompt + t
        entry = entries[position]
        if not entry:
            continue
        token = row.ids[position]
        actual = entry.get(str(token))
        if actual is not None:
            value = _logprob(actual.get("logprob"))
            if math.isfinite(value) and token < vocab_size:
                logps[t], valid[t] = value, True
        ranked = sorted(
            ((item.get("rank"), -_logprob(item.get("logprob")), int(key)) for key, item in entry.items()
             if item.get("rank") is not None and item["rank"] <= k),
        )[:k]
        # kept slots first, in rank order: slot 0 is the best-ranked scored id (the argmax over the scored ids)
        kept = [(token_id, -negative) for _, negative, token_id in ranked
                if token_id < vocab_size and math.isfinite(-negative)]
        for slot, (token_id, value) in enumerate(kept):
            top_ids[t, slot], top_logps[t, slot] = token_id, value
    return {"logps": logps, "valid": valid, "top_ids": top_ids, "top_logps": top_logps}


class PendingScores:
    """The requests of one batch, in flight; `result()` waits for them and returns the `TeacherScores`."""

    def __init__(self, futures: list[Future], completion_ids, completion_mask, top_k, sample, num_logprobs,
                 submitted: float | None = None, cancelled: threading.Event | None = None):
        self.futures = futures
        self.shape = tuple(completion_ids.shape)
        self.device = completion_ids.device
        self.completion_mask = completion_mask
        self.top_k, self.sample, self.num_logprobs = top_k, sample, num_logprobs
        # Seconds from submission until the last answer was in, and of those, how long `result()` waited (the rest was
        # hidden behind the trainer's own work); set by `result()`. `submitted`, `answered`: `time.perf_counter()`s.
        self.request_time = self.wait_time = None
        self.submitted = self.answered = time.perf_counter() if submitted is None else submitted
        self._cancelled = cancelled
        for future in futures:
            future.add_done_callback(self._note_answer)

    def _note_answer(self, future):
        self.answered = max(self.answered, time.perf_counter())

    def cancel(self) -> None:
        """Drop the requests not sent yet (those being answered finish, unread)."""
        if self._cancelled is not None:
            self._cancelled.set()
        for future in self.futures:
            future.cancel()

    def result(self) -> TeacherScores:
        waiting = time.perf_counter()
        batch, length = self.shape
        k = self.num_logprobs
        logps = np.zeros((batch, length), dtype=np.float32)
        valid = np.zeros((batch, length), dtype=bool)
        top_ids = np.full((batch, length, k), -1, dtype=np.int64)
        top_logps = np.full((batch, length, k), NO_MASS, dtype=np.float32)
        try:
            for future in self.futures:
                for row, parsed in future.result():
                    n = row.num_completion
                    logps[row.index, :n], valid[row.index, :n] = parsed["logps"], parsed["valid"]
                    top_ids[row.index, :n], top_logps[row.index, :n] = parsed["top_ids"], parsed["top_logps"]
        except BaseException:
            self.cancel()
            raise
        self.wait_time = time.perf_counter() - waiting
        self.request_time = self.answered - self.submitted
        mask = self.completion_mask.bool().cpu().numpy()
        top_valid = (top_ids >= 0) & mask[..., None]
        valid &= mask

        def tensor(array):
            return torch.from_numpy(array).to(self.device)

        scores = {"logps": tensor(logps), "valid": tensor(valid), "argmax": tensor(top_ids[..., 0].copy())}
        if self.top_k:
            scores["topk_ids"], scores["topk_logps"] = tensor(top_ids[..., : self.top_k].copy()), tensor(
                top_logps[..., : self.top_k].copy())
            scores["topk_valid"] = tensor(top_valid[..., : self.top_k].copy())
        if self.sample:
            # the teacher renormalised on its top-k: the only part of its distribution the server returns
            weights = torch.from_numpy(np.where(top_valid, np.exp(top_logps.astype(np.float64)), 0.0))
            has_any = weights.sum(-1) > 0
            drawn = torch.multinomial(torch.where(has_any.unsqueeze(-1), weights, 1.0).view(-1, k), 1).view(batch,
                                                                                                             length)
            chosen = torch.from_numpy(top_ids).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
            scores["sample"] = torch.where(has_any, chosen, -1).to(self.device)
        return TeacherScores(**scores)


class ScoresBySlice:
    """
    A generation batch's scores from the served teacher, requested slice by slice in the order the trainer will train
    the slices, and collected one slice at a time: the trainer waits only for the slice it is about to train, and the
    later slices are answered while the earlier ones run forward and backward.

    `rows[j]`: the batch rows of slice `j`. `start(rows)`: sends those rows' requests and returns their scores in flight
    (`alignment.Mapped` over this module's `PendingScores`). Slices before `first` are not trained from this batch (a
    run resumed inside a generation batch) and are never requested.
    """

    def __init__(self, rows: list[torch.Tensor], start, first: int = 0):
        self.rows = rows
        self._in_flight = {index: start(rows[index]) for index in range(first, len(rows))}  # sent in this order
        self._sent = list(self._in_flight.values())
        self._waited = 0.0

    @property
    def uncollected(self) -> list[int]:
        """The slices whose scores were requested and not collected yet."""
        return list(self._in_flight)

    def collect(self, index: int) -> TeacherScores | None:
        """Slice `index`'s scores, waited for; None where they were collected before or never requested. A failure
        cancels the requests of every slice not collected yet."""
        in_flight = self._in_flight.pop(index, None)
        if in_flight is None:
            return None
        try:
            scores = in_flight.result()
        except BaseException:
            self.cancel()
            raise
        self._waited += getattr(in_flight.pending, "wait_time", None) or 0.0
        return scores

    def cancel(self) -> None:
        for in_flight in self._in_flight.values():
            if hasattr(in_flight.pending, "cancel"):
                in_flight.pending.cancel()
        self._in_flight.clear()

    def take_wait_time(self) -> float:
        """Seconds the trainer was blocked on this batch's answers since the last call."""
        waited, self._waited = self._waited, 0.0
        return waited

    @property
    def request_time(self) -> float:
        """Seconds from sending the first slice's requests until the last answer was in."""
        # (in a routed batch, a slice whose rows all went to in-process teachers has no served timings)
        answered = [value for value in (getattr(item.pending, "answered", None) for item in self._sent) if value]
        submitted = [value for value in (getattr(item.pending, "submitted", None) for item in self._sent) if value]
        return max(answered) - min(submitted) if answered and submitted else 0.0
