# `make quickstart` trains the quick-start recipe on the embedded data; `make test` runs the tests.
# Each creates the virtual environment and installs polytrain first if that has not been done.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
READY := $(VENV)/.polytrain-installed

.PHONY: quickstart test install bench wheelhouse gpu-check clean

quickstart: $(READY)
	$(BIN)/polytrain train configs/quickstart.yaml

test: $(READY)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

install: $(READY)

bench: $(READY)
	$(BIN)/python bench/engine_overhead.py

# The wheels a lent GPU machine lacks, into .whl/ (see README, "Checking a GPU machine").
wheelhouse: $(READY)
	$(BIN)/python scripts/wheelhouse.py

# On the GPU machine, with .whl/ carried there: every GPU path in one command.
gpu-check:
	$(PYTHON) scripts/gpu_check.py

$(READY): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build runs .pytest_cache
