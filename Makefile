# fedmef: the two commands are `make run` (set up + run the default experiment) and `make test`.
VENV        ?= .venv
PYTHON      ?= python3
BIN         := $(abspath $(VENV))/bin
FMNIST_DIR  := /usr/share/datasets/fashion-mnist
export PATH := $(BIN):$(PATH)
# Prefect and MLflow stay on this machine and quiet.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export DVC_NO_ANALYTICS ?= 1

.PHONY: setup dataset lock run test lint serve deploy bench bench-accuracy bench-memory clean

setup: $(VENV)/.installed dataset

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,distributed]"
	touch $@

# Re-resolve every dependency to the newest release pyproject.toml allows, into a new .venv, and write
# constraints.txt from it; then `make test` and commit constraints.txt if it passes.
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,distributed]"
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(VENV)/.installed

# Fashion-MNIST, the embedded default: Debian's package where apt-get is available, otherwise
# torchvision downloads it into data/raw on first use.
dataset:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "dataset: Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "dataset: installing Debian package dataset-fashion-mnist"; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	  echo "dataset: apt-get failed; torchvision will download Fashion-MNIST into data/raw"; \
	else \
	  echo "dataset: no $(FMNIST_DIR); torchvision will download Fashion-MNIST into data/raw"; \
	fi

run: setup
	dvc repro
	python -m flows.summary --set runtime.run_dir=.

test: setup
	python -m pytest -q

# Deployments for the Prefect UI. Needs a server: `prefect server start` in another terminal, and
# PREFECT_API_URL=http://127.0.0.1:4200/api in this one.
serve: setup
	python -m flows.serve

# The same deployments in a process work pool, for `prefect worker start --pool fedmef-gpu --limit 1` on each GPU
# machine (README, "On GPU machines"). Needs PREFECT_API_URL too.
deploy: setup
	python -m flows.deploy

bench: setup
	python bench/overhead.py

bench-accuracy: setup
	python -m bench.accuracy --quick

bench-memory: setup
	python -m bench.memory

lint: setup
	ruff check fedmef_core services tasks flows tests

clean:
	rm -rf data/partitions checkpoints metrics plots runs mlflow.db mlartifacts
