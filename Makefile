# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first so pip does not pull a multi-GB CUDA build;
# production GPU images install a CUDA build instead (see Dockerfile).
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo test lint typecheck serve worker clean

$(BIN)/synthray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_CPU)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

venv: $(BIN)/synthray

demo: venv
	$(BIN)/synthray demo

test: venv
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy synthray

serve: venv
	$(BIN)/synthray serve

worker: venv
	$(BIN)/synthray worker --queues gpu,cpu

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
