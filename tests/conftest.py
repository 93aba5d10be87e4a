import importlib.util
import os
import subprocess
import sys


os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download must fail loudly
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tgpo_trl import CHECKPOINTING_FIELD, TGPOConfig, TGPOTrainer  # noqa: E402
from tgpo_trl.demo.models import tiny_qwen2  # noqa: E402
from tgpo_trl.demo.tokenizer import build_char_tokenizer  # noqa: E402

import real_vllm  # noqa: E402


def pytest_collection_finish(session):
    """Real vLLM's environment takes minutes to build the first time: start it now, beside the rest of the suite."""
    if any(item.get_closest_marker("vllm") for item in session.items):
        real_vllm.start_building()


def pytest_terminal_summary(terminalreporter):
    seconds = real_vllm.build_seconds()
    if seconds is not None:
        terminalreporter.write_line(f"real vLLM: scripts/vllm_env.sh took {seconds:.0f} s, beside the suite (built or "
                                    f"reused at {real_vllm.ENV_DIR})")


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two contending, and a
    server beside the trainer needs the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def student(tokenizer):
    return tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0)


@pytest.fixture
def teacher(tokenizer):
    # A padded embedding (7 rows beyond the tokenizer), as Qwen's larger models have
    return tiny_qwen2(tokenizer, hidden_size=48, num_layers=2, seed=1, vocab_size=len(tokenizer) + 7)


def length_reward(completions, **kwargs):
    return [len(c[0]["content"] if isinstance(c, list) else c) / 10 for c in completions]


def digit_reward(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(sum(ch.isdigit() for ch in text)) for text in texts]


@pytest.fixture
def dataset():
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i + 1}="}] for i in range(16)]})


def config_settings(tmp_path, **overrides) -> dict:
    """The tests' small training settings, as keyword arguments of `TGPOConfig`."""
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        guidance_coef=0.5,
        bf16=False,  # exact float32 arithmetic, so recomputations can be compared tightly
    )
    settings[CHECKPOINTING_FIELD] = False
    settings.update(overrides)
    return settings


def make_config(tmp_path, **overrides):
    return TGPOConfig(**config_settings(tmp_path, **overrides))


def make_trainer(
    tmp_path, student, teacher, tokenizer, dataset, reward_funcs=length_reward, trainer_kwargs=None, **overrides
):
    return TGPOTrainer(
        model=student,
        reward_funcs=reward_funcs,
        args=make_config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        teacher_model=teacher,
        **(trainer_kwargs or {}),
    )


def train_logs(trainer):
    """Per-step training logs (the final summary row dropped)."""
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


@pytest.fixture
def generation_batch(tokenizer):
    """A fixed batch in the layout `_generate_and_score_completions` returns, for scoring without sampling."""
    torch.manual_seed(0)
    prompt_ids = torch.randint(6, len(tokenizer), (4, 5))
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = tokenizer.pad_token_id
    completion_ids = torch.randint(6, len(tokenizer), (4, 6))
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0  # right padding
    completion_ids[1, 4:] = tokenizer.pad_token_id
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def load_script(path, name=None):
    """Import a script (scripts/*.py, a generated worker) as a module, for its functions."""
    spec = importlib.util.spec_from_file_location(name or os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark_quick(path, tmp_path_factory):
    """A benchmark that keeps its runs in `--results-dir`, run `--quick` into fresh folders at one torch thread:
    `(results dir, out dir, stdout)`."""
    results_dir, out_dir = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("benchmarks")
    stdout = run_script_quick(path, out_dir, "--results-dir", results_dir, OMP_NUM_THREADS="1")
    return results_dir, out_dir, stdout


def run_script_quick(path, out_dir, *extra, **env):
    """Run `python <script> --quick --out-dir <out_dir> <extra>` offline in a subprocess; its stdout (asserts it
    succeeded). `env` adds environment variables."""
    process = subprocess.run(
        [sys.executable, str(path), "--quick", "--out-dir", str(out_dir), *map(str, extra)],
        check=False, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process.stdout
