# `make quickstart` trains the quick-start recipe on the embedded data; `make test` runs the tests.
# Each creates the virtual environment and installs polytrain first if that has not been done.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
READY := $(VENV)/.polytrain-installed
OPS := $(VENV)/.deepspeed-ops-built

.PHONY: quickstart test install bench clean

quickstart: $(READY)
	$(BIN)/polytrain train configs/quickstart.yaml

test: $(OPS)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

install: $(READY)

bench: $(READY)
	$(BIN)/python bench/engine_overhead.py

$(READY): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# DeepSpeed JIT-builds its CPU ops (collectives, CPU Adam) on first use and caches them with torch's extensions.
# The doctor builds them once up front, with both cores free, rather than in the middle of the test runs.
$(OPS): $(READY)
	$(BIN)/polytrain doctor configs/tiny.yaml engine.offload_optimizer=true
	touch $@

clean:
	rm -rf $(VENV) build runs .pytest_cache
