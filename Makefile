# Every target a user needs; each depends on the virtual environment, so a fresh clone needs no manual step.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
DATA_DIR ?= ../shared/data
PROFILE ?= default
MODEL   ?=
VERSION ?= 1.0
WEIGHTS ?=
ARCH    ?=
STACK   ?= 0.12.0
SOAK_SECONDS ?= 180
# PyTorch's CPU-only wheels (no CUDA libraries: about 4 GB less in .venv), same pins: make install
# TORCH_INDEX=https://download.pytorch.org/whl/cpu. Not exercised on this project's machines, which cannot reach it.
TORCH_INDEX ?=
MAX_SLOPE ?=

.PHONY: help install bench-deps train train-cifar10 train-cifar10-v2 train-mnist evaluate reference export archive serve \
        certs kserve kserve-stacks kserve-stack-0.9.0 kserve-stack-0.12.0 kserve-pod stop status lint test test-unit soak bench device-check demo browser-deps clean

help:  ## list the targets
	@grep -E '^[a-z0-9.-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	touch $@

install: $(VENV)/.installed  ## create .venv from requirements.txt (exact pins; 3.0 GB download, 6 GB installed; TORCH_INDEX=)

$(VENV)/.bench-installed: $(VENV)/.installed benchmarks/requirements.txt
	$(PY) -m pip install --quiet -r benchmarks/requirements.txt
	touch $@

bench-deps: $(VENV)/.bench-installed  ## the benchmark's peers (Flask, gunicorn, LitServe) and wrk (Debian's, when missing)
	@command -v wrk >/dev/null || { command -v apt-get >/dev/null && \
		{ apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk); } \
		|| echo "wrk is not installed and could not be installed: the benchmark smoke test will skip"; }

browser-deps:  ## headless Chromium and chromedriver for the demo page's browser test (Debian's, when missing)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { command -v apt-get >/dev/null && \
		{ apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver); } \
		|| echo "chromium is not installed and could not be installed: the demo page's browser test will skip"; }

# Data comes from DATA_DIR when it holds the npz files, otherwise torchvision downloads it into data/.
data_args = $(if $(wildcard $(DATA_DIR)/$(1)_train.npz),--data-source npz --data-path $(DATA_DIR)/$(1)_train.npz,--data-source torchvision --data-path data)

train: train-cifar10 train-mnist  ## retrain the 1.0 networks (writes models/weights/); 2.0: make train-cifar10-v2

train-cifar10: install  ## retrain the cifar10 LeNet (about 5 minutes on 2 cores)
	$(PY) -m training.train --arch lenet $(call data_args,cifar10) --out models/weights/cifar10_lenet.pt

train-cifar10-v2: install  ## train cifar10 2.0, the airbench network (about 50 minutes on 2 cores)
	$(PY) -m training.train --arch airbench $(call data_args,cifar10) --out models/weights/cifar10_airbench.pt

train-mnist: install  ## retrain the MNIST ConvNet (about 6-8 minutes on 2 cores)
	$(PY) -m training.train --arch convnet $(call data_args,mnist) --out models/weights/mnist_convnet.pt

evaluate: install  ## accuracy, confusion matrix, calibration (T into the cards) and plots for the shipped weights
	$(PY) -m training.evaluate --weights models/weights/cifar10_lenet.pt $(call data_args,cifar10)
	$(PY) -m training.evaluate --weights models/weights/cifar10_airbench.pt $(call data_args,cifar10)
	$(PY) -m training.evaluate --weights models/weights/mnist_convnet.pt $(call data_args,mnist)

reference: install  ## reference and int8 calibration images, fp32's top-1, ONNX Runtime modes measured (models/weights/)
	$(PY) -m training.reference --dataset cifar10 $(call data_args,cifar10)
	$(PY) -m training.reference --dataset mnist $(call data_args,mnist)
	$(PY) -m serving.archive --record-fp32
	$(PY) -m serving.quantize --record

export: install  ## TorchScript and ONNX exports of the shipped weights into exports/, checked against eager
	$(PY) -m training.export --weights models/weights/cifar10_lenet.pt models/weights/cifar10_airbench.pt \
		models/weights/mnist_convnet.pt

archive: install  ## build model_store/*.mar (or one: MODEL=cifar10 VERSION=2.0 WEIGHTS=... [ARCH=...])
	$(PY) -m serving.archive $(if $(MODEL),--model $(MODEL) --version $(VERSION)) \
		$(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(ARCH),--arch $(ARCH))

serve: install  ## start TorchServe in the background and wait for READY workers (PROFILE=prod for tokens)
	$(PY) -m serving.server start --profile $(PROFILE)

kserve: install  ## KServe storage layouts from config.prod.properties into build/ (deploy/kserve/ names them)
	$(PY) -m serving.kserve --out build/kserve $(if $(TOKEN_AUTH),--token-auth)
	$(PY) -m serving.kserve --out build/kserve-cifar10 --model cifar10 $(if $(TOKEN_AUTH),--token-auth)
	$(PY) -m serving.kserve --out build/kserve-cifar10-canary --model cifar10 --default cifar10=2.0 \
		$(if $(TOKEN_AUTH),--token-auth)
	$(PY) -m serving.kserve --out build/kserve-mnist --model mnist $(if $(TOKEN_AUTH),--token-auth)
	$(PY) -m serving.kserve --out build/docker --host 0.0.0.0 $(if $(TOKEN_AUTH),--token-auth)

# The KServe runtime images' interpreter stacks (deploy/kserve/stacks/), each a venv on pyenv's Python 3.9: the
# suite runs the archives, TorchServe and the image's kserve_wrapper in them (tests/integration/test_kserve_pod.py).
PYTHON39 ?= $(shell pyenv root 2>/dev/null)/versions/3.9.18/bin/python
.venv-kfs-%/.installed: deploy/kserve/stacks/torchserve-kfs-%.txt
	@test -x "$(PYTHON39)" || { echo "Python 3.9 not found at $(PYTHON39) (pyenv install 3.9.18, or PYTHON39=...)"; exit 1; }
	rm -rf .venv-kfs-$*
	$(PYTHON39) -m venv .venv-kfs-$*
	.venv-kfs-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-kfs-$*/bin/python -m pip install --quiet -r $<
	touch $@

kserve-stack-0.9.0: .venv-kfs-0.9.0/.installed  ## the stock KServe image's stack: Python 3.9, torch 2.1.0, TorchServe 0.9.0, kserve 0.11.2
kserve-stack-0.12.0: .venv-kfs-0.12.0/.installed  ## torchserve-kfs:0.12.0's stack: Python 3.9, torch 2.4.0, TorchServe 0.12.0, kserve 0.13.0
kserve-stacks: kserve-stack-0.9.0 kserve-stack-0.12.0  ## both (about 2-3 minutes and 5.5 GB each)

kserve-pod: kserve kserve-stack-$(STACK)  ## run build/kserve as KServe's pod would: TorchServe + the image's KServe server on 8080 (STACK=0.12.0)
	$(PY) -m serving.kserve_pod --stack $(STACK) $(if $(PROTOCOL),--protocol $(PROTOCOL))

certs: install  ## a self-signed TLS pair in certs/ for the prod profile (make serve PROFILE=prod)
	$(PY) -m serving.certs

stop: install  ## stop TorchServe and wait until java has exited
	$(PY) -m serving.server stop

status: install  ## models, versions and workers of the running server
	$(PY) -m serving.server status

lint: install  ## ruff (pinned; rules in pyproject.toml): pyflakes, pycodestyle errors, import order, bugbear
	$(VENV)/bin/ruff check .

test: install bench-deps browser-deps kserve-stacks lint  ## lint, then the whole suite: unit, training and integration tests against a real TorchServe
	$(PY) -m pytest

test-unit: install  ## everything that needs no server
	$(PY) -m pytest -m "not integration"

soak: install  ## 32 connections of good and bad requests against the running server, every process's memory sampled (SOAK_SECONDS=180; MAX_SLOPE=MiB/h fails faster growth)
	$(PY) -m benchmarks.soak --duration $(SOAK_SECONDS) --connections 32 $(if $(MAX_SLOPE),--max-slope $(MAX_SLOPE))

bench: install bench-deps  ## TorchServe vs its in-process ceiling and Flask, gunicorn, LitServe (writes benchmarks/results/)
	$(PY) -m benchmarks.run

device-check: install  ## the handlers on a GPU against the CPU: top-1, explanations, img/s (needs make archive, a GPU)
	$(PY) -m benchmarks.device_check --device cuda --out benchmarks/results/device-check.json

demo: install  ## the demo page on the origin config.properties admits (cors_allowed_origin); needs make serve
	$(PY) -m client.demo

clean:  ## remove built archives, logs and checkpoints (keeps .venv and the shipped weights)
	rm -rf model_store/*.mar model_store/*.sha256 logs checkpoints exports build  # keeps .venv-kfs-* too
