# make demo: set up .venv and run the whole pipeline (dvc repro) on the bundled corpus.
# make test: set up .venv if missing and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv bench clean-venv

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

bench: venv
	$(BIN)/python benchmarks/featurize.py
	$(BIN)/python benchmarks/pretrain_throughput.py --quick

clean-venv:
	rm -rf $(VENV)
