"""Pilot for the cross_tokenizer regime (docs/benchmarks/methods_cross_tokenizer.md): the character teacher's TGPO
guidance (small_gap), kept only at the positions where the BPE teacher's alignment gives a target, guidance alone, the
benchmark's student and settings, 150 steps. `python benchmarks/pilots/cross_tokenizer_coverage.py masked SEED`
(`full`: the same without the mask)."""
import os, sys, torch
os.environ["HF_HUB_OFFLINE"]="1"; os.environ["TRL_EXPERIMENTAL_SILENCE"]="1"
torch.set_num_threads(int(os.environ.get("THREADS", 1)))
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hl; hl.set_verbosity_error()
from tgpo_trl import TGPOConfig, TGPOTrainer, CHECKPOINTING_FIELD
from tgpo_trl.alignment import CrossTokenizerAlignment
from tgpo_trl.demo.build import build_demo_models, build_cross_tokenizer_teacher
from tgpo_trl.demo.evaluate import greedy_evaluation
from tgpo_trl.demo.task import build_dataset
from tgpo_trl.rewards import get_reward_funcs
if len(sys.argv) < 2 or sys.argv[1] not in ("masked", "full"):
    raise SystemExit(__doc__)
mode = sys.argv[1]
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
m = build_demo_models(progress=False)
tok = AutoTokenizer.from_pretrained(m.tokenizer)
student = AutoModelForCausalLM.from_pretrained(m.student_small_gap)
teacher = AutoModelForCausalLM.from_pretrained(m.teacher)
bpe_tok = AutoTokenizer.from_pretrained(build_cross_tokenizer_teacher(progress=False))
alignment = CrossTokenizerAlignment(tok, bpe_tok, len(tok))
test = build_dataset(200, 0, "test")

class Masked(TGPOTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if mode == "masked":
            batch = alignment.teacher_batch([x["prompt"] for x in inputs], out["completion_ids"], out["completion_mask"])
            out["teacher_aligned"] = out["teacher_aligned"] & (batch.sync_index >= 0)
        return out

evals = []
from transformers import TrainerCallback
class Eval(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % 50 == 0:
            evals.append((state.global_step, greedy_evaluation(model, tok, test, 40).accuracy)); model.train()
args = TGPOConfig(output_dir=__import__("tempfile").mkdtemp(), max_steps=150, per_device_train_batch_size=64, num_generations=8,
    max_completion_length=40, temperature=0.7, learning_rate=1e-4, lr_scheduler_type="constant", loss_type="dapo",
    logging_steps=50, save_strategy="no", report_to="none", disable_tqdm=True, bf16=False, use_cpu=True, seed=seed, data_seed=seed,
    guidance="tgpo", guidance_coef=1.0, guidance_schedule="constant", use_task_reward=False, guidance_top_k=20, **{CHECKPOINTING_FIELD: False})
tr = Masked(model=student, reward_funcs=get_reward_funcs("format"), args=args, train_dataset=build_dataset(1200, 100 + seed, "train"),
    processing_class=tok, teacher_model=teacher, callbacks=[Eval()])
tr.train()
print(mode, seed, "evals", evals, "aligned", [r.get("gap/aligned_ratio") for r in tr.state.log_history if "loss" in r])
