# Tickwise entry points. `make demo` and `make test` work from nothing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps test test-fast lint fuzz up down status demo bench clean

install: system-deps $(STAMP)

system-deps:
	@bash deploy/local/ensure_system_deps.sh

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "tickwise: installing pinned Python dependencies into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	@touch $(STAMP)

test: install
	$(PY) -m pytest tests -q

lint: install
	$(PY) -m ruff check .

fuzz: install
	TICKWISE_FUZZ_EXAMPLES=2000 $(PY) -m pytest tests/integration/test_api_fuzz.py -q

up: install
	$(PY) -m deploy.local up

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local down; else echo "tickwise: nothing to stop"; fi

status:
	$(PY) -m deploy.local status

demo: install
	$(PY) -m deploy.demo

bench: install
	$(PY) -m bench

clean: down
	rm -rf .run
