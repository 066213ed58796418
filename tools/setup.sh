#!/usr/bin/env bash
# Sets up everything kdcache needs on a fresh Debian machine, idempotently: a second run installs nothing.
#   Debian packages -> .venv -> torch/torchvision (pinned, from local disk) -> ffcv (no deps) -> kdcache[test]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KDCACHE_VENV:-.venv}
PY=${PYTHON:-python3}
DEBS="pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist g++"
TORCH="torch==2.14.1 torchvision==0.29.1"
FFCV="ffcv==1.0.2"

missing=""
for p in $DEBS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
# pip's noise filtered: this disk's index warnings, and the expected "ffcv requires opencv-python" (see below)
pip() {
  local out rc=0
  out=$("$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v -e "is ignored: it is neither" -e "ffcv 1.0.2 requires opencv-python" \
    -e "dependency resolver does not currently" -e '^$' >&2 || true
  return $rc
}

if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  echo "setup: installing $TORCH"
  pip install $TORCH
fi

# ffcv 1.0.2 is an sdist that needs numpy/numba/torch at build time and declares opencv-python
# (which fights opencv-python-headless for cv2), so it is built without isolation and without deps;
# its real runtime deps are listed in setup.cfg.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('ffcv') != '1.0.2')" 2>/dev/null; then
  echo "setup: building $FFCV"
  pip install wheel setuptools numpy numba
  pip install --no-deps --no-build-isolation $FFCV
fi

stamp="$VENV/.kdcache-setup"
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing kdcache and its dependencies"
  pip install -e ".[test]"
  "$VENV/bin/python" -c "import kdcache, ffcv, zarr, timm, webdataset, cv2" 
  echo "$want" > "$stamp"
fi
