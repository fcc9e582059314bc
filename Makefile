# selfflow — one command per task; each installs what it needs first (make setup).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.selfflow-setup
PACKAGES := core text image video audio robotics eval
PYPROJECTS := $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
TORCH_STACK := torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
DEV_TOOLS := pytest pytest-timeout ruff scipy torch-fidelity==0.4.0
NPROC ?= 1
CONFIG ?=
ARGS ?=
export HF_HUB_OFFLINE := 1

.PHONY: help setup test lint train-image train-mixed train-video train-audio finetune-rt1 eval-simpler eval bench bench-quality clean-venv fault-test golden gpu-wheels gpu-venv gpu-check gpu-check-cuda test-gpu-stack

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv with the pinned torch stack and all packages (editable)

# Re-run when any pyproject or this Makefile changes; the stamp makes it idempotent.
# A new venv takes ~6.5 GB (PyPI's torch 2.14.1 is the CUDA build, with its CUDA libraries): say so up front
# rather than as pip's "No space left on device" halfway through (SETUP_MIN_FREE_GB=0 skips the check).
SETUP_MIN_FREE_GB ?= 7
$(STAMP): $(PYPROJECTS) Makefile
	@test -x $(PY) || { free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt $(SETUP_MIN_FREE_GB) ]; then \
	    echo "make setup: $$free GB free on $$(df -P . | awk 'NR == 2 {print $$6}'), the venv needs about 7 GB (torch's CUDA build); free some space, or SETUP_MIN_FREE_GB=0 to try anyway" >&2; exit 1; fi; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools<85" wheel
	$(PY) -m pip install --quiet $(TORCH_STACK)
	$(PY) -m pip install --quiet --config-settings editable_mode=compat $(foreach p,$(PACKAGES),-e ./$(p)) $(TORCH_STACK)
	$(PY) -m pip install --quiet $(DEV_TOOLS)
	@touch $(STAMP)

test: setup  ## lint + the whole test suite (~13–23 min on 2 quiet cores)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q $(ARGS)

lint: setup  ## ruff only
	$(VENV)/bin/ruff check .

# Launch through torchrun when NPROC > 1, else as a plain process.
LAUNCH = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m selfflow.core.cli,$(VENV)/bin/selfflow)

train-image: setup  ## train the tiny Self-Flow model on synthetic shapes (CPU, < 10 min)
	$(LAUNCH) train --config $(or $(CONFIG),configs/tiny/image.yaml) $(ARGS)

train-mixed: setup  ## the main job: tiny text-conditioned model on synthetic image + video + audio together (CPU, ~6 min)
	$(LAUNCH) train --config $(or $(CONFIG),configs/tiny/mixed.yaml) $(ARGS)

train-video: setup  ## train the tiny model on synthetic moving shapes, writes MP4/GIF samples (CPU)
	$(LAUNCH) train --config $(or $(CONFIG),configs/tiny/video.yaml) $(ARGS)

train-audio: setup  ## train the tiny caption-conditioned model on synthetic chords, writes WAV (CPU)
	$(LAUNCH) train --config $(or $(CONFIG),configs/tiny/audio.yaml) $(ARGS)

finetune-rt1: setup  ## tiny joint video–action model on generated fake RT-1 TFRecords (CPU, minutes)
	$(LAUNCH) train --config $(or $(CONFIG),configs/tiny/rt1.yaml) $(ARGS)

eval-simpler: setup  ## rollouts of runs/tiny-rt1 on the FAKE SIMPLER stand-in (labelled env: fake)
	$(VENV)/bin/selfflow simpler --run $(or $(RUN),runs/tiny-rt1) --env fake --limit $(or $(LIMIT),4) \
		--device cpu --out $(or $(OUT),runs/simpler-eval-fake) $(ARGS)

eval: setup  ## probe-FD / accuracy of a run on synthetic shapes (RUN=runs/tiny-image)
	$(VENV)/bin/selfflow eval probe --run $(or $(RUN),runs/tiny-image) $(ARGS)

bench: setup  ## speed benchmarks: a table and bench.json (~9–11 min on 2 quiet cores)
	$(PY) benchmarks/run.py $(ARGS)

bench-quality: setup  ## flow matching vs Self-Flow on digits, 5 paired seeds: CIs, linear probes, speed-ups (CPU, 54–65 min; REPA: ARGS="--methods flow_matching repa self_flow"; ARGS=--quick ~10 min, a pipeline check too short to compare the methods)
	$(PY) benchmarks/quality.py $(ARGS)

fault-test: setup  ## fault-injection suite (kills, corrupt data, config fuzzing …): writes docs/RELIABILITY.md (~11 min)
	OMP_NUM_THREADS=1 $(PY) reliability/run.py $(ARGS)

golden: setup  ## the golden run: fixed-seed 30-step image/mixed/rt1 trainings, bitwise against reliability/golden_run.json
	$(PY) reliability/golden_run.py $(or $(ACTION),check) $(ARGS)

# The GPU machines have Python 3.12 with their own CUDA torch and no network: fetch our other dependencies here.
# By default only what `make gpu-check` needs besides what the H200 image already holds (torch, numpy, pyyaml,
# tqdm, pillow, matplotlib, tensorboard, safetensors: docs/BENCHMARKS.md "GPU check"): pydantic, einops, pytest,
# setuptools to install our packages, and webdataset (+ braceexpand, fetched without its numpy) for the trainer
# that `selfflow train` on the GPU runs — a few MB, so gpu-wheels/ fits the device tool's 64 MiB carry.
# GPU_EXTRAS=1 adds every other dependency of our seven packages (av, decord, transformers, diffusers …), to train
# there on real data too; far over 64 MiB.
GPU_WHEELS := gpu-wheels
GPU_VENV := .venv-gpu
GPU_TESTS_TIMEOUT_S ?= 180
GPU_EXTRAS ?=
GPU_CHECK_REQS := "pydantic>=2.5" "einops>=0.7" pytest "setuptools>=68,<85" wheel
GPU_CHECK_NODEPS := "webdataset>=0.2.100" braceexpand
GPU_EXTRA_REQS := "numpy>=1.24" "pyyaml>=6" "tqdm>=4.60" "tensorboard>=2.14" "matplotlib>=3.7" "pillow>=10" \
	"safetensors>=0.4" "webdataset>=0.2.100" "transformers>=4.45" "diffusers>=0.35" "av>=12" "decord>=0.6" \
	"soundfile>=0.12" "tfrecord>=1.14" "scikit-learn>=1.3" pytest-timeout
GPU_REQS := $(GPU_CHECK_REQS) $(if $(GPU_EXTRAS),$(GPU_EXTRA_REQS))
GPU_PACKAGES := $(if $(GPU_EXTRAS),$(PACKAGES),core text image)

gpu-wheels:  ## download the non-torch wheels for a CUDA machine (Python 3.12, manylinux x86_64) into a fresh gpu-wheels/
	rm -rf $(GPU_WHEELS)
	$(PY) -m pip download --quiet --dest $(GPU_WHEELS) --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any $(GPU_REQS)
	$(PY) -m pip download --quiet --dest $(GPU_WHEELS) --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform any $(GPU_CHECK_NODEPS)
	@du -sh $(GPU_WHEELS)

gpu-check:  ## on a CUDA machine, offline: install beside its torch, run the cuda tests and the speed table (<= 8 min; ~5 on an H200)
	@if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(MAKE) --no-print-directory gpu-check-cuda; \
	else echo "gpu-check: $(PYTHON) has no CUDA GPU (or no torch) on this machine: nothing to check"; fi

# The venv sees the machine's packages: --system-site-packages, plus a .pth of site.addsitedir lines when
# $(PYTHON) is itself a venv (the device machines' /opt/torch/.venv), whose packages that flag does not reach.
# It is made without pip (ensurepip may be missing there): the machine's pip runs in it and installs into it.
gpu-venv:  ## (on a CUDA machine) the venv beside the machine's torch that gpu-check runs in, from gpu-wheels/
	@test -d $(GPU_WHEELS) || { echo "gpu-check: no $(GPU_WHEELS)/ (run make gpu-wheels where PyPI is reachable)"; exit 2; }
	test -x $(GPU_VENV)/bin/python || { $(PYTHON) -m venv --system-site-packages --without-pip $(GPU_VENV) && \
		$(PYTHON) -c "import site, sys; sys.prefix == sys.base_prefix or open(sys.argv[1], 'w').write(''.join( \
		'import site; site.addsitedir(%r)\n' % d for d in site.getsitepackages()))" \
		"$$($(GPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/machine-site.pth"; }
	$(GPU_VENV)/bin/python -m pip --version >/dev/null 2>&1 || $(GPU_VENV)/bin/python -m ensurepip --default-pip
	$(GPU_VENV)/bin/python -m pip install --quiet --no-index --find-links $(GPU_WHEELS) $(GPU_REQS) $(GPU_CHECK_NODEPS)
	$(GPU_VENV)/bin/python -m pip install --quiet --no-index --no-deps --no-build-isolation \
		--config-settings editable_mode=compat $(foreach p,$(GPU_PACKAGES),-e ./$(p))
	$(GPU_VENV)/bin/python -c "import sys, torch; assert not torch.__file__.startswith(sys.prefix + '/'), 'torch in $(GPU_VENV)'; \
		print('torch', torch.__version__, 'from', torch.__file__, 'cuda', torch.cuda.is_available())"

gpu-check-cuda: gpu-venv
	@command -v cc >/dev/null || command -v gcc >/dev/null || echo "gpu-check: no C compiler (cc, gcc) here:" \
		"Triton builds torch.compile's kernels with one, so the compiled tests and rows will fail"
	@# the speed table runs even when a cuda test fails or hangs (one lent GPU run must bring back both: a hung NCCL
	@# init must not spend the whole call); either fails the target
	rc=0; limit=$$(command -v timeout >/dev/null && echo "timeout -k 10 $(GPU_TESTS_TIMEOUT_S)"); \
	$$limit $(GPU_VENV)/bin/python -m pytest -v -m cuda -p no:cacheprovider \
		core/tests/test_cuda.py core/tests/test_pinning.py || rc=$$?; \
	if [ $$rc = 124 ] || [ $$rc = 137 ]; then echo "gpu-check: the cuda tests were stopped after" \
		"$(GPU_TESTS_TIMEOUT_S) s (GPU_TESTS_TIMEOUT_S); the speed table runs now"; fi; \
	$(GPU_VENV)/bin/python benchmarks/gpu_check.py || rc=$$?; exit $$rc

# The stack of the GPU machines this project is lent (docs/BENCHMARKS.md "GPU check"): Python 3.12, torch 2.11, numpy 2.5,
# transformers 5.17 — older than TORCH_STACK. The whole suite on the CPU with it finds what would break there
# before the one lent run does. PyPI's torch 2.11 wheel pulls its CUDA libraries (~4 GB, once per venv).
GPU_STACK_PYTHON ?= python3.12
GPU_STACK_VENV := .venv-gpu-stack
GPU_STACK := torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 numpy==2.5.2 transformers==5.17.0 \
	huggingface_hub==1.33.0 safetensors==0.8.0

test-gpu-stack:  ## the whole suite on the GPU machines' stack (Python 3.12, torch 2.11, numpy 2.5; CPU; ~4 GB of wheels, ~10 min)
	test -x $(GPU_STACK_VENV)/bin/python || $(GPU_STACK_PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_VENV)/bin/python -m pip install --quiet --upgrade pip "setuptools<85" wheel
	$(GPU_STACK_VENV)/bin/python -m pip install --quiet --config-settings editable_mode=compat \
		$(foreach p,$(PACKAGES),-e ./$(p)) $(DEV_TOOLS) $(GPU_STACK)
	$(GPU_STACK_VENV)/bin/python -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', \
		torch.__version__, 'numpy', numpy.__version__)"
	$(GPU_STACK_VENV)/bin/pytest -q -p no:cacheprovider $(ARGS)

clean-venv:  ## remove .venv
	rm -rf $(VENV)
