# Developer commands. On a fresh machine `make run` and `make test` create .venv first.

VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := test,example,cli,otel
SOURCES := fastapi_dbpool example_app tests benchmarks

.PHONY: venv run test lint fmt bench bench-tools clean promtool

venv: $(STAMP)

$(PYTHON):
	python3 -m venv $(VENV)

# Reinstall only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install -e '.[$(EXTRAS)]'
	touch $(STAMP)

# promtool (Debian's prometheus package) checks the alerting rules in docs/prometheus.
# Best effort: where it cannot be installed, those tests skip and say why.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } || \
	  echo "promtool unavailable: the alert-rule tests will be skipped"

run: venv
	$(PYTHON) -m example_app

test: venv promtool
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff check --fix $(SOURCES)
	$(VENV)/bin/ruff format $(SOURCES)

# wrk (the HTTP load generator) and valgrind (instruction counts), from Debian's packages.
# Best effort: without wrk the HTTP comparison uses a Python load generator, without
# valgrind the instruction counts are reported as not measured.
bench-tools:
	@{ command -v wrk >/dev/null 2>&1 && command -v valgrind >/dev/null 2>&1; } || { \
	  command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends wrk valgrind >/dev/null 2>&1; } || \
	  echo "wrk or valgrind unavailable: see benchmarks/README.md"

bench: venv bench-tools
	$(PYTHON) -m benchmarks

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
