# Set-up and the two commands a user needs: `make run` and `make test`.
VENV   ?= .venv
PYTHON ?= python3.11
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Reinstall when the project's dependencies change. torch and torchvision install from this
# machine's disk; pip is capped there at 2.14.1 / 0.29.1 (see pyproject.toml).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

run: install  ## run the default pipeline as a Prefect flow and print the results
	tlflow run

# Two workers (pytest-xdist), one test module each at a time: module fixtures are built once,
# and one worker computes while the other waits on a subprocess or the Prefect server.
test: install  ## the whole suite (no network, no GPU; about 5 minutes on 2 cores)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install  ## the suite without the slow end-to-end and real-weights tests
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/extract.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
