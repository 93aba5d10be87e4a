"""Measure a student-teacher pair before training, and say which method fits (docs/gap_report.md).

    accelerate launch scripts/gap_report.py                                   # no arguments: the offline demo's pair
    accelerate launch scripts/gap_report.py --gap_demo_student student_large_gap
    accelerate launch scripts/gap_report.py --config recipes/x.yaml --gap_num_prompts 256
    python scripts/gap_report.py --help                                       # every option

The entry point is `tgpo_trl/scripts/gap_report.py`, which an installed package runs as `tgpo gap-report ...`; the
measuring is `tgpo_trl.gap_report.measure_gap`.
"""

from tgpo_trl.scripts.gap_report import cli

if __name__ == "__main__":
    cli()
