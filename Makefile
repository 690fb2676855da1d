# make demo: set up .venv and run the whole pipeline (dvc repro) on the bundled corpus.
# make test: set up .venv if missing, install the Debian packages the browser test needs if they
#            are missing (system-deps; apt-get, as root or through sudo), lint (ruff format --check, ruff check), and run the suite.
# make lint / lint-fix: ruff's formatter check and lint (pyproject.toml [tool.ruff]) / apply the format and its fixes.
# make test-fast: the unit tests only (not the `slow` end-to-end and benchmark tests), for the edit loop.
# make lock: re-resolve pyproject.toml's dependencies to their newest releases and rewrite
#            requirements.lock (exact pins with hashes), which .venv installs from.
#            `make lock LOCK_UPGRADE=` keeps the current pins and resolves only what pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo study test test-fast lint lint-fix venv lock system-deps bench clean-venv

# tests/test_mlflow_ui.py drives headless Chromium through chromedriver (Debian chromium, chromium-driver).
SYSTEM_BINS := /usr/bin/chromium /usr/bin/chromedriver
MISSING_BINS := $(filter-out $(wildcard $(SYSTEM_BINS)),$(SYSTEM_BINS))
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# the multi-speaker study (README): needs the corpora in data/external/; about 1.5 h on 2 CPU cores
study: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro studies/multispeaker/dvc.yaml

# Two workers, one per core (measured from fresh clones: 706 s with 2, 954 s with 3;
# every test process and command runs on one torch thread, tests/conftest.py).
test: venv system-deps lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow"

# Format check and lint (pyflakes, pycodestyle, import order; pyproject.toml [tool.ruff]) before the suite runs.
lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

lint-fix: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

venv: $(VENV)/.installed

# The dependencies come from the lock, hash-checked, so every clone gets the builds dvc.lock was
# made with; the project itself goes on top without resolving anything.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# uv is only the locking tool: it lives in .venv but is not one of the project's dependencies.
LOCK_UPGRADE ?= --upgrade
lock: venv
	$(BIN)/python -m pip install --quiet 'uv>=0.5'
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		--custom-compile-command "make lock" --quiet $(LOCK_UPGRADE) -o requirements.lock

system-deps:
ifneq ($(MISSING_BINS),)
	@echo "missing $(MISSING_BINS): installing the Debian packages chromium and chromium-driver"
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver
endif

bench: venv
	$(BIN)/python benchmarks/featurize.py
	$(BIN)/python benchmarks/pretrain_throughput.py --quick

clean-venv:
	rm -rf $(VENV)
