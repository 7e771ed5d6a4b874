# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (if missing) and install the package with its platform and test extras into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stmi-installed
PYTEST_ARGS ?=

.PHONY: help install test test-fast demo up down status bench lint docs clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install stmi with its platform and test extras

test: $(STAMP)  ## set up, then run the whole test suite (CI runs exactly this)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only: no S3, MLflow or Ray server is started (markers integration, e2e skipped)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -m "not integration and not e2e and not slow" $(PYTEST_ARGS)

demo: $(STAMP)  ## set up, start the local stack, run the demo sweep through `ray job submit`, print a report
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m infra.local demo

up: $(STAMP)  ## start the local stack (S3, MLflow, Ray head) under .stmi/
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m infra.local up

down:  ## stop the local stack (harmless when it is not running)
	@if [ -x $(PY) ]; then PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m infra.local down; else echo "no .venv: nothing to stop"; fi

status:  ## health of the local stack
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m infra.local status

bench: $(STAMP)  ## run every benchmark (prints side-by-side ratios)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)  ## ruff over the repository
	$(PY) -m ruff check .

docs: $(STAMP)  ## regenerate docs/config.md (every config field) from stmi/config.py
	$(PY) -c "from stmi.config import fields_reference; print(fields_reference())" > docs/config.md

clean:  ## remove the venv and local state
	rm -rf $(VENV) .stmi
