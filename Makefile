# `make demo` runs the main job, `make test` the whole test suite; both build .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are installed first so pip takes the CPU-usable wheels this machine keeps on disk;
# the package itself only declares ranges. Override for another platform: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast test-lowest lint clean

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python examples/main_job.py

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# the quick tier for the inner loop: every test not marked `slow` (compile, export, multi-process, whole scripts)
test-fast: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

# the quick tier on the lowest transformers that setup.py allows (and the huggingface_hub it needs), laid over the
# venv with PYTHONPATH so nothing else changes: the declared range is a tested range
LOWEST_TRANSFORMERS ?= 5.23.0
LOWEST := build/lowest-transformers-$(LOWEST_TRANSFORMERS)
$(LOWEST)/.installed: $(BIN)/.installed
	rm -rf $(LOWEST)
	$(BIN)/pip install --quiet --no-deps --target $(LOWEST) "transformers==$(LOWEST_TRANSFORMERS)" \
		"huggingface_hub>=1.31,<2" "httpx>=0.27,<1" "httpcore>=1"
	touch $@
test-lowest: $(LOWEST)/.installed
	PYTHONPATH=$(abspath $(LOWEST)) HF_HUB_OFFLINE=1 $(BIN)/python -c \
		"import transformers; assert transformers.__version__ == '$(LOWEST_TRANSFORMERS)', transformers.__version__"
	PYTHONPATH=$(abspath $(LOWEST)) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

lint: $(BIN)/.installed
	$(BIN)/ruff check convnextv2_hf tests examples conversion_scripts benchmarks

clean:
	rm -rf $(VENV) outputs

# transformers' own ConvNeXt V2 model tests (with the common mixins of its sdist) on our classes and on the built-in
# ones, see tests/transformers_suite/run_transformers_suite.py. Downloads the transformers sdist and, unless
# TRANSFORMERS_TEST_FILE names a local copy, tests/models/convnextv2/test_modeling_convnextv2.py at the version's tag.
TRANSFORMERS_TEST_FILE ?=
.PHONY: transformers-suite
transformers-suite: $(BIN)/.installed
	$(BIN)/pip install --quiet "parameterized>=0.9"
	HF_HUB_OFFLINE=1 $(BIN)/python tests/transformers_suite/run_transformers_suite.py \
		$(if $(TRANSFORMERS_TEST_FILE),--test-file $(TRANSFORMERS_TEST_FILE))

# `make gpu-check`: on a GPU, the device tests (pytest -m device --device cuda) and the GPU preset of
# benchmarks/benchmark.py in about 8 minutes, each phase under a time budget; one JSON and a table of ratios against
# issue 13's targets (benchmarks/gpu_check.py, BENCHMARKS.md "GPU check"). It builds no venv: a GPU machine's image
# with torch and transformers has no PyPI to build one from. The check runs with the first Python that imports
# torch, transformers, pytest and this checkout (and sees the GPU): GPU_CHECK_PYTHON, .venv, build/gpu-check-venv,
# the launching python3, python3 on the PATH; INSTALL=1 builds build/gpu-check-venv from PyPI where none does.
#   make gpu-check GPU_CHECK_OUTPUT=/path/gpu_check.json    # default outputs/gpu_check_<device>[_smoke].json
#   make gpu-check DEVICE=cpu SMOKE=1                       # CPU smoke: tiny sizes, nothing compiled (< 1 minute)
#   make gpu-check GPU_CHECK_ARGS="--tests-budget 0 --groups ablate --ablate-precisions fp32"   # any flag of
#                                                           # gpu_check.py: a second call for what budgets cut
DEVICE ?= cuda
SMOKE ?=
INSTALL ?=
GPU_CHECK_PYTHON ?=
GPU_CHECK_OUTPUT ?=
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --device $(DEVICE) $(if $(SMOKE),--smoke) $(if $(INSTALL),--install-env) \
		$(if $(GPU_CHECK_PYTHON),--python $(GPU_CHECK_PYTHON)) $(if $(GPU_CHECK_OUTPUT),--output $(GPU_CHECK_OUTPUT)) $(GPU_CHECK_ARGS)
