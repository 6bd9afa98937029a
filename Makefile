# Parley: `make dev` runs the service, `make test` runs the checks and the tests.
# Each creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: dev test lint unit faults bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Parley needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned (2.13.0): with a local CPU wheel of it, no CUDA packages are pulled.
	$(BIN)/python -m pip install --quiet -e '.[worker,local,test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/parley dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict app worker bench celeryconfig.py
	# The layers of architecture.md: import-linter contracts in pyproject.toml.
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

# The fault scenarios alone (make test runs them too), printing their figures (FAULT lines).
faults: $(STAMP)
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/faults

# The benchmarks of the docs' benchmarks.md: each prints its figures and its baseline's.
# B5 uses the PostgreSQL of BENCH_DATABASE_URL (default: the one at 127.0.0.1:5432).
bench: $(STAMP)
	$(BIN)/python -m bench.b1_submit
	$(BIN)/python -m bench.b2_turn_overhead
	$(BIN)/python -m bench.engine_beside_work
	$(BIN)/python -m bench.b3_model_throughput
	$(BIN)/python -m bench.b4_long_conversation
	$(BIN)/python -m bench.prefill_stall
	$(BIN)/python -m bench.time_to_first_token
	$(BIN)/python -m bench.b5_transcripts

clean:
	rm -rf $(VENV) .parley/test .mypy_cache .ruff_cache
