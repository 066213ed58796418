# The two entry points of the README. Both do all set-up first (tools/setup.sh, idempotent).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test

setup:
	@bash tools/setup.sh

# The demo: real Fashion-MNIST -> teacher -> dump-teacher -> three students -> report (runs/demo-fashion-mnist/)
demo: setup
	$(VENV)/bin/kdcache run pipelines/demo-fashion-mnist.toml

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
