# `make demo` and `make test` set everything up from nothing: a virtual environment in .venv
# with torch, the project and its extras. Override TORCH for another build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.crs-installed
PYTEST_ARGS ?=
# pytest-xdist workers, whole files to a worker (module fixtures start their servers once):
# most e2e time is spent waiting on servers the tests start, so two cores run two at a time.
PYTEST_WORKERS ?= auto
# The batcher's tests also run on Python 3.12 (its Task.cancel() cancels a future at once), in a
# small torch-free venv: the batcher needs no torch, and torch for 3.12 is a multi-GB download.
# The first candidate that runs (a pyenv shim named python3.12 may exist and refuse to).
PYTHON312 ?= $(shell for p in $$(command -v python3.12) $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python); \
	do "$$p" -c "" 2>/dev/null && echo "$$p" && break; done)
VENV312 ?= .venv312
STAMP312 := $(VENV312)/.crs-installed
# and the trainer's reward fetcher (an event loop thread of its own), torch-free as well.
ASYNC_TESTS := tests/unit/test_batcher.py tests/unit/test_batcher_faults.py \
	tests/unit/test_batcher_prefix.py tests/unit/test_ppo_fetcher.py

.PHONY: setup test lint typecheck pytest pytest312 demo clean redis-server test-deploy \
	test-deploy-build

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[server,client,train,dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup redis-server
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The tests start their own redis-server processes on free ports; install it when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis-server:
	@command -v redis-server >/dev/null || { command -v apt-get >/dev/null && \
		$(SUDO) apt-get install -y -q redis-server >/dev/null; } || { \
		echo "the tests need redis-server: apt-get install redis-server / brew install redis"; \
		exit 1; }

# Only what the batcher's tests import: tests/conftest.py brings trainer_client (httpx, pydantic).
$(STAMP312): pyproject.toml
	@[ -n "$(PYTHON312)" ] || { echo "Python 3.12 not found: install it (pyenv install 3.12)" \
		"or pass PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q "pytest>=8" "pytest-timeout>=2.3" \
		"hypothesis>=6.100" "httpx>=0.27" "pydantic>=2.7"
	touch $(STAMP312)

pytest312: $(STAMP312)
	PYTHONPATH=. $(VENV312)/bin/pytest $(ASYNC_TESTS) -p no:cacheprovider

test: lint typecheck pytest pytest312

demo: setup
	$(BIN)/crs-trainer demo

# The image built and docker-compose.yml run for real: podman, host network, a tiny CPU model
# (deploy/test-deploy.sh; as root on Debian, installing podman when missing). Minutes, not
# part of `make test`.
test-deploy: setup
	VENV_BIN=$(abspath $(BIN)) bash deploy/test-deploy.sh

# Only the images of test-deploy (cached by tag and layer for the next test-deploy).
test-deploy-build: setup
	VENV_BIN=$(abspath $(BIN)) bash deploy/test-deploy.sh build

clean:
	rm -rf $(VENV) $(VENV312) .crs .mypy_cache .ruff_cache .pytest_cache .hypothesis
