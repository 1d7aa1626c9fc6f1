# Two commands matter: `make demo` and `make test`. Both build the virtualenv first.
# Python 3.11 or newer; 3.11 preferred here because pgserver (the embedded PostgreSQL) ships
# wheels for it. The Lambda runtime is python3.13 and the layer code runs on both.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml layers/gc_core/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/session-gc demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy
	# Every handler is a module named app, so each is checked on its own.
	for handler in functions/*/app.py; do $(BIN)/mypy --strict "$$handler" || exit 1; done

unit: $(STAMP)
	bash scripts/install-tls-server.sh
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .venv-checkov .venv-sam .aws-sam .pytest_cache .mypy_cache .ruff_cache .hypothesis

# --- Tools with virtualenvs of their own ----------------------------------------------------
# checkov and aws-sam-cli pin many packages that would fight the dev dependencies, so each
# lives in its own virtualenv. Versions are pinned: a new release cannot change CI by itself
# (a new checkov release brings new checks); bumping the version reinstalls.
.PHONY: checkov sam-build

CHECKOV_VERSION ?= 3.3.30
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

# The '*' .gitignore (what python3.13's venv writes by itself) keeps git and ruff out of it.
$(CHECKOV_STAMP):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	echo '*' > $(CHECKOV_VENV)/.gitignore
	$(CHECKOV_VENV)/bin/pip install --quiet 'checkov==$(CHECKOV_VERSION)'
	touch $@

# Every finding is fixed in template.yaml or skipped there with its reason (Metadata: checkov).
# --skip-download: no call to the Prisma Cloud API (offline, and nothing to download for us).
checkov: $(CHECKOV_STAMP)
	$(CHECKOV_VENV)/bin/checkov -f template.yaml --framework cloudformation --compact --quiet \
		--skip-download

# tests/test_checkov.py runs checkov from its virtualenv, so the unit tests install it first.
unit: $(CHECKOV_STAMP)

SAM_CLI_VERSION ?= 1.170.0
SAM_VENV := .venv-sam
SAM_STAMP := $(SAM_VENV)/.installed-$(SAM_CLI_VERSION)
# sam build needs the functions' runtime (python3.13) on PATH; here it comes from pyenv.
SAM_PYENV_VERSION ?= 3.13.0

$(SAM_STAMP):
	$(PYTHON) -m venv $(SAM_VENV)
	echo '*' > $(SAM_VENV)/.gitignore
	$(SAM_VENV)/bin/pip install --quiet 'aws-sam-cli==$(SAM_CLI_VERSION)'
	touch $@

# Builds the bundle as a deployment would (no container: SAM fetches the manylinux aarch64
# wheels of the layer's compiled dependencies itself), then checks the result: the layer
# holds the core package, and each handler imports in a bare python3.13 from the build alone.
sam-build: $(SAM_STAMP) $(STAMP)
	PYENV_VERSION=$(SAM_PYENV_VERSION) SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION=eu-west-1 \
		$(SAM_VENV)/bin/sam build
	PYENV_VERSION=$(SAM_PYENV_VERSION) $(BIN)/python scripts/sam_build_check.py
