# Set-up and the two commands a user needs: `make run` and `make test`.
VENV   ?= .venv
PYTHON ?= python3.11
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-fast accuracy package lint bench faults clean

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
# The kill-and-resume and interrupt tests (marked faults) run with the fault suite: `make
# faults`; the accuracy claims (marked accuracy: the probe on hymenoptera, bf16 against fp32 on it and on
# the digits, the zoo, the export, abstain and drift) with `make accuracy`; the wheel in a
# fresh venv (marked package) with `make package`; CI runs all four.
test: install  ## the suite (no network, no GPU; about 6 minutes on 2 cores)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not faults and not accuracy and not package"

test-fast: install  ## the suite without the slow end-to-end and real-weights tests
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow and not faults and not accuracy and not package"

accuracy: install  ## the accuracy claims on real images, each precision (a few minutes)
	$(BIN)/python -m pytest -q -n 2 --dist load -m accuracy

package: install  ## the wheel in a fresh venv, used as a new user would (about 1 minute)
	$(BIN)/python -m pytest -q -p no:xdist -m package tests/test_wheel.py

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/extract.py

# Refused inputs, SIGKILLs at seeded random moments, a kill between a model pair's files,
# flipped bytes, bad paths, a full disk (tmpfs, where mounting one is allowed), a killed
# `tlflow run` leaving no process: bench/faults.py on a tiny colour project.
faults: install  ## the fault suite and the kill-and-resume tests (about 5 minutes on 2 cores)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m faults
	$(BIN)/python bench/faults.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
