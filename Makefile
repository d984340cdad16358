# Two commands for a fresh machine:  make demo  (set up + quickstart)   make test  (set up + tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-mpi bench check-gpu-code clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(VENV)/bin/fedhpc run configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/throughput.py
	$(PY) bench/kernel_speed.py

# Compile the GPU code for sm_90 without a GPU: Triton ahead of time, CUDA with nvcc.
check-gpu-code: setup
	TRITON_DEFAULT_FP_FUSION=1 $(PY) tools/aot_compile_triton.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash tools/check_cuda_build.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
