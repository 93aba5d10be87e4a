"""The benchmarks of TGPO against its baselines (not part of the installed package). Each module runs as
`python benchmarks/<name>.py` from anywhere; what they share is in `benchmarks.common`."""
