# KubeRLHF: every target sets up what it needs on a fresh machine, then runs.
#   make demo   - the tiny end-to-end pipeline on CPU (local backend)
#   make test   - the whole test suite (and ruff)
#   make bench  - the benchmarks in bench/, figures printed and written to bench/results/
#   make test-gpu  - the GPU suite (tests marked gpu) on one NVIDIA GPU
#   make bench-gpu - the GPU benchmarks (1.33B model) on one NVIDIA GPU
#                SETUP=none for both: use the python3 already there (a GPU machine whose
#                CUDA PyTorch and job requirements were installed by other means, offline)
#   make gpu-kit - the wheels a lent GPU machine lacks; one call there runs
#                tests/gpu/device_call.sh (the suite and a short bench, logs under $OUT)
#   make gpu-rehearsal - before that call, the GPU machine's library versions in a venv of
#                their own, running the unit tests and the GPU suite on this CPU
#   make images - the job image (docker or podman, whichever is here)
#   make images-local - the job image where no registry is reachable (CI): a debootstrapped
#                Debian base, podman with storage of its own under .containers/
#   make images-cuda-local - the CUDA image the same way (torch's CUDA wheel, DeepSpeed's ops
#                compiled with this machine's CUDA toolkit, CUDA_HOME), checked inside
#   make e2e-kind - the tiny pipeline on a kind cluster through `rlhf run --backend kubernetes`

# A python<v> that runs: on PATH, or one pyenv installed without selecting it (whose shim on
# PATH is found but fails).
find_python = $(firstword $(shell for p in python$(1) $$HOME/.pyenv/versions/$(1).*/bin/python$(1); do \
  $$p -c '' >/dev/null 2>&1 && command -v $$p && break; done))
# The first supported Python found (3.11 to 3.13); `make test PYTHON=<a python's path>` picks one.
PYTHON ?= $(firstword $(foreach v,3.11 3.12 3.13,$(call find_python,$(v))) python3)
# `make test` runs the suite again under each of these that the machine has and .venv does
# not use, each in a venv of its own (.venv-3.12; 3.12 is the CUDA images' Python): 3.11 and
# 3.12 together took 25 min 31 s from a fresh clone on 2 cores. PYTHONS= runs one.
PYTHONS ?= 3.12
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on CPU machines; a GPU machine sets e.g. TORCH_SPEC="torch==2.13.0" and
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
SETUP ?= venv
GPU_PYTHON := $(if $(filter none,$(SETUP)),python3,$(BIN)/python)
GPU_SETUP := $(if $(filter none,$(SETUP)),,setup)

VERSION := 0.1.0
IMAGE ?= kuberlhf:$(VERSION)
# A CUDA PyTorch image for GPU nodes; `make images BASE_IMAGE=python:3.11-slim
# TORCH_SPEC=torch==2.13.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` for CPU.
BASE_IMAGE ?= pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
TORCH_INDEX_URL ?=
IMAGE_TORCH_SPEC ?=
CONTAINER ?= $(shell command -v docker >/dev/null 2>&1 && echo docker || echo podman)

.PHONY: setup system-deps container-deps browser-deps demo test test-gpu lint bench bench-gpu gpu-kit gpu-rehearsal images \
	images-local images-cuda-local e2e e2e-kind clean

setup: system-deps $(STAMP)

# Debian packages: a C++ toolchain for DeepSpeed's JIT ops on GPU machines and for the
# packages pip builds from source (every target); podman, runc and debootstrap to build the
# job image and run stages from it (`make test`, `make images-local`).
system-deps:
	@if ! command -v g++ >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ make; \
	  else echo "install a C++ compiler (g++)"; exit 1; fi; \
	fi

container-deps:
	@missing=""; for tool in podman runc debootstrap; do \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing (apt)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq podman runc debootstrap >/dev/null; \
	  else echo "without$$missing (Debian, as root) the container tests are skipped"; fi; \
	fi

# Debian's Chromium, the real browser the report page is opened in by the tests.
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium (apt)"; \
	    apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "without chromium (Debian, as root) the report page test is skipped"; fi; \
	fi

# The versions the job image ships (images/requirements.txt: what the stages import)
# constrain the venv, so the suite tests what runs in the pods and a new release of those
# cannot change a fresh clone's results (the test and bench tools, trl among them, float);
# to move them: pip install -U in the venv, test, python images/lock.py.
# A venv ($(1)) with the python $(2)
define venv
	$(2) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	# torch first, so that the range in pyproject.toml installs nothing more
	$(1)/bin/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(1)/bin/pip install -q -c images/requirements.txt -e '.[test,bench]'
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml images/requirements.txt
	$(call venv,$(VENV),$(PYTHON))

# Another Python's venv, for `make test` (PYTHONS)
$(VENV)-%/.installed: pyproject.toml images/requirements.txt
	$(call venv,$(VENV)-$*,$(or $(call find_python,$*),$(error no python$* here)))

demo: setup
	$(BIN)/rlhf run examples/demo.yaml
	$(BIN)/rlhf report demo --store runs
	@echo
	@echo "Outputs, metrics and manifests are under runs/demo/. Again: 'make demo' (every stage is skipped)."

lint: setup
	$(BIN)/ruff check jobs pipeline tests bench images
	$(BIN)/ruff format --check jobs pipeline tests bench images

# The Pythons of PYTHONS this machine has, besides the one .venv uses
other_pythons = $(foreach v,$(filter-out $(shell $(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null),$(PYTHONS)),$(if $(call find_python,$(v)),$(v)))
# One worker per core; a module's tests stay on one worker, so its fixtures (the demo
# pipeline, the job image) are made once; the modules are handed out in the order
# tests/conftest.py gives them (the longest first), not by their number of tests.
SUITE := -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

test: setup container-deps browser-deps lint
	@# the image builds while the other Pythons' venvs install (downloads, mostly); MAKE_COMMAND,
	@# not MAKE, so that `make -n test` prints this line instead of running it
	@pids=; $(foreach v,$(other_pythons),$(MAKE_COMMAND) --no-print-directory $(VENV)-$(v)/.installed & \
	  pids="$$pids $$!";) \
	trap 'kill $$pids 2>/dev/null; exit 130' INT TERM; \
	echo "$(BIN)/python -m images.localbuild --if-possible"; \
	$(BIN)/python -m images.localbuild --if-possible || { kill $$pids 2>/dev/null; exit 1; }; \
	for pid in $$pids; do wait $$pid || exit 1; done
	$(BIN)/python $(SUITE)
	$(foreach v,$(other_pythons),$(VENV)-$(v)/bin/python $(SUITE) &&) true
	@$(foreach v,$(filter-out $(other_pythons),$(PYTHONS)),$(if $(call find_python,$(v)),,\
	  echo "no python$(v) here: the suite ran under one Python only";)) true

# CPU-only machines skip every gpu test with the reason; `make test` runs them skipped.
# GPU_WORKERS pytest-xdist workers (where it is installed) share the one GPU, tiny models a
# few hundred MiB each, a module each: the demo's (which makes the demo once) beside the
# supervised stages', the preference stages' and the rollouts'.
GPU_WORKERS ?= 4
GPU_XDIST = $$($(GPU_PYTHON) -c 'import xdist' 2>/dev/null && echo "-n $(GPU_WORKERS) --dist loadfile")
test-gpu: $(GPU_SETUP)
	$(GPU_PYTHON) -m pytest -q -rs -m gpu tests/gpu $(GPU_XDIST)

bench-gpu: $(GPU_SETUP)
	$(GPU_PYTHON) -m bench.gpu

# For a session lent a GPU machine: the wheels it lacks (the kit of ../shared/gpu/prepare.sh,
# with TensorBoard's writer, which every stage opens, the TRL reference's pandas and xxhash,
# and pytest-xdist for the suite's workers), without the S3 client's (the GPU suite runs on
# the local store), under the 64 MiB carry limit. Then one call: bash tests/gpu/device_call.sh
# (see there). The machine's transformers (5.17) is older than pyproject.toml's floor; the
# pinned 5.25 needs a huggingface-hub (2.x) and packages its image lacks, so the kit carries
# KIT_TRANSFORMERS, the floor, which its hub (1.33) serves.
# (prepare.sh lies beside the development checkout, not in it; GPU_PREPARE=... elsewhere.)
GPU_PREPARE ?= ../shared/gpu/prepare.sh
KIT_TRANSFORMERS ?= transformers==5.24.0
gpu-kit:
	EXTRA_WHEELS="tensorboard protobuf absl-py pandas xxhash pytest-xdist execnet $(KIT_TRANSFORMERS)" \
		bash $(GPU_PREPARE)
	rm -f .gpu-kit/whl/boto3-* .gpu-kit/whl/botocore-* .gpu-kit/whl/s3transfer-* \
		.gpu-kit/whl/jmespath-*
	du -sh .gpu-kit

# Before a GPU call, on this machine's CPU: the GPU machine's software (Python 3.12, torch
# 2.11, huggingface-hub 1.33 and tokenizers 0.23.2 as its image has them, transformers as
# the kit carries it) in a venv of its own, running the unit tests and the GPU suite
# (KUBERLHF_GPU_SUITE_ON_CPU): what the first GPU call would meet, bar the GPU. torch's
# wheel there is its CUDA build (some GB to download, once). images/requirements.txt's
# setuptools is left out of the constraints: torch 2.11 asks for an older one.
REHEARSAL_VENV ?= .venv-gpu-machine
GPU_MACHINE_PINS ?= torch==2.11.0 huggingface-hub==1.33.0 tokenizers==0.23.2 $(KIT_TRANSFORMERS)
gpu-rehearsal:
	@# the stamp holds the pins it was made with: other pins, another venv
	@if [ "$$(cat $(REHEARSAL_VENV)/.installed 2>/dev/null)" != "$(GPU_MACHINE_PINS)" ]; then \
	  py=$(call find_python,3.12); [ -n "$$py" ] || { echo "gpu-rehearsal needs python3.12"; exit 1; }; \
	  rm -rf $(REHEARSAL_VENV) && \
	  $$py -m venv $(REHEARSAL_VENV) && $(REHEARSAL_VENV)/bin/pip install -q --upgrade pip && \
	  names=$$(for pin in $(GPU_MACHINE_PINS) setuptools; do printf '%s|' "$${pin%%==*}"; done) && \
	  grep -viE "^($${names%|})==" images/requirements.txt > $(REHEARSAL_VENV)/constraints.txt && \
	  for pin in $(GPU_MACHINE_PINS); do echo "$$pin"; done >> $(REHEARSAL_VENV)/constraints.txt && \
	  $(REHEARSAL_VENV)/bin/pip install -q -c $(REHEARSAL_VENV)/constraints.txt torch && \
	  $(REHEARSAL_VENV)/bin/pip install -q -c $(REHEARSAL_VENV)/constraints.txt -e '.[test,bench]' && \
	  echo "$(GPU_MACHINE_PINS)" > $(REHEARSAL_VENV)/.installed || exit 1; \
	fi
	$(REHEARSAL_VENV)/bin/python -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'
	$(REHEARSAL_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider tests/unit
	KUBERLHF_GPU_SUITE_ON_CPU=1 $(REHEARSAL_VENV)/bin/python -m pytest -q -rs -m gpu tests/gpu \
	  -n 2 --dist loadfile -p no:cacheprovider

bench: setup
	$(BIN)/python -m bench.dedup
	$(BIN)/python -m bench.sft_throughput
	$(BIN)/python -m bench.reward_throughput
	$(BIN)/python -m bench.ppo_iteration
	$(BIN)/python -m bench.dpo_throughput

images:
	$(CONTAINER) build -f images/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg TORCH_SPEC=$(IMAGE_TORCH_SPEC) --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) \
	  --build-arg VERSION=$(VERSION) -t $(IMAGE) .

images-local: setup container-deps
	$(BIN)/python -m images.localbuild

images-cuda-local: setup container-deps
	$(BIN)/python -m images.localbuild --cuda

# Needs docker and kind (a developer's laptop); creates the cluster kuberlhf-e2e, builds a
# CPU image, loads it, installs MinIO and runs examples/demo-k8s.yaml. The same test module
# is skipped with the reason in `make test` where docker or kind is missing.
e2e-kind: setup
	KUBERLHF_E2E_KIND=1 $(BIN)/python -m pytest -v -rs tests/e2e

# The same tests on the cluster KUBECONFIG names (see tests/e2e/test_cluster.py for the
# variables: KUBERLHF_E2E_IMAGE, and S3).
e2e: setup
	$(BIN)/python -m pytest -v -rs tests/e2e

clean:
	rm -rf $(VENV) $(VENV)-3.* runs bench/results .pytest_cache .containers
