# `make train`: set up and run the main job. `make test`: set up, lint and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (on this project's machines it is installed from local disk in seconds).
TORCH ?= torch==2.13.0

.PHONY: setup train test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(VENV)/bin/tlb-rl train --config configs/ppo/doorkey5.yaml $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/cores.py
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
