# ssltrain developer commands. `make install` builds a local virtualenv in .venv.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# torch is pinned so pip takes the CPU build shipped on the dev machines instead of
# several GB of CUDA wheels; GPU machines keep their own torch (see README).
TORCH  ?= torch==2.13.0

.PHONY: install test test-fast bench bench-gpu lint wheels device-wheels clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"

# The full suite, slow end-to-end runs included (this is what CI runs).
# pytest exits 5 when it collects nothing: report it rather than pass silently.
test:
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

test-fast:
	$(PY) -m pytest -q -m "not slow"

bench:
	$(PY) scripts/bench.py

# On a CUDA machine: every GPU measurement of docs/benchmarks.md, most important first, in ~9 minutes.
BENCH_OUT ?= outputs/bench-gpu
bench-gpu:
	PYTHON=$(PY) scripts/bench_gpu.sh $(BENCH_OUT)

lint:
	$(PY) -m ruff check ssltrain tests scripts
	$(VENV)/bin/lint-imports

# Wheels for an offline CUDA machine with its own torch/transformers (scripts/offline_install.sh there).
WHEELS_PYTHON ?= 3.12
wheels:
	PY=$(PY) scripts/offline_wheels.sh $(WHEELS_PYTHON) .wheels

# Only what the lent GPU machine's image lacks, for `WHEELS=.wheels/device scripts/bench_gpu.sh` there.
device-wheels:
	PY=$(PY) scripts/offline_wheels.sh --device .wheels/device

clean:
	rm -rf outputs multirun .pytest_cache
