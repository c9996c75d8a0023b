# Two commands on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= models/default
PORT ?= 3000
# Only this machine can reach `make serve` unless HOST says otherwise (HOST=0.0.0.0 for every interface).
HOST ?= 127.0.0.1

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to 2.13.0: this machine takes its local CPU wheel; a GPU machine can install a
# CUDA build of the same version first (pip install torch==2.13.0 --index-url <CUDA index>).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

# What the tests need on top (pytest, hypothesis, playwright, the independent EfficientNet, ruff):
# only `make test` installs it, so `make serve` does not.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(MAKE) --no-print-directory build/kserve-sdk
	touch $@ $(VENV)/.installed

# KServe's API models (and the Kubernetes client's) for validating deploy/kserve.yaml offline: only
# the generated models are used, so the SDKs go into a folder of their own, without their servers.
build/kserve-sdk:
	$(BIN)/pip install -q --no-deps --target $@ kserve==0.21.0 kubernetes==37.0.3 six==1.17.0 python-dateutil==2.9.0.post0

# deploy/*.yaml against Kubernetes' and KServe's own schemas (no cluster runs here).
validate-deploy: install-test
	$(BIN)/python tools/validate_deploy.py

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The demo model, in BentoML's model store as extendserve-default (and as files in $(MODEL_DIR)),
# built when the store does not hold it yet.
model: install
	@$(BIN)/bentoml models get extendserve-default:latest >/dev/null 2>&1 || \
		$(BIN)/extendserve demo -o $(MODEL_DIR) --name default

serve: install model
	$(BIN)/bentoml serve --host $(HOST) --port $(PORT)

# Chromium for the /ui browser test (Debian's package; the test skips without it).
prometheus:  # a real Prometheus and promtool for tests/serving/test_prometheus.py (Debian's package)
	@command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		prometheus >/dev/null) || echo "prometheus not installed: its tests will skip"

browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the browser test will skip"

test: install-test
	$(BIN)/python -m pytest -q

# The suite on fresh clones, 5 times idle and 3 times with every core busy (IDLE=, BUSY= change the
# counts): zero failures is the bar. Not in CI's default path (8 suites' time).
test-repeat:
	tools/test_repeat.sh

# Speed: each script prints its table and rewrites its section of docs/benchmarks.md.
bench: install model
	$(BIN)/python bench/serving/model_bench.py
	$(BIN)/python bench/serving/pipeline_bench.py
	$(BIN)/python bench/serving/http_bench.py
	$(BIN)/python bench/training/train_build_bench.py
	$(BIN)/python bench/serving/fairness.py

# 1500 requests, 48 at once, bad inputs mixed in; exits non-zero on any failure or memory growth.
burst: install model
	$(BIN)/python bench/serving/burst.py

# The calibration table of README.md (needs ../shared/data; about 3 minutes).
bench-calibration: install
	$(BIN)/python bench/heads/calibration.py

# The "new classes that know the world" table of README.md (needs ../shared/data; about 30 minutes).
bench-world: install
	$(BIN)/python bench/heads/world_splits.py --splits 8

# The --unfreeze-top K table of README.md (needs ../shared/data; about 4 minutes).
bench-unfreeze: install
	$(BIN)/python bench/training/unfreeze_bench.py

# The service as a container image (docker, else podman), holding MODEL (default the demo's, built
# first if the store lacks it): extendserve:cpu from bentofile.cpu.yaml, extendserve:gpu from bentofile.yaml.
MODEL ?= extendserve-default:latest
# MODEL and BIN reach the script through the environment, never spliced into the recipe's shell line
# (MODEL='x; cmd #' once ran cmd); the script refuses a MODEL that is not a store tag.
image: export MODEL := $(MODEL)
image: export BIN := $(BIN)
image: install model image-deps
	tools/image.sh cpu

image-gpu: export MODEL := $(MODEL)
image-gpu: export BIN := $(BIN)
image-gpu: install model image-deps
	tools/image.sh gpu

# podman, runc and debootstrap from Debian's packages, where there is no Docker engine.
image-deps:
	@(command -v docker >/dev/null && docker info >/dev/null 2>&1) || \
		(command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null) || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null)

# The image's own check (CI runs it after make test): builds extendserve:cpu, runs it read-only as a
# non-root user, classifies over /classify and the Open Inference Protocol, drains on SIGTERM.
test-image: image install-test
	$(BIN)/python -m pytest -q tests/serving/image_check.py

.PHONY: prometheus test-repeat validate-deploy image image-gpu image-deps test-image install install-test model serve test bench burst bench-calibration bench-unfreeze bench-world browser
