# Build, test and benchmark mmv.
#
# `make test` is the one test command: from a fresh clone it creates $(VENV), installs torch and the
# build tools, builds and installs mmv (the extension mmv._C with its CUDA kernels when nvcc is found)
# with the test extras, builds and runs the C++ smoke test (CMake + ctest), builds the CUDA emulator
# (the test-only extension mmv_emulated, in build/emulated), then runs pytest. The CUDA tests run on
# the emulator as a modelled H100 and A100, and on a GPU when there is one; their large emulated cases
# (marker slow_emulation) are left to `make test-emulated`.
#
#   make test       all of the above; steps that are up to date are skipped
#   make build      the venv and the package only (rebuilt when csrc/, setup.py or pyproject.toml change)
#   make cpp-test   the C++ library and its smoke test
#   make emulator   the CUDA kernels built for the CPU emulator (rebuilt when csrc/ or tests/cuda/ change)
#   make test-emulated  the CUDA tests and the emulator's own tests on the emulator, large cases included
#   make bench      every benchmarks/bench_*.py
#   make demo       phantoms -> pretraining -> linear probes (mmv demo; DEMO_ARGS, e.g. --out DIR)
#   make clean      build outputs (the venv stays); `make distclean` removes the venv too
#
# Variables (make VAR=value, or the environment):
#   PYTHON                the interpreter that creates the venv (python3)
#   VENV                  the virtual environment (.venv)
#   TORCH_VERSION         torch to install (2.14.1); empty keeps the torch the venv already has
#   MMV_CUDA              1: build the CUDA kernels, 0: do not (default: 1 when nvcc is found)
#   TORCH_CUDA_ARCH_LIST  GPU architectures of the CUDA kernels (9.0; e.g. "8.0;9.0")
#   MAX_JOBS              parallel compile jobs (the number of cores)
#   CPP_TEST_CUDA         ON: the C++ build compiles the CUDA kernels too (OFF)
#   PYTEST_ARGS, BENCH_ARGS  extra arguments for pytest and for each benchmark script

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
# Each step needs the one before it, and each already uses every core.
.NOTPARALLEL:

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
TORCH_CUDA_ARCH_LIST ?= 9.0
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CPP_TEST_CUDA ?= OFF
PYTEST_ARGS ?=
BENCH_ARGS ?=
DEMO_ARGS ?=

# cmake/cuda_home.py finds the toolkit the way setup.py does (following an nvcc wrapper script).
CUDA_HOME_FOUND := $(shell $(PYTHON) cmake/cuda_home.py 2>/dev/null)
MMV_CUDA ?= $(if $(wildcard $(CUDA_HOME_FOUND)/bin/nvcc),1,0)
export MMV_CUDA TORCH_CUDA_ARCH_LIST MAX_JOBS

VENV_PYTHON := $(VENV)/bin/python
STAMPS := .make
CMAKE_BUILD_DIR := build/cmake
# TORCH_CUDA_ARCH_LIST spelling ("8.0;9.0+PTX", or spaces) to CMake's ("80;90").
empty :=
space := $(empty) $(empty)
CUDA_ARCHITECTURES := $(subst $(space),;,$(strip $(subst ;, ,$(subst .,,$(subst +PTX,,$(TORCH_CUDA_ARCH_LIST))))))

EXTENSION_INPUTS := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \)) \
	setup.py pyproject.toml cmake/cuda_home.py $(STAMPS)/build-config
BUILD_CONFIG := MMV_CUDA=$(MMV_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)

.PHONY: test test-emulated emulator build cpp-test bench demo clean distclean FORCE

test: build cpp-test emulator
	$(VENV_PYTHON) -m pytest -m "not slow_emulation" $(PYTEST_ARGS)

test-emulated: build emulator
	$(VENV_PYTHON) -m pytest tests/test_cuda_ops.py tests/test_cuda_emulator.py -m "not cuda" $(PYTEST_ARGS)

# tests/emulated_cuda.py builds it (ninja, cached in build/emulated), with the PTX nvcc makes of the
# kernel sources for their __launch_bounds__ where nvcc is found; the tests would otherwise build it on
# first use.
emulator: build
	cd tests && $(abspath $(VENV_PYTHON)) -c "import emulated_cuda; emulated_cuda.supported() and emulated_cuda.load()"

build: $(STAMPS)/build

cpp-test: $(STAMPS)/deps
	cmake -S . -B $(CMAKE_BUILD_DIR) -DPython_EXECUTABLE="$(abspath $(VENV_PYTHON))" \
		-DMMV_WITH_CUDA=$(CPP_TEST_CUDA) \
		$(if $(filter ON,$(CPP_TEST_CUDA)),-DCMAKE_CUDA_ARCHITECTURES="$(CUDA_ARCHITECTURES)")
	cmake --build $(CMAKE_BUILD_DIR) -j $(MAX_JOBS)
	ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure

bench: build
	@scripts=(benchmarks/bench_*.py); \
	if [[ ! -e "$${scripts[0]}" ]]; then echo "no benchmarks/bench_*.py yet"; exit 0; fi; \
	for script in "$${scripts[@]}"; do echo "== $$script"; $(VENV_PYTHON) "$$script" $(BENCH_ARGS); done

demo: build
	$(VENV_PYTHON) -m mmv.cli demo $(DEMO_ARGS)

clean:
	rm -rf build $(STAMPS) mmv/_C.*.so mmv.egg-info

distclean: clean
	rm -rf $(VENV)

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

# torch first, with the tools setup.py needs: the package is built against the torch installed here.
$(STAMPS)/deps: $(VENV)/pyvenv.cfg
	$(VENV_PYTHON) -m pip install $(if $(TORCH_VERSION),"torch==$(TORCH_VERSION)",torch) \
		"setuptools>=64" wheel ninja numpy
	@mkdir -p $(@D) && touch $@

# Rewritten only when the settings change, so that a change of MMV_CUDA or of the architectures
# rebuilds the extension while an unchanged one does not.
$(STAMPS)/build-config: FORCE
	@mkdir -p $(@D)
	@if [[ "$$(cat $@ 2>/dev/null)" != "$(BUILD_CONFIG)" ]]; then echo "$(BUILD_CONFIG)" > $@; fi

$(STAMPS)/build: $(STAMPS)/deps $(EXTENSION_INPUTS)
	$(VENV_PYTHON) -m pip install --no-build-isolation -e ".[test]"
	@touch $@
