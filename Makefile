# The two entry points of the README. Both create the virtual environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/isle: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -e '.[dev]'
	touch $(BIN)/isle

demo: $(BIN)/isle
	$(BIN)/isle demo --out demo-out --overwrite

test: $(BIN)/isle
	$(BIN)/python -m pytest -q

lint: $(BIN)/isle
	$(BIN)/ruff check .
	$(BIN)/python -m mypy

bench: $(BIN)/isle
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) demo-out *.egg-info
