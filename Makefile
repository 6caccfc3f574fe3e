# The two commands: `make serve` and `make test`. Everything else is a step of those.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS := $(VENV)/.installed-extras
# The MLflow tracking server the tests start, in a virtualenv of its own: the
# full mlflow package pins gunicorn<27, which this project is not on.
MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed
DEMO   := iris_classifier binary_classifier diabetes_regressor wine_clusters
# podman, runc and debootstrap build and run the image (tests/test_image.py);
# prometheus (with promtool) and prometheus-alertmanager (with amtool) check
# the alerts and run the monitoring end to end.
SYSTEM_PACKAGES := redis-server wrk nginx podman runc debootstrap prometheus prometheus-alertmanager
# docker-compose validates docker/docker-compose.yml, which needs no engine:
# installed without the Docker engine it recommends.
SYSTEM_PACKAGES_NO_RECOMMENDS := docker-compose

# ruff: pyflakes, pycodestyle, bugbear, and no function more complex than 15.
RUFF := --select E,F,W,C901,B --ignore B905 --line-length 140 --target-version py311 \
        --config lint.mccabe.max-complexity=15 --extend-exclude tests/data

.PHONY: install extras models serve test test-fast lint system-deps bench bench-mlserver clean

install: $(STAMP)

# What the tests of the model sources need: the MLflow client, PyTorch, TensorFlow.
extras: $(EXTRAS) $(MLFLOW_STAMP)

# meinheld pins greenlet<0.5, which does not build on Python 3.11; its C
# server needs no greenlet, so it goes in without its dependencies.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[server,test]'
	$(BIN)/pip install -q --no-deps meinheld==1.0.2
	$(BIN)/python -c "import meinheld.server"
	touch $@

$(EXTRAS): $(STAMP) setup.cfg
	$(BIN)/pip install -q -e '.[server,test,mlflow,torch,tensorflow]'
	touch $@

$(MLFLOW_STAMP):
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install -q mlflow==3.17.2
	touch $@

models: install
	@for m in $(DEMO); do test -f models/$$m/1/metadata.json || missing=1; done; \
	if [ -n "$$missing" ]; then $(BIN)/mlserve models demo; fi

serve: install models
	exec $(BIN)/gunicorn -c gunicorn.conf.py

system-deps:
	@set -e; missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	bare=""; for p in $(SYSTEM_PACKAGES_NO_RECOMMENDS); do dpkg -s $$p >/dev/null 2>&1 || bare="$$bare $$p"; done; \
	if [ -n "$$missing$$bare" ]; then \
	  echo "installing:$$missing$$bare"; \
	  apt-get update -qq; \
	fi; \
	if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	if [ -n "$$bare" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$bare >/dev/null; fi

lint: install
	$(BIN)/ruff check $(RUFF) app tests perf gunicorn.conf.py

test: install extras system-deps models lint
	$(BIN)/python -m pytest

# The edit loop: lint and every test that starts no server or other process.
test-fast: install extras models lint
	$(BIN)/python -m pytest -m "not server"

# The full suite; narrow it with e.g. make bench BENCH_ARGS="--scenario predict_uncached --connections 32"
bench: install system-deps models
	$(BIN)/python -m perf run $(BENCH_ARGS)

# Optional: ours beside Seldon MLServer on iris_classifier; MLServer gets its
# own virtualenv, .venv-mlserver/. E.g. make bench-mlserver MLSERVER_ARGS="--runs 5"
bench-mlserver: install system-deps models
	$(BIN)/python -m perf mlserver $(MLSERVER_ARGS)

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) *.egg-info
