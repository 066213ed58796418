# Source this from the repository root on the offline GPU machine:   source tools/device_env.sh
#
# Installs the wheels of .devbundle/ (built by tools/device_bundle.sh) into $DEVBUNDLE_SITE (default /tmp/site)
# with pip --no-index, once: a stamp (wheel checksums + interpreter) makes a second source skip the install.
# Then puts that folder and the repository root first on PYTHONPATH, so `import kdcache` works without
# installing it, and checks that kdcache, ffcv (with its C extension), zarr, webdataset and numcodecs import.
# Returns non-zero, saying why, when anything is missing. LD_LIBRARY_PATH is left alone: the ffcv extension
# finds its vendored libturbojpeg/libtbb through its RPATH ($ORIGIN/../ffcv.libs).
#   DEVBUNDLE_SITE=/some/dir   install elsewhere (e.g. if /tmp is mounted noexec: the .so files must load)
#   DEVBUNDLE_PYTHON=python3   the interpreter (must be CPython 3.12: the bundle holds cp312 wheels)

_kdcache_device_env() {  # $1 = force: reinstall even when the stamp matches
  local force=${1:-} root site py whl stamp want need f tmp out
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  site=${DEVBUNDLE_SITE:-/tmp/site}
  py=${DEVBUNDLE_PYTHON:-python3}
  whl=$root/.devbundle/whl

  if ! ls "$whl"/ffcv-*.whl >/dev/null 2>&1; then
    echo "device_env: ERROR: no bundle in $whl (build it with tools/device_bundle.sh on a machine with network)" >&2
    return 1
  fi
  if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    echo "device_env: ERROR: $(command -v "$py" || echo "$py") is not CPython 3.12; the bundle is built for cp312" >&2
    return 1
  fi

  # Fallback wheels only where the machine's own environment lacks them (or has them too old for zarr).
  need=$(env -u PYTHONPATH "$py" - <<'EOF'
import importlib.metadata as md, re
def ver(name):
    try:
        return tuple(int(x) for x in re.findall(r"\d+", md.version(name))[:2])
    except Exception:
        return None
need = []
try:
    import yaml  # noqa: F401
except Exception:
    need.append("pyyaml")
if (ver("packaging") or (0,)) < (22, 0):
    need.append("packaging")
if (ver("typing_extensions") or (0,)) < (4, 12):
    need.append("typing_extensions")
print(" ".join(need))
EOF
  ) || { echo "device_env: ERROR: $py failed to run" >&2; return 1; }
  local -a wheels=("$whl"/*.whl)
  for f in $need; do wheels+=("$whl"/fallback/"$f"-*.whl); done

  want=$( { sha256sum "${wheels[@]}" | sed "s|  .*/|  |"; "$py" -VV; echo "$site"; } | sha256sum | cut -c1-32)
  stamp=$site/.kdcache-devbundle
  if [ -n "$force" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    _kdcache_device_env_installed=1
    echo "device_env: installing ${#wheels[@]} wheels into $site${need:+ (with fallback: $need)}" >&2
    tmp=$site.tmp.$$
    rm -rf "$tmp" && mkdir -p "$tmp" || return 1
    if "$py" -m pip --version >/dev/null 2>&1; then
      out=$("$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check --target "$tmp" "${wheels[@]}" 2>&1) \
        || { printf '%s\n' "$out" >&2; echo "device_env: ERROR: pip install failed" >&2; rm -rf "$tmp"; return 1; }
    else  # no pip in this interpreter: a wheel is a zip whose root is the site-packages layout
      "$py" - "$tmp" "${wheels[@]}" <<'EOF' || { echo "device_env: ERROR: unpacking wheels failed" >&2; rm -rf "$tmp"; return 1; }
import sys, zipfile
dest = sys.argv[1]
for w in sys.argv[2:]:
    with zipfile.ZipFile(w) as z:
        if any(n.split("/")[0].endswith(".data") for n in z.namelist()):
            sys.exit(f"{w}: has a .data directory; install pip to install it")
        z.extractall(dest)
EOF
    fi
    echo "$want" > "$tmp/.kdcache-devbundle"
    rm -rf "$site" && mv "$tmp" "$site" || return 1
  fi

  # PYTHONPATH = site : repo root : whatever was there before (without duplicates, so re-sourcing is a no-op)
  local p rest=""
  local IFS=:
  for p in ${PYTHONPATH:-}; do
    [ -n "$p" ] && [ "$p" != "$site" ] && [ "$p" != "$root" ] && rest="$rest:$p"
  done
  unset IFS
  export PYTHONPATH="$site:$root$rest"

  if ! out=$(cd "$root" && "$py" -c '
import kdcache, ffcv, zarr, webdataset, numcodecs
from ffcv.libffcv import imdecode
import importlib.metadata as md, os, sys
site = os.path.realpath(sys.argv[1])
for m in (ffcv, zarr, webdataset, numcodecs):
    if not os.path.realpath(m.__file__).startswith(site + os.sep):
        sys.exit(f"{m.__name__} was imported from {m.__file__}, not from {site}")
v = {d: md.version(d) for d in ("ffcv", "zarr", "numcodecs", "webdataset")}
print(f"kdcache {kdcache.__version__} from {os.path.dirname(kdcache.__file__)}; "
      + ", ".join(f"{d} {x}" for d, x in v.items()) + f" from {site}")
' "$site" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "device_env: ERROR: the bundle does not import (PYTHONPATH=$PYTHONPATH)" >&2
    _kdcache_device_env_check_failed=1
    return 1
  fi
  echo "device_env: ok: $out" >&2
}

_kdcache_device_env_installed=0 _kdcache_device_env_check_failed=0
_kdcache_device_env
_kdcache_device_env_rc=$?
if [ $_kdcache_device_env_rc -ne 0 ] && [ $_kdcache_device_env_check_failed = 1 ] && [ $_kdcache_device_env_installed = 0 ]; then
  echo "device_env: reinstalling (the installed copy was stamped as complete) and checking again" >&2
  _kdcache_device_env force
  _kdcache_device_env_rc=$?
fi
unset _kdcache_device_env_installed _kdcache_device_env_check_failed
unset -f _kdcache_device_env
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ $_kdcache_device_env_rc -eq 0 ]; then
  echo "device_env: note: this script was run, not sourced: PYTHONPATH is not kept (use: source tools/device_env.sh)" >&2
fi
if [ $_kdcache_device_env_rc -ne 0 ]; then
  echo "device_env: FAILED" >&2
fi
return $_kdcache_device_env_rc 2>/dev/null || exit $_kdcache_device_env_rc
