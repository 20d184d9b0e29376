# `make setup` is idempotent: it (re)builds .venv only when the files that define it change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.dsq-setup-stamp

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): setup.py requirements.txt constraints.txt tools/horovod_wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0           # the local CPU wheel; pinned by constraints.txt from here on
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q -c constraints.txt --no-build-isolation --no-deps -e .
	bash tools/horovod_wheel.sh $(PY)        # builds Horovod once (about 4 min), then reuses the cached wheel
	$(PY) -c "import torch, dsq_plugins; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 examples/ddp_digits.py \
		--methods dense,sign --logdir runs/demo --json runs/demo/results.json

bench: setup
	$(PY) benchmarks/compressors.py --json runs/bench/compressors.json

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis *.egg-info
