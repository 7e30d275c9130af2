# `make demo` and `make test` set everything up from nothing: a virtual environment in .venv
# with torch, the project and its extras. Override TORCH for another build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.crs-installed
PYTEST_ARGS ?=

.PHONY: setup test lint typecheck pytest demo clean redis-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[server,client,dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup redis-server
	$(BIN)/pytest $(PYTEST_ARGS)

# The tests start their own redis-server processes on free ports; install it when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis-server:
	@command -v redis-server >/dev/null || { command -v apt-get >/dev/null && \
		$(SUDO) apt-get install -y -q redis-server >/dev/null; } || { \
		echo "the tests need redis-server: apt-get install redis-server / brew install redis"; \
		exit 1; }

test: lint typecheck pytest

demo: setup
	$(BIN)/crs-trainer demo

clean:
	rm -rf $(VENV) .crs .mypy_cache .ruff_cache .pytest_cache .hypothesis
