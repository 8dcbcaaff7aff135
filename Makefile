# irep-deploy: `make demo` runs the main job on CPU with real data, `make test` runs the test suite.
# Both set up everything they need on a fresh machine (a venv in .venv, the Fashion-MNIST package).
# `make test` runs two lanes: the whole suite on the pinned dev versions (.venv, requirements-dev.txt),
# then `test-py38`: the deploy path's tests on the JetPack 5 floor, Python 3.8 + torch 2.0
# (.venv38, requirements-py38.txt; docs/testing.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
VENV38 ?= .venv38
STAMP38 := $(VENV38)/.installed
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
FIND_PY38 = ls -d $(PYENV_ROOT)/versions/3.8*/bin/python 2>/dev/null | sort -V | tail -n 1
# Every test of the deploy path: blocks and fusion, models, codes, checkpoints, atomic writes, `fuse`, export,
# build-trt (TensorRT stand-ins), bench, the CLI end to end (tests/deploy/test_cli_e2e.py), the same
# for a network named by --model (tests/test_cli_model.py), the CLI's bad-input table and fuzzed
# readers (cases that need train/search-only packages skip), and irepify of any network (torchvision
# classifiers, a Faster R-CNN whose fused body is exported, detectors traced around their heads).
DEPLOY_TESTS := tests/test_fusion.py tests/test_models.py tests/test_arch.py tests/test_checkpoint.py \
	tests/test_cli_fuse.py tests/test_precision.py tests/deploy tests/test_cli_model.py tests/test_bad_input.py \
	tests/test_fuzz_readers.py tests/test_irepify.py tests/test_detection.py tests/test_io.py \
	tests/test_interrupts.py tests/test_hostile.py tests/test_spec_rules.py tests/test_tensorfile.py \
	tests/test_norms.py tests/test_tracing.py tests/test_own_reparam.py tests/test_docs_claims.py \
	tests/test_progress.py tests/test_messages.py tests/test_exit_codes.py tests/test_output_parents.py \
	tests/test_onebyone_border.py
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv venv38 data test test-fast test-py38 test-gpu check-py38 check-results lint-docker demo demo-out-free benchmarks benchmarks-gpu clean

# PyPI's torch wheels for x86-64 Linux are CUDA builds (torch plus nvidia-* packages, most of the
# venv's size). PyTorch's own index has CPU-only builds: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# installs the pinned torch and torchvision from there first (their `+cpu` versions satisfy the pins), then
# the rest from PyPI. Not tested on the project's machines, which cannot reach that index.
TORCH_INDEX_URL ?=

$(STAMP): requirements-dev.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX_URL),$(BIN)/pip install -q --index-url $(TORCH_INDEX_URL) $$(grep -E '^torch(vision)?==' requirements-dev.txt))
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Python 3.8 comes from pyenv (any 3.8.x it has, the newest); without one, `pyenv install 3.8`
# builds it. No Python 3.8 at all is an error, never a skipped lane.
$(STAMP38): requirements-py38.txt setup.cfg pyproject.toml
	@py38="$$($(FIND_PY38))"; \
	if [ -z "$$py38" ]; then \
		pyenv="$$(command -v pyenv || echo $(PYENV_ROOT)/bin/pyenv)"; \
		echo "no Python 3.8 under $(PYENV_ROOT)/versions: running pyenv install 3.8"; \
		"$$pyenv" install -s 3.8 || { echo "test-py38: cannot get Python 3.8 (pyenv install 3.8 failed; install pyenv, or Python 3.8 under $(PYENV_ROOT)/versions)" >&2; exit 1; }; \
		py38="$$($(FIND_PY38))"; \
	fi; \
	[ -n "$$py38" ] || { echo "test-py38: no Python 3.8 under $(PYENV_ROOT)/versions" >&2; exit 1; }; \
	echo "creating $(VENV38) with $$py38"; \
	rm -rf $(VENV38) && "$$py38" -m venv $(VENV38)
	$(if $(TORCH_INDEX_URL),$(VENV38)/bin/pip install -q --index-url $(TORCH_INDEX_URL) $$(grep -E '^torch(vision)?==' requirements-py38.txt))
	$(VENV38)/bin/pip install -q -r requirements-py38.txt
	$(VENV38)/bin/pip install -q --no-deps -e .
	touch $(STAMP38)

venv38: $(STAMP38)

# Fashion-MNIST comes from Debian's package (IDX files, MIT licence); nothing is downloaded at run time.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	fi

# The deploy path must run on Python 3.8 (JetPack 5 on Jetson AGX Xavier). vermin and a 3.8
# byte-compile cover the whole package (train, search, viz too); test-py38 runs the deploy path.
check-py38: venv $(STAMP38)
	$(BIN)/vermin -t=3.8- --no-tips --violations --eval-annotations irep_deploy
	$(VENV38)/bin/python -c "import compileall, sys; sys.exit(not compileall.compile_dir('irep_deploy', quiet=1, legacy=False, workers=1, ddir='irep_deploy', force=True, optimize=0))"
	find irep_deploy -name '*.cpython-38*.pyc' -delete

# The floor lane: the deploy path's tests with Python 3.8, torch 2.0.1, torchvision 0.15.2,
# onnx 1.14.1, onnxruntime 1.15.1 (requirements-py38.txt).
test-py38: $(STAMP38) data
	$(VENV38)/bin/python -m pytest -q $(DEPLOY_TESTS)

# Results files against the code they depend on (stale ones listed; docs must call records of older versions
# so) and every number the docs quote with a claim marker against its file (docs/benchmarks.md). Seconds;
# needs no git history (dependency digests are stored in each results file).
check-results: venv
	$(BIN)/python benchmarks/check_results.py
	$(BIN)/python benchmarks/check_claims.py

# No Docker engine runs here: the Jetson image is linted, not built.
lint-docker: venv
	$(BIN)/hadolint Dockerfile.jetson

# Both lanes at once: the whole suite on the dev versions, and the deploy path on the JetPack 5 floor.
# Each pytest process keeps about one core busy (user + system time ~ wall time) and the main lane has
# twice the floor lane's work, so it runs in two xdist workers (a test file stays in one worker, so
# module fixtures are built once) beside the floor lane: three processes share the cores instead of
# the main lane running alone after the floor lane ends; one torch thread each (three processes, two
# cores). The floor lane's output is printed after the main lane's, and either failing fails the target.
test: venv data check-py38 check-results lint-docker $(STAMP38)
	@export OMP_NUM_THREADS=1; floor_log="$$(mktemp)"; \
	$(MAKE) --no-print-directory test-py38 > "$$floor_log" 2>&1 & floor=$$!; \
	$(BIN)/python -m pytest -q -n 2 --dist loadfile; main=$$?; \
	wait $$floor; floor_rc=$$?; \
	echo "== floor lane (make test-py38) =="; cat "$$floor_log"; rm -f "$$floor_log"; \
	[ $$main -eq 0 ] && [ $$floor_rc -eq 0 ]

# The main lane without the end-to-end tests marked `slow` (subprocess CLI chains, trainings, searches,
# the benchmark smoke runs): a quick check while editing. `make test` still runs everything.
test-fast: venv data
	$(BIN)/python -m pytest -q -m "not slow"

# The CUDA suite (tests marked `cuda`, all of tests/gpu): on a machine without a GPU every test skips
# with the reason, so this target is meant for a GPU host.
test-gpu: venv data
	$(BIN)/python -m pytest -q -rs -m cuda

# An earlier report is never removed: an existing DEMO_OUT is refused in one line before anything is
# installed or run. One OpenMP thread, as in the run whose time the README gives (DEMO_THREADS=N to change).
DEMO_OUT ?= demo-out
DEMO_THREADS ?= 1
demo: demo-out-free venv data
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/irep-deploy demo -o $(DEMO_OUT)

demo-out-free:
	$(if $(wildcard $(DEMO_OUT)),$(error $(DEMO_OUT) exists (an earlier run): remove it (rm -rf $(DEMO_OUT)) or choose another directory (make demo DEMO_OUT=DIR)))

# Regenerates every CPU file under benchmarks/results with the commands recorded in them (about five hours
# on 2 cores; run it on an otherwise idle machine, the timings are compared within each script's run).
# int8_accuracy_before_guard.* records an older quantizer's entropy calibration: kept, not remade.
benchmarks: venv data
	$(BIN)/python benchmarks/bench_fusion.py
	$(BIN)/python benchmarks/bench_deploy.py --duration 10 --rounds 5
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_irepify.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_networks.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_search.py --step-rounds 5 --preset-rounds 1 --preset-threads 2
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_search.py --skip-step --skip-population --preset-threads 2 \
		--out benchmarks/results/search_cpu_preset
	rm -rf runs/evidence_fmnist
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/evidence_fmnist.py --search-limit 3000 --search-rounds 3 \
		--limit 3000 --epochs 3 --seeds 0 1 2
	rm -rf runs/evidence_fmnist_vgg16
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/evidence_fmnist.py --backbone vgg16_cifar --search-limit 3000 \
		--search-rounds 3 --limit 3000 --epochs 3 --seeds 0 1 --work-dir runs/evidence_fmnist_vgg16 \
		--out benchmarks/results/evidence_fmnist_vgg16
	rm -rf runs/budget_sweep
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/budget_sweep.py --jobs 2 --random
	$(BIN)/python benchmarks/table_models.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_step_sync.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_population_eval.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bad_input.py
	rm -rf runs/int8_accuracy
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/int8_accuracy.py
	rm -rf runs/ranking runs/search_phase runs/evidence_5seeds
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/ranking.py --jobs 2
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/search_phase.py --jobs 2 --rounds 6
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/evidence_fmnist.py --searches-in runs/search_phase --seeds 0 1 2 3 4 \
		--limit 4000 --epochs 4 --jobs 2 --work-dir runs/evidence_5seeds --out benchmarks/results/evidence_fmnist_5seeds
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/search_phase.py --arms des-recal random-recal --seeds 0 1 2 \
		--rounds 6 --jobs 2 --out benchmarks/results/search_phase_recal

# The GPU records (a CUDA GPU; TensorRT is used where installed): results/gpu_<gpu>.* and gpu_train_<gpu>.*
benchmarks-gpu: venv data
	$(BIN)/python benchmarks/bench_gpu.py
	$(BIN)/python benchmarks/gpu_train_probe.py
	$(BIN)/python benchmarks/gpu_speed.py

clean:
	rm -rf $(VENV) $(VENV38) .pytest_cache .hypothesis
