# Two entry points for a fresh machine: `make quickstart` and `make test`. Both create .venv/ on demand.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
QS_DIR ?= data/quickstart
SPARK_QUIET := --conf spark.ui.showConsoleProgress=true \
	--driver-java-options "-Dlog4j2.configurationFile=$(abspath conf/spark/log4j2.properties)"

# spark-submit starts its Python driver with $PYSPARK_PYTHON: point it at the venv, activated or not.
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN)/python)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv quickstart test lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk (pip find-links); install it first so
	# the project's torch range is already satisfied and no CUDA build is downloaded.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Generate logs -> build sequences (Spark) -> train cd and cd+autocdsr (Ray Train, tracked in MLflow:
# sqlite:///mlflow.db here) -> compare per domain, register the better run (validation NDCG@10) as
# models:/autocdsr-quickstart@champion.
QS_TRAIN := $(BIN)/python -m autocdsr.train --data $(QS_DIR)/sequences --config conf/train/quickstart.yaml
quickstart: $(STAMP)
	rm -rf $(QS_DIR)/logs
	$(BIN)/python -m autocdsr.synth --out $(QS_DIR)/logs --users 2000 --seed 7
	$(BIN)/spark-submit --master "local[2]" $(SPARK_QUIET) jobs/build_sequences.py \
		--input $(QS_DIR)/logs --output $(QS_DIR)/sequences --config conf/data/synth.yaml
	$(QS_TRAIN) method=cd registry.name=null
	$(QS_TRAIN) method=cd+autocdsr registry.name=null
	$(BIN)/python -m autocdsr.compare sasrec-cd-seed0 sasrec-cd_autocdsr-seed0 --experiment quickstart \
		--register autocdsr-quickstart --alias champion

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) lint
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache

# --- petastorm: an optional reader of the same shards, in its own legacy environment (README) -----------
# petastorm 0.13.1 cannot share .venv (pyarrow < 15, numpy < 2, setuptools < 70). Its venv gets the pins of
# requirements-petastorm.txt, then petastorm and torch (the CPU wheel on disk) without dependencies, and a
# .pth file that puts this checkout on its path (autocdsr.data.petastorm_source imports only numpy/torch code).
PETASTORM_VENV  := .venv-petastorm
PETASTORM_STAMP := $(PETASTORM_VENV)/.installed
.PHONY: petastorm-env

petastorm-env: $(PETASTORM_STAMP)

$(PETASTORM_STAMP): requirements-petastorm.txt
	rm -rf $(PETASTORM_VENV)
	$(PYTHON) -m venv $(PETASTORM_VENV)
	$(PETASTORM_VENV)/bin/python -m pip install -q -r requirements-petastorm.txt
	$(PETASTORM_VENV)/bin/python -m pip install -q --no-deps "petastorm==0.13.1" "torch==2.13.0"
	echo "$(CURDIR)" > "$$($(PETASTORM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/autocdsr-checkout.pth"
	$(PETASTORM_VENV)/bin/python -c "import autocdsr.data.petastorm_source, petastorm, pyarrow, numpy, torch; \
		print('petastorm', petastorm.__version__, 'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
	touch $(PETASTORM_STAMP)

# --- cluster packaging and the local cluster (infra/README.md) -------------------------------------------
.PHONY: wheel cluster-up cluster-down cluster-status

# dist/autocdsr-VERSION-py3-none-any.whl (container images, cluster venvs) and
# dist/autocdsr-VERSION-py-files.zip (spark-submit --py-files); built offline from a copy of the sources.
wheel: $(STAMP)
	infra/build-dist.sh dist

# Spark standalone (spark://127.0.0.1:7077), MLflow (http://127.0.0.1:5000), Ray head (http://127.0.0.1:8265).
cluster-up: $(STAMP)
	infra/local/all.sh start

cluster-down:
	infra/local/all.sh stop

cluster-status:
	infra/local/all.sh status
