# The two entry points of the README. Both do all set-up first (tools/setup.sh, idempotent).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test

setup:
	@bash tools/setup.sh

DEMO ?= runs/demo-fashion-mnist

# Until dump-teacher/train-student land, the demo prepares the real Fashion-MNIST and previews views.
demo: setup
	$(VENV)/bin/kdcache prepare fashion-mnist --out $(DEMO)/data
	$(VENV)/bin/kdcache info $(DEMO)/data
	$(VENV)/bin/kdcache preview $(DEMO)/data --samples 8 --seeds 4 --scale 0.35 1 --out $(DEMO)/views.png

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
