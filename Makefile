# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first so pip does not pull a multi-GB CUDA build;
# production GPU images install a CUDA build instead (see Dockerfile).
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo test test-fast lint typecheck serve worker gpu-check clean

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
	$(BIN)/pytest --durations=25

# The inner loop: SQLite only, no worker processes, no whole-reference-set acceptance runs.
test-fast: venv
	$(BIN)/pytest -m "not e2e and not slow" -k "not postgres and not redis"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy synthray

# The CUDA path (tests marked cuda, the train benchmark, a worker job on the GPU); says so
# and exits 0 where there is no GPU.
gpu-check: venv
	bash scripts/gpu_check.sh

serve: venv
	$(BIN)/synthray serve

worker: venv
	$(BIN)/synthray worker --queues gpu,cpu

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
