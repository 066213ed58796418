# The two entry points of the README. Both do all set-up first (tools/setup.sh, idempotent).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test test-avx2

setup:
	@bash tools/setup.sh

# The demo: real Fashion-MNIST -> teacher -> dump-teacher -> three students -> report (runs/demo-fashion-mnist/)
demo: setup
	$(VENV)/bin/kdcache run pipelines/demo-fashion-mnist.toml

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The suite as an AVX2-only machine of this kind runs it (oneDNN, ATen, numba, OpenCV and numpy without
# their AVX-512 paths: tools/calibrate.py AVX2_ENV); numerically sensitive tests must pass both ways.
test-avx2: setup
	eval "$$($(VENV)/bin/python tools/calibrate.py --avx2-env)" && $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
