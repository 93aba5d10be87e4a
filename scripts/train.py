"""Train a student with TGPO (Teacher-Guided Policy Optimization, arXiv 2605.13230).

    accelerate launch scripts/train.py                                  # no arguments: the offline demo
    accelerate launch scripts/train.py --guidance none --max_steps 50   # the demo, with overrides
    accelerate launch scripts/train.py --demo_size quick                # the demo, reduced (for tests)
    accelerate launch --config_file recipes/accelerate/zero3.yaml scripts/train.py \
        --config recipes/qwen2.5-math-1.5b_tgpo.yaml [--flag value ...]
    python scripts/train.py --help                                      # every option

The entry point is `tgpo_trl/scripts/train.py`, which an installed package runs as `tgpo train ...`.
"""

from tgpo_trl.scripts.train import cli

if __name__ == "__main__":
    cli()
