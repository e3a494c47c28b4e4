# make demo: train micro on the bundled factworld corpus, then generate and answer questions.
# make test: the whole pytest suite (tiny configs, 8 fake CPU devices).
PYTHON ?= python3
# glibc malloc backs large blocks with huge pages: XLA:CPU re-allocates a step's buffers on every call, and with
# 4 KiB pages each step page-faults them all back in (docs/perf/train_step.md). The CLIs set this themselves.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean proto

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: $(STAMP)
	$(PY) -m mantis_jax.demo

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I mantis_jax/memory/semantic/proto --python_out=mantis_jax/memory/semantic/proto \
	  --grpc_python_out=mantis_jax/memory/semantic/proto mantis_jax/memory/semantic/proto/semantic.proto
	sed -i 's/^import semantic_pb2 as/from . import semantic_pb2 as/' mantis_jax/memory/semantic/proto/semantic_pb2_grpc.py

clean:
	rm -rf $(VENV) build *.egg-info
