# Every target bootstraps what it needs, idempotently: a fresh machine needs only `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# The venv is rebuilt when the pins change.
VENV_STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
NODE_STAMP := node_modules/.installed-$(shell cat package.json package-lock.json | sha256sum | cut -c1-16)

.PHONY: all test lint unit bench bench-scale demo clean venv node

all: test

$(VENV_STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@rm -f node_modules/.installed-*
	@touch $@

venv: $(VENV_STAMP)
node: $(NODE_STAMP)

lint: $(VENV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint $(NODE_STAMP)
	$(PY) -m pytest

bench: $(VENV_STAMP)
	$(PY) -m bench

# The scale benchmark at N = 100 and 1,000 (spread and single-subscription): about 20 minutes.
bench-scale: $(VENV_STAMP)
	$(PY) -m bench scale --full

demo: $(VENV_STAMP) $(NODE_STAMP)
	$(PY) -m devhost.demo

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .twin
