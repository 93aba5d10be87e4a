"""opd step time, before (a second student forward for log p_old, commit a8add73) and after (log p_old from the loss
forward), alternated in one process. The old package is imported as `tgpo_trl_old` from `$OLD_TGPO` (default
/tmp/oldsrc), made with:

    mkdir -p /tmp/oldsrc && git archive a8add73 tgpo_trl | tar -x -C /tmp/oldsrc && mv /tmp/oldsrc/tgpo_trl /tmp/oldsrc/tgpo_trl_old
    python benchmarks/pilots/opd_second_forward.py 3        # rounds

Student: Qwen2 hidden 256, 4 layers, vocab 151,936 (Qwen's); teacher hidden 256, 4 layers; 8 fixed rollouts x
(24 prompt + 128 completion) tokens; CPU, float32."""
import os
import statistics
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
sys.path.insert(0, os.environ.get("OLD_TGPO", "/tmp/oldsrc"))
import torch
from datasets import Dataset
from transformers import TrainerCallback
from tgpo_trl import TGPOConfig, TGPOTrainer, CHECKPOINTING_FIELD
from tgpo_trl.demo.models import tiny_qwen2
from tgpo_trl.demo.tokenizer import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer
import tgpo_trl_old

VOCAB = 151_936
tok = build_char_tokenizer(list(CHARACTERS) + [f"<v{i}>" for i in range(VOCAB - len(SPECIAL_TOKENS) - len(set(CHARACTERS)))])
assert len(tok) == VOCAB
g = torch.Generator().manual_seed(0)
PROMPTS = torch.randint(len(SPECIAL_TOKENS), VOCAB, (8, 24), generator=g).tolist()
COMPLETIONS = torch.randint(len(SPECIAL_TOKENS), VOCAB, (8, 128), generator=g).tolist()
def rollout_func(prompts, trainer):  # fixed rollouts: no sampling noise in the step time
    return {"prompt_ids": PROMPTS[:len(prompts)], "completion_ids": COMPLETIONS[:len(prompts)], "logprobs": None}
ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i + 1}="}] for i in range(64)]})

class Times(TrainerCallback):
    def __init__(self): self.times, self.t = [], None
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): self.times.append(time.perf_counter() - self.t)

def trainer(pkg, steps, seed):
    cfg_cls, tr_cls = (TGPOConfig, TGPOTrainer) if pkg == "new" else (tgpo_trl_old.TGPOConfig, tgpo_trl_old.TGPOTrainer)
    student = tiny_qwen2(tok, hidden_size=256, num_layers=4, seed=0, vocab_size=VOCAB)
    teacher = tiny_qwen2(tok, hidden_size=256, num_layers=4, seed=1, vocab_size=VOCAB)
    args = cfg_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=4,
                   max_completion_length=128, max_steps=steps, learning_rate=1e-5, report_to=[], logging_steps=1,
                   use_cpu=True, save_strategy="no", disable_tqdm=True, seed=seed, bf16=False,
                   guidance="opd", guidance_coef=1.0, guidance_schedule="constant",
                   **{("gradient_checkpointing" if pkg == "old" else CHECKPOINTING_FIELD): False})
    cb = Times()
    t = tr_cls(model=student, reward_funcs=lambda completions, **k: [float(len(c[0]["content"])) for c in completions],
               args=args, train_dataset=ds, processing_class=tok, teacher_model=teacher, callbacks=[cb], rollout_func=rollout_func)
    return t, cb

results = {"old": [], "new": []}
for round_ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    for pkg in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
        t, cb = trainer(pkg, 4, seed=round_)
        t.train()
        results[pkg] += cb.times[1:]  # the first step of each trainer is a warm-up
        print(round_, pkg, [f"{x*1000:.0f}" for x in cb.times], flush=True)
for pkg, times in results.items():
    print(pkg, f"median {statistics.median(times)*1000:.0f} ms, mean {statistics.mean(times)*1000:.0f} ms, n={len(times)}")
print("new/old median ratio", f"{statistics.median(results['new'])/statistics.median(results['old']):.3f}")
