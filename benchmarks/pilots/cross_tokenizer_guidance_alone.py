"""Pilot for the cross_tokenizer regime (docs/benchmarks/methods_cross_tokenizer.md), seed 0, the benchmark's settings: TGPO on the guidance alone (no task reward), to tell
whether the guidance at the aligned positions harms the student or whether the unguided positions are left to GRPO."""
import multiprocessing
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from benchmarks import methods as M

def method_config(method, settings, _orig=M.method_config):
    if method == "tgpo_pure":
        return {"guidance": "tgpo", "guidance_coef": settings["guidance_coef"], "guidance_schedule": "constant",
                "use_task_reward": False}
    return _orig(method, settings)

def run(job):
    M.method_config = method_config
    return M.run_one(*job)

if __name__ == "__main__":
    settings = dict(M.FULL)
    jobs = []
    for regime in ("cross_tokenizer", "small_gap"):
        path = str(M.common.REPO) + f"/outputs/pilot-cross/{regime}_tgpo_pure_seed0.json"
        jobs.append((regime, "tgpo_pure", 0, settings, path))
    import os
    os.makedirs(str(M.common.REPO) + "/outputs/pilot-cross", exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for done in pool.imap_unordered(run, jobs):
            print(done, flush=True)
