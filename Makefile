.PHONY: install test demo quality

install:
	python -m pip install torch==2.13.0
	python -m pip install -e ".[test]"

test:
	HF_HUB_OFFLINE=1 python -m pytest -q -rs tests

demo:
	accelerate launch scripts/train.py

quality:
	python -m ruff check tgpo_trl scripts benchmarks tests
