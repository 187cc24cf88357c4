# deepsqueeze: two commands from a fresh clone — `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline machines of this project keep the real datasets beside the repo; elsewhere the
# canonical mirrors serve (downloaded once into ~/.cache/deepsqueeze, checksums verified).
ifneq ($(wildcard ../shared/data),)
export DEEPSQUEEZE_DATA ?= $(abspath ../shared/data)
endif

.PHONY: demo test install dev lint bench fuzz fuzz-runtime clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch is installed first, pinned, so that the CPU build of this machine is used.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# The main job: train LeNet-300-100 on MNIST -> Deep Compression -> evaluate the .dsq file itself
# -> run it from the compressed form beside dense PyTorch and onnxruntime.
DEMO := runs/demo
demo: install
	$(VENV)/bin/deepsqueeze train --model lenet300 --dataset mnist --out $(DEMO)/lenet300 --seed 0 $(if $(wildcard $(DEMO)/lenet300/run.json),--resume,)
	$(VENV)/bin/deepsqueeze compress $(DEMO)/lenet300/model.pt --recipe recipes/deep-compression-lenet300.yaml --dataset mnist --out $(DEMO)/lenet300.dsq
	$(VENV)/bin/deepsqueeze evaluate $(DEMO)/lenet300.dsq --dataset mnist
	$(VENV)/bin/deepsqueeze bench $(DEMO)/lenet300.dsq --batch 1,256 --no-memory

test: dev
	$(PY) -m pytest -q

lint: dev
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/baselines.py
	$(PY) benchmarks/deep_compression.py
	$(PY) benchmarks/runtime.py --threads 1

# Coverage-guided fuzzing of the .dsq reader (docs/reliability.md). Needs atheris, which is not
# a dependency: `$(PY) -m pip install atheris`; without it the harness explains and skips.
FUZZ_RUNS ?= 20000
fuzz: install
	$(PY) benchmarks/fuzz_dsq.py -atheris_runs=$(FUZZ_RUNS)

# Differential fuzzing of the runtime (every executor vs the dense decoding, right and wrong
# inputs) with the C kernel under AddressSanitizer + UBSan; needs gcc's libasan/libubsan.
# Results: benchmarks/results/fuzz_runtime.json, docs/reliability.md.
FUZZ_RUNTIME_EXECUTIONS ?= 100000
fuzz-runtime: install
	$(PY) benchmarks/fuzz_runtime.py --executions $(FUZZ_RUNTIME_EXECUTIONS) --sanitize

clean:
	rm -rf runs .pytest_cache
