# Two commands on a fresh machine:  `make demo`  (install + quick start)  and  `make test`  (install + tests).
# Each creates .venv. The CPU build of torch is installed first, unless the venv already has a torch
# (a GPU machine keeps its own CUDA build: install it into .venv before running make).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,server,pacs
STAMP  := $(VENV)/.medseg-installed

.PHONY: install sysdeps demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	# elasticdeform's prebuilt wheel is compiled against NumPy 1.x: build it from source
	$(PY) -c "import elasticdeform" 2>/dev/null || $(PIP) install --no-binary elasticdeform elasticdeform
	$(PIP) install -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/medseg train pipelines/quickstart.yaml

# system packages of the deployment test: a real PostgreSQL and docker-compose (validates docker/compose.yaml);
# and of the PACS tests: Orthanc with its DICOMweb plugin (tests/predict/test_pacs.py);
# installed with apt-get when missing and running as root (CI), else the test says what to install
sysdeps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      postgresql docker-compose >/dev/null; \
	  else echo "note: install postgresql and docker-compose for tests/test_deployment.py"; fi; \
	fi
	@if ! command -v Orthanc >/dev/null 2>&1 || ! ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      orthanc orthanc-dicomweb >/dev/null; \
	  else echo "note: install orthanc and orthanc-dicomweb for tests/predict/test_pacs.py"; fi; \
	fi

test: install sysdeps
	$(VENV)/bin/ruff check medseg tests benchmarks
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check medseg tests benchmarks

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs data/demo .pytest_cache
