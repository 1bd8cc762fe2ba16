# `make demo` and `make test` do all set-up on a fresh machine, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DUMPS  ?= graphs

.PHONY: setup test check demo bench clean

setup: $(STAMP)

# A venv that sees an importable system torch, else one with the pinned CPU wheel
# (an unpinned torch pulls several GB of CUDA packages).
$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,plot]"
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq graphviz >/dev/null) || echo "graphviz not installed: region pictures use the plain SVG fallback"; \
	  else echo "graphviz not installed (not root): region pictures use the plain SVG fallback"; fi; }
	@command -v tc >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null) || echo "iproute2 not installed: moe-ascend launch runs on loopback, unshaped"; \
	  else echo "iproute2 not installed (not root): moe-ascend launch runs on loopback, unshaped"; fi; }
	@touch $(STAMP)

# Everything, as CI runs it; two tests at a time (pytest-xdist), those marked `exclusive` alone.
test: setup
	$(PY) -m pytest -q -n 2

# The edit loop: unit, golden and single-process numerical tests (no `slow` ones: multi-process and training runs).
check: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 -m "not slow"

demo: setup
	$(PY) examples/demo.py --dump-dir $(DUMPS)

# Every bench/ script, then one report of their figures: bench/results/REPORT.md (QUICK=1: shortened runs)
bench: setup
	$(PY) bench/_suite.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) $(DUMPS) bench/results .pytest_cache
