# `make setup` is idempotent: it (re)builds .venv only when the files that define it change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CORE   := $(VENV)/.dsq-core-stamp
STAMP  := $(VENV)/.dsq-setup-stamp

.PHONY: setup setup-core test demo bench clean

setup: $(STAMP)
setup-core: $(CORE)

# Everything but Horovod: enough for the core, DDP, DeepSpeed, async_ps and the demo.
$(CORE): setup.py requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0           # the local CPU wheel; pinned by constraints.txt from here on
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q -c constraints.txt --no-build-isolation --no-deps -e .
	# an editable install leaves out doublesqueeze.pth (a wheel has it): the import hook of dsq_autohook.py
	cp doublesqueeze.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	$(PY) -c "import torch, dsq_plugins; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# DeepSpeed compiles its CPU shared-memory op at the first launch (about 30 s, then cached in
	# ~/.cache/torch_extensions): built here, so that the first DeepSpeed test does not pay for it
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

$(STAMP): $(CORE) tools/horovod_wheel.sh
	bash tools/horovod_wheel.sh $(PY)        # builds Horovod once (about 4 min), then reuses the cached wheel
	touch $@

# The second run takes the pure-torch paths that CUDA takes (DSQ_FAST_PATHS=0: no numpy specialisations) through
# the core, the engine, the DDP hook, FSDP2, DeepSpeed ZeRO-2's and ZeRO-3's passes (against their plain-torch
# references) and the
# parameter server's worker and server (in-process), so the code a
# GPU runs is tested on a machine without one. It leaves out what no fast path touches: the refusal of foreign
# checkpoints, the pickled form of a resume, and of FSDP2 what runs no other sharded code than the first run's:
# Lightning, the kernel's byte counts, the resumes, HSDP (the engine's collective, tested here under DDP); and
# ZeRO-3's reference with its weight kept whole by DeepSpeed (the same passes as the other cases there).
CORE_TESTS := tests/test_compressors.py tests/test_simulator.py tests/test_engine.py tests/test_codec.py \
	tests/test_auto.py tests/test_ddp_hook.py tests/test_async_ps_inproc.py tests/test_guard.py tests/test_pipeline.py \
	tests/test_fsdp.py tests/test_zero2.py::test_zero2_equals_the_plain_torch_reference_on_both_passes \
	tests/test_zero3.py::test_zero3_equals_the_plain_torch_reference_on_both_passes

FAST_PATHS_OFF := -k "not refused and not pickled and not lightning_model_parallel and not bytes_counted_by_the_kernel \
	and not fsdp2_resume and not hsdp and not persistent"

# The suite runs as two lanes side by side (tools/run_lanes.py), one pytest each, so that both cores stay busy: one
# test after another, the launches of 2-4 processes kept 1.5 of 2 cores busy on average. Lane `launchers` holds
# the files of the largest launches (the front ends, the LM yardstick, Horovod, the examples, the cluster, ZeRO-3);
# lane `rest` every other file (a new test file lands there), then the second run with the fast paths off. Measured
# 2026-12-08, the two took about the same time. Each pytest runs torch on one thread (OMP_NUM_THREADS=1), as the
# launched ranks do: two lanes of two threads each would only take turns on the 2 cores.
LANE_LAUNCHERS := tests/test_frontends.py tests/test_quality.py tests/test_horovod.py tests/test_examples.py \
	tests/test_universal.py tests/test_cluster.py tests/test_convergence.py tests/test_zero3.py
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q

test: setup
	$(PY) tools/run_lanes.py \
		--lane launchers '$(PYTEST) --durations=10 $(LANE_LAUNCHERS)' \
		--lane rest '$(PYTEST) --durations=10 tests $(addprefix --ignore=,$(LANE_LAUNCHERS)) && \
			DSQ_FAST_PATHS=0 $(PYTEST) $(CORE_TESTS) $(FAST_PATHS_OFF)'

# The main demo: 4 DDP ranks on the digits data, five methods side by side (see examples/demo.py).
demo: setup-core
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 4 examples/demo.py \
		--outdir runs/demo

bench: setup
	$(PY) benchmarks/compressors.py --json runs/bench/compressors.json

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis *.egg-info
