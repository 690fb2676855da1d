# make demo: set up .venv and run the whole pipeline (dvc repro) on the bundled corpus.
# make test: set up .venv if missing, install the Debian packages the browser test needs if they
#            are missing (system-deps; apt-get, as root or through sudo), and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv system-deps bench clean-venv

# tests/test_mlflow_ui.py drives headless Chromium through chromedriver (Debian chromium, chromium-driver).
SYSTEM_BINS := /usr/bin/chromium /usr/bin/chromedriver
MISSING_BINS := $(filter-out $(wildcard $(SYSTEM_BINS)),$(SYSTEM_BINS))
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: venv system-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadfile

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

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
