# irep-deploy: `make demo` runs the main job on CPU with real data, `make test` runs the test suite.
# Both set up everything they need on a fresh machine (a venv in .venv, the Fashion-MNIST package).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
PY38 ?= $(shell ls -d $$(pyenv root 2>/dev/null)/versions/3.8*/bin/python 2>/dev/null | head -n 1)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv data test check-py38 lint-docker demo benchmarks clean

$(STAMP): requirements-dev.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST comes from Debian's package (IDX files, MIT licence); nothing is downloaded at run time.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	fi

# The deploy path must run on Python 3.8 (JetPack 5 on Jetson AGX Xavier).
check-py38: venv
	$(BIN)/vermin -t=3.8- --no-tips --violations --eval-annotations irep_deploy
	@if [ -n "$(PY38)" ]; then \
		echo "byte-compiling irep_deploy with $(PY38)"; \
		$(PY38) -c "import compileall, sys; sys.exit(not compileall.compile_dir('irep_deploy', quiet=1, legacy=False, workers=1, ddir='irep_deploy', force=True, optimize=0))" ; \
		find irep_deploy -name '*.cpython-38*.pyc' -delete; \
	else echo "no Python 3.8 interpreter found (pyenv); skipped byte-compiling"; fi

# No Docker engine runs here: the Jetson image is linted, not built.
lint-docker: venv
	$(BIN)/hadolint Dockerfile.jetson

test: venv data check-py38 lint-docker
	$(BIN)/python -m pytest -q

# Removes an earlier report first (the demo refuses to overwrite a run).
demo: venv data
	rm -rf demo-out
	$(BIN)/irep-deploy demo --out demo-out

# Regenerates every file under benchmarks/results with the commands recorded in them (about two hours
# on 2 cores; run it on an otherwise idle machine, the timings are compared within each script's run).
benchmarks: venv data
	$(BIN)/python benchmarks/bench_fusion.py
	$(BIN)/python benchmarks/bench_deploy.py --duration 10 --rounds 5
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
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bad_input.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
