# cepsync — every target a newcomer needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.lock pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: help install demo test test-fast lint bench bench-10m bench-start bench-warehouse campaign package checkov simulator bigquery-emulator browser clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "cepsync needs Python >= 3.11, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## Create .venv with the pinned packages (requirements.lock) and cepsync itself

demo: install ## A real sync on the embedded default: DuckDB -> local Batch simulator, full then delta
	$(BIN)/cepsync demo

bigquery-emulator: ## Install the local BigQuery emulator (.venv-bq, Python 3.13, pinned, offline-ready)
	bash scripts/install-bigquery-emulator.sh

browser: ## Install Debian's headless Chromium and its driver (the HTML report's browser test), if missing
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	else echo "make browser: run as root or install chromium and chromium-driver with your package manager" >&2; exit 1; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver

# The prerequisites the machine must provide are checked first, in seconds, and each missing
# one is named in one line (scripts/check-prerequisites.sh), before installing anything.
test: ## The whole suite: unit, integration, emulators (Firestore, Pub/Sub, BigQuery), infra + checkov
	@PYTHON=$(PYTHON) bash scripts/check-prerequisites.sh
	@$(MAKE) --no-print-directory install bigquery-emulator browser
	$(BIN)/python -m pytest
	bash infra/checkov.sh

test-fast: ## Unit and simulator tests only (no emulators, no slow crash tests)
	@PYTHON=$(PYTHON) bash scripts/check-prerequisites.sh --fast
	@$(MAKE) --no-print-directory install browser
	$(BIN)/python -m pytest -m "not emulator and not slow"

lint: install ## ruff (lint + format check) and mypy --strict
	$(BIN)/ruff check sync tests main.py infra bench
	$(BIN)/ruff format --check sync tests main.py infra bench
	$(BIN)/mypy sync main.py

bench: install ## Benchmark: 1M profiles, engine and `cepsync run` end to end vs the previous main (x3), a 5M first sync; then Firestore state
	$(BIN)/python bench/bench_sync.py $(if $(QUICK),--quick) $(BENCH_ARGS)
	$(BIN)/python bench/bench_firestore.py $(if $(QUICK),--quick)

bench-10m: install ## 10M profiles on one machine: `cepsync run` first sync through continuations, no change, delta (~25 min)
	$(BIN)/python bench/bench_10m.py $(BENCH_ARGS)

bench-start: install ## Start-up: import time of the CLI and the function, and a run's time to its first line, vs d7cf1b1
	$(BIN)/python bench/bench_start.py

bench-warehouse: install bigquery-emulator ## Warehouse diff vs function diff on the local BigQuery emulator (rows leaving the warehouse)
	$(BIN)/python bench/bench_warehouse.py

campaign: install ## Fault campaign: 50 seeded scenarios x 20,000 rows (kills, overlaps, 429/5xx, drops, per-item errors), then a summary
	$(BIN)/python -m tests.support.fault_campaign $(CAMPAIGN_ARGS)

package: install ## Build dist/function-source.zip for Cloud Functions
	$(BIN)/python infra/package.py --out dist/function-source.zip

checkov: ## Static security scan of infra/ (own venv, pinned checkov)
	bash infra/checkov.sh

simulator: install ## Run the Batch simulator on :8787 (keys from BATCH_REST_API_KEY / BATCH_PROJECT_KEY)
	$(BIN)/cepsync simulator

clean: ## Remove build outputs and the demo's files (keeps the virtualenvs and the per-user sync state)
	rm -rf dist build .cepsync .pytest_cache .hypothesis .mypy_cache .ruff_cache bench/results
