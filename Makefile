# The two commands: `make demo` and `make test`.  Both do all set-up first.
VENV ?= .venv

.PHONY: demo test setup lint bench

setup:
	VENV=$(VENV) scripts/setup.sh

demo: setup
	$(VENV)/bin/bootherd demo

test: setup
	VENV=$(VENV) scripts/test.sh

lint: setup
	$(VENV)/bin/ruff check src tests bench
