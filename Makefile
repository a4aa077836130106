# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installs come from the hashed lock files (scripts/lock.sh regenerates them from
# pyproject.toml): exactly the locked files, or the install fails. The CPU build of torch
# has its own lock; production GPU images install a CUDA build instead (see Dockerfile).

.PHONY: venv demo test test-fast lint typecheck serve worker gpu-check clean

$(BIN)/synthray: pyproject.toml requirements/dev.txt requirements/torch-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps \
		-r requirements/torch-cpu.txt -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
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
	$(BIN)/mypy synthray benchmarks

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
