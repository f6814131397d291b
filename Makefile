# Set-up and entry points. `make demo` and `make test` create .venv when it is missing.
VENV ?= .venv
LATEST_VENV ?= .venv-latest
HF_VENV ?= .venv-hf
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fflayers-installed
HF_STAMP := $(HF_VENV)/.fflayers-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install install-hf lock test-latest test-hf demo docs test lint bench clean

install: $(STAMP)

# The tested package set: every package pinned by requirements.lock (see scripts/install.sh).
$(STAMP): pyproject.toml constraints.txt requirements.lock scripts/install.sh
	bash scripts/install.sh $(VENV) locked
	touch $(STAMP)

# The HuggingFace-only install (no fairseq, numpy 2): `pip install fflayers` plus the test tools, pinned by
# requirements-hf.lock.
install-hf: $(HF_STAMP)

$(HF_STAMP): pyproject.toml constraints.txt requirements-hf.lock scripts/install.sh
	bash scripts/install.sh $(HF_VENV) locked hf
	touch $(HF_STAMP)

# Regenerate both locks from fresh venvs with the newest releases pyproject allows; then run
# `make clean test test-hf` to check the new sets before committing them.
lock:
	rm -rf $(VENV)-lock
	bash scripts/install.sh $(VENV)-lock lock full
	rm -rf $(VENV)-lock
	bash scripts/install.sh $(VENV)-lock lock hf
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

# The test suite in the HuggingFace-only install: the fairseq tests skip, naming the extra.
test-hf: $(HF_STAMP)
	$(HF_VENV)/bin/python -m pytest -q tests

# The docs site into site/ (mkdocs, material theme, API pages from the docstrings); fails on a broken link.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(PY) -m ruff check fflayers analysis examples tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/forward_overhead.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(HF_VENV) .pytest_cache build dist site *.egg-info
