# Set-up is part of every target: a fresh machine needs only `make test` or `make demo`.
VENV   ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY     := $(VENV)/bin/python
PINS   := $(shell cat constraints.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP  := .make/installed-$(PINS)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	mkdir -p .make && rm -f .make/installed-* && touch $@

# pytest-xdist: TEST_WORKERS processes, each module on one worker (its module fixtures built once); most tests
# wait on servers and subprocesses, so 3 workers keep 2 cores busy. Modules are handed out in collection order,
# longest first (tests/conftest.py; xdist would otherwise reorder them by test count). Exit code 5 (no tests
# collected) is a failure.
TEST_WORKERS ?= 3
test: $(STAMP)
	GX_ANALYTICS_ENABLED=false $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/incseg demo

bench: $(STAMP)
	$(VENV)/bin/incseg bench

clean:
	rm -rf .make demo-workspace .pytest_cache
