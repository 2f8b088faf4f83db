# fastblocks: `make run` (install + the main job) and `make test` (install + the whole suite).
# Both create their own virtual environment in $(VENV). The venv sees the system's packages, so
# a machine that already has a recent torch (e.g. a GPU machine with its CUDA build and no
# network) uses it; otherwise torch==2.13.0 is installed (on our CPU machines pip finds the CPU
# build on local disk; a looser specifier would download several GB of CUDA packages).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_MIN ?= 2.4
NVCC ?= nvcc
CUDA_OBJ_DIR ?= build/nvcc-check

STAMP := $(VENV)/.fastblocks-installed
TEST_STAMP := $(VENV)/.fastblocks-installed-test
BUILD_INPUTS := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: install install-test run test lint bench cuda-compile clean sm90-compile

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# torch (kept if a recent one is importable) and ninja (the extension's parallel build; with
# --no-build-isolation it is not installed automatically).
define install_torch_and_ninja
	@$(PY) -c "import torch, sys; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); \
	sys.exit(0 if v >= tuple(int(p) for p in '$(TORCH_MIN)'.split('.')) else 1)" 2>/dev/null \
	  && echo "using installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install ninja
endef

# `make run` needs the package and the tooling's extras ([all]: matplotlib, tqdm, ...);
# `make test` also the test extras ([test]: pytest, pytest-benchmark, ruff). Each is reinstalled
# (and the extension rebuilt) only when the build inputs change.
install: $(STAMP)

$(STAMP): $(BUILD_INPUTS) | $(PY)
	$(install_torch_and_ninja)
	$(PY) -m pip install --no-build-isolation -e ".[all]"
	@touch $(STAMP)

install-test: $(TEST_STAMP)

$(TEST_STAMP): $(BUILD_INPUTS) | $(PY)
	$(install_torch_and_ninja)
	$(PY) -m pip install --no-build-isolation -e ".[all,test]"
	@touch $(STAMP) $(TEST_STAMP)

run: install
	$(VENV)/bin/fastblocks info
	$(VENV)/bin/fastblocks bench --quick

test: install-test lint
	$(PY) -m pytest

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install-test
	$(PY) -m pytest benchmarks --benchmark-only

# Compile every CUDA source with the real build's flags (setup.py --print-flags), without CUDA
# PyTorch: the kernel files (.cu, nvcc for sm_90) include only <ATen/ATen.h> and the CUDA runtime;
# the host glue (ops_cuda.cpp, g++) includes c10/cuda headers, whose one generated header the
# CPU wheel lacks: a one-line stand-in (build/cuda-standin) takes its place.
CUDA_INC ?= $(patsubst %/,%,$(dir $(firstword $(wildcard $(CUDA_HOME)/include/cuda_runtime_api.h /usr/local/cuda/include/cuda_runtime_api.h))))
cuda-compile: $(PY)
	@test -n "$(CUDA_INC)" || { echo "cuda-compile: no cuda_runtime_api.h (set CUDA_HOME)"; exit 1; }
	@mkdir -p $(CUDA_OBJ_DIR) build/cuda-standin/c10/cuda/impl
	@echo '#pragma once' > build/cuda-standin/c10/cuda/impl/cuda_cmake_macros.h
	@inc=$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))"); \
	flags=$$($(PY) setup.py --print-flags nvcc); cxxflags=$$($(PY) setup.py --print-flags cxx); \
	for f in csrc/cuda/*.cu; do \
	  echo "nvcc -c $$flags $$f"; \
	  $(NVCC) -c $$flags -gencode=arch=compute_90,code=sm_90 -diag-suppress 3306 $$inc $$f \
	    -o $(CUDA_OBJ_DIR)/$$(basename $$f .cu).o -Xcompiler -Wno-c++20-extensions || exit 1; \
	done; \
	for f in csrc/cuda/*.cpp; do \
	  echo "g++ -c $$cxxflags $$f"; \
	  $(CXX) -c $$cxxflags -fPIC -DFASTBLOCKS_WITH_CUDA=1 $$inc -I$(CUDA_INC) -Ibuild/cuda-standin $$f \
	    -o $(CUDA_OBJ_DIR)/$$(basename $$f .cpp).o || exit 1; \
	done; echo "cuda-compile: every CUDA source compiled (kernels for sm_90, host glue with g++)"

clean:
	rm -rf build $(CUDA_OBJ_DIR) fastblocks/*.so

# Compile every Triton kernel variant the launchers produce for the H200 (sm_90) with the GPU
# machine's Triton, ahead of time, without a GPU (tools/sm90_compile.py: the table of registers,
# spills, shared memory and compile times goes to $(SM90_DIR)/kernels.md; exit 1 on a compile
# error). That Triton is installed once into its own folder, ahead of the venv's on PYTHONPATH.
# SM90_SCOPE=all compiles every layer of the models instead of representative ones (longer).
# A variant that spills more than SM90_MAX_SPILL bytes per thread fails too (spills are a
# performance bug on Hopper; the 4-8 byte stack slots of three element-wise variants are not
# register pressure: see tools/sm90_compile.py).
SM90_TRITON ?= 3.6.0
SM90_DIR ?= build/sm90
SM90_TRITON_DIR ?= $(SM90_DIR)/triton36
SM90_SCOPE ?= cover
SM90_MAX_SPILL ?= 8
SM90_JOBS ?= $(shell nproc 2>/dev/null || echo 1)

sm90-compile: install
	@test -d $(SM90_TRITON_DIR)/triton-$(SM90_TRITON).dist-info \
	  || $(PY) -m pip install --upgrade --no-deps --target $(SM90_TRITON_DIR) "triton==$(SM90_TRITON)"
	env -u TRITON_INTERPRET PYTHONPATH=$(SM90_TRITON_DIR)$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(PY) tools/sm90_compile.py --out $(SM90_DIR) --scope $(SM90_SCOPE) --max-spill $(SM90_MAX_SPILL) \
	  --jobs $(SM90_JOBS)
