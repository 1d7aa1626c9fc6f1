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
	rm -rf $(VENV) .aws-sam .pytest_cache .mypy_cache .ruff_cache .hypothesis
