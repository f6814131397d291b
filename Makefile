# Set-up and entry points. `make demo` and `make test` create .venv when it is missing.
VENV ?= .venv
LATEST_VENV ?= .venv-latest
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fflayers-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install lock test-latest demo test lint bench clean

install: $(STAMP)

# The tested package set: every package pinned by requirements.lock (see scripts/install.sh).
$(STAMP): pyproject.toml constraints.txt requirements.lock scripts/install.sh
	bash scripts/install.sh $(VENV) locked
	touch $(STAMP)

# Regenerate requirements.lock from a fresh venv with the newest releases pyproject allows; then run
# `make clean test` to check the new set before committing it.
lock:
	rm -rf $(VENV)-lock
	bash scripts/install.sh $(VENV)-lock lock
	rm -rf $(VENV)-lock

# Drift check: the test suite on the newest releases pyproject allows (a separate venv, not the lock).
test-latest:
	rm -rf $(LATEST_VENV)
	bash scripts/install.sh $(LATEST_VENV) latest
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|fairseq-fixed|numpy|pandas|pyarrow|accelerate|gguf)=='
	$(LATEST_VENV)/bin/python -m ruff check fflayers analysis examples tests benchmarks
	$(LATEST_VENV)/bin/python -m pytest -q tests

demo: $(STAMP)
	$(PY) examples/demo/run_demo.py

test: $(STAMP)
	$(PY) -m ruff check fflayers analysis examples tests benchmarks
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check fflayers analysis examples tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/forward_overhead.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache build *.egg-info
