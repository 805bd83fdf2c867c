# The single entry point. `make demo` and `make test` set themselves up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install assets demo demo-cluster test test-unit fuzz lint format bench clean all

all: lint test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "wavechain needs Python >= 3.11, found " + sys.version' \
		|| { echo "error: set PYTHON=/path/to/python3.11+" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The dashboard's front-end packages, from the npm registry (versions in
# dashboard/package-lock.json), into service/static/vendor with their licences. The
# result is committed, so installing wavechain needs no Node.js.
assets:
	cd dashboard && npm ci --no-audit --no-fund && node build.mjs

demo: $(STAMP)
	$(BIN)/wavechain demo

# The same chain on PostgreSQL (the local server, or a throwaway one), three replicas
# behind nginx (installed from Debian's packages if missing).
demo-cluster: $(STAMP)
	$(BIN)/python -m tests.support.cluster_demo

test: $(STAMP)
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest -p no:cacheprovider -q

test-unit: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider -q -m unit

# The property-based tests of the webhook route and the REST API at 20x their size in
# `make test`: over 10,000 generated requests against a live server; prints the count.
fuzz: $(STAMP)
	FUZZ_SCALE=20 $(BIN)/pytest -p no:cacheprovider -q -s --timeout 3600 tests/e2e/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The receiver benchmark drives load with wrk (Debian's package) where it can install it;
# without it, it falls back to its own aiohttp load generator and says so in the table.
bench: $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }; } \
		>/dev/null 2>&1; } \
		|| echo "note: wrk not installed; the receiver benchmark uses its aiohttp load generator"
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) .wavechain .mypy_cache .ruff_cache
