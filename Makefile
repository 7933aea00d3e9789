# Every target uses the project's own virtual environment in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-all lint demo bench clean

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all,dev]"

$(BIN)/python:
	$(PY) -m venv $(VENV)

test:
	$(BIN)/python -m pytest -q

test-all:
	$(BIN)/python -m pytest -q -m ""

lint:
	$(BIN)/ruff check blockrag tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
