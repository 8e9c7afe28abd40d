# Every target bootstraps what it needs, idempotently: a fresh machine needs only `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# The venv is rebuilt when the pins change.
VENV_STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
NODE_STAMP := node_modules/.installed-$(shell cat package.json package-lock.json | sha256sum | cut -c1-16)
# checkov (the infra/ scan) lives in its own venv: its pins clash with the app's.
INFRA_VENV  := .venv-infra
INFRA_STAMP := $(INFRA_VENV)/.installed-$(shell cat requirements-infra.txt | sha256sum | cut -c1-16)

.PHONY: all test lint lint-infra unit bench bench-scale demo clean venv node package

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

$(INFRA_STAMP): requirements-infra.txt
	@test -x $(INFRA_VENV)/bin/python || $(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-infra.txt
	@rm -f $(INFRA_VENV)/.installed-*
	@touch $@

venv: $(VENV_STAMP)
node: $(NODE_STAMP)

lint: $(VENV_STAMP) lint-infra
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every check on infra/ passes or is skipped in the template with its reason (checkov:skip=ID:why).
# --skip-download: no call to Prisma Cloud for guidelines (this machine has no internet).
lint-infra: $(INFRA_STAMP)
	$(INFRA_VENV)/bin/checkov --directory infra --framework bicep --skip-download --compact --quiet

# The deployment package as azd builds it (the project minus .funcignore).
package: $(VENV_STAMP)
	$(PY) -m devhost.package dist/app.zip

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
	rm -rf $(VENV) $(INFRA_VENV) dist node_modules .mypy_cache .ruff_cache .pytest_cache .twin
