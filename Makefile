# modelfleet developer tasks.  Run `make` (or `make help`) for the list.
#
# Overridable:  PYTHON=python3.12 make venv     PYTEST_ARGS='-k routing -x' make test
#               BENCH_ARGS='--quick --json /tmp/bench.json' make bench

SHELL       := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
PYTEST_ARGS ?=
BENCH_ARGS  ?=

VPY   := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv broker prometheus test chaos demo bench lint fmt typecheck check clean distclean

help: ## Show this list of targets
	@echo "Usage: make <target> [PYTHON=python3] [PYTEST_ARGS='...']"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The interpreter is created once; the stamp is refreshed (pip install re-run)
# whenever pyproject.toml is newer than it.  `make distclean` to switch PYTHON.
$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[dev]'
	@touch $@

venv: $(STAMP) ## Create .venv and install the package with [dev] extras

broker: ## Make sure a RabbitMQ (3.10+) is reachable for tests/demo
	@scripts/ensure-broker

prometheus: ## Make sure promtool + prometheus (Debian's package) are installed for the tests
	@scripts/ensure-prometheus

test: venv broker prometheus ## Run the test suite (PYTEST_ARGS=... passed to pytest)
	$(VPY) -m pytest $(PYTEST_ARGS)

chaos: venv broker ## Long chaos soak: 5,000 jobs through kills, stops, restarts (CHAOS_JOBS=N)
	$(VPY) -m tests.chaos.soak --jobs $${CHAOS_JOBS:-5000}

demo: venv broker ## Run the local demo (modelfleet demo)
	$(VENV)/bin/modelfleet demo

bench: venv broker ## Benchmark vs its floors (BENCH_ARGS=--quick for the short mode; bench/README.md)
	$(VPY) -m bench.run $(BENCH_ARGS)

lint: venv ## ruff check + ruff format --check
	@rc=0; \
	$(VENV)/bin/ruff check src tests || rc=1; \
	$(VENV)/bin/ruff format --check src tests || rc=1; \
	exit $$rc

fmt: venv ## Reformat and apply safe ruff fixes
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

typecheck: venv ## mypy (strict, configured in pyproject.toml)
	$(VENV)/bin/mypy

check: lint typecheck test ## lint + typecheck + test

clean: ## Remove caches and build output (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist
	find . -path ./$(VENV) -prune -o \
		\( -name __pycache__ -o -name '*.egg-info' \) -type d -print0 | xargs -0 -r rm -rf

distclean: clean ## clean, and remove .venv too
	rm -rf $(VENV)
