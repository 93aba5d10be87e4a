"""How good is the demo teacher's target on the student's own prefixes? (the diagnosis in docs/benchmarks/methods.md)

    python benchmarks/teacher_on_prefixes.py [--size full|quick] [--problems 200] [--temperature 0.7] [--out ...json]

For each demo student: sample one rollout per held-out problem (at the benchmark's temperature), cut it after 0, 25,
50 and 75% of its tokens, let the teacher finish greedily, and score the answers. TGPO's guidance is the teacher's
prediction on exactly such prefixes: where the teacher cannot finish them correctly, its target points nowhere useful.
A prefix that already holds a wrong digit caps what any continuation can score, so the student's own accuracy from the
same prefix is reported next to the teacher's.
"""

import argparse
import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer

from tgpo_trl.demo.build import build_demo_models
from tgpo_trl.demo.evaluate import (
    accuracy_from_prefixes,
    encode_prompts,
    exact_match_accuracy,
    generate_completions,
)
from tgpo_trl.demo.task import MAX_COMPLETION_LENGTH, build_dataset

FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def main(size: str, problems: int, seed: int, temperature: float = 0.7) -> dict:
    torch.manual_seed(seed)
    models = build_demo_models(size=size, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(models.tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(models.teacher)
    test_set = build_dataset(problems, seed, "test")
    prompts = encode_prompts(tokenizer, test_set["prompt"])
    results = {"settings": {"size": size, "problems": problems, "seed": seed, "fractions": FRACTIONS,
                            "temperature": temperature, "teacher_build": models.report["settings"]["teacher"]}}
    for name in ("student_large_gap", "student_small_gap"):
        student = AutoModelForCausalLM.from_pretrained(getattr(models, name))
        rollouts = generate_completions(student, tokenizer, prompts, MAX_COMPLETION_LENGTH,
                                        temperature=temperature)
        texts = tokenizer.batch_decode(rollouts, skip_special_tokens=True)
        results[name] = {"student_sampled_accuracy": exact_match_accuracy(texts, test_set["answer"])}
        for role, model in (("teacher", teacher), ("student", student)):
            results[name][f"{role}_accuracy_from_prefix"] = {
                str(fraction): accuracy_from_prefixes(model, tokenizer, test_set, rollouts, fraction,
                                                      MAX_COMPLETION_LENGTH)
                for fraction in FRACTIONS
            }
        print(name, json.dumps(results[name]), flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=["full", "quick"])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.7, help="the students' sampling temperature")
    parser.add_argument("--out", default="docs/benchmarks/teacher_prefixes.json")
    args = parser.parse_args()
    with open(args.out, "w") as file:
        json.dump(main(args.size, args.problems, args.seed, args.temperature), file, indent=1)
