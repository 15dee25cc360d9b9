# Tickwise entry points. `make demo` and `make test` work from nothing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: screenshots install system-deps test test-fast lint fuzz up down status demo bench chaos clean

install: system-deps $(STAMP)

system-deps:
	@bash deploy/local/ensure_system_deps.sh

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "tickwise: installing $$(grep -c '==' requirements.lock) pinned Python packages into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install --disable-pip-version-check --progress-bar on -r requirements.lock
	@touch $(STAMP)

test: install
	$(PY) -m pytest tests -q

screenshots: install
	TICKWISE_SCREENSHOTS=$(CURDIR)/docs/screenshots $(PY) -m pytest tests/e2e/test_dashboard.py -q -k story

lint: install
	$(PY) -m ruff check .

fuzz: install
	TICKWISE_FUZZ_EXAMPLES=2000 $(PY) -m pytest tests/integration/test_api_fuzz.py -q

up: install
	@$(PY) -m deploy.local up

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local down; else echo "tickwise: nothing to stop"; fi

status:
	@$(PY) -m deploy.local status

demo: install
	$(PY) -m deploy.demo

bench: install
	$(PY) -m bench

# A seeded chaos campaign against a private stack: make chaos SEED=3 MINUTES=20
chaos: install
	$(PY) -m tests.fault.chaos --seed $(or $(SEED),1) --minutes $(or $(MINUTES),10)

clean:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local clean; fi
	rm -rf .run
