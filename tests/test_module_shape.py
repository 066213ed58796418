"""tools/module_shape.py: no import circle between kdcache's modules, and a check that can fail."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "module_shape.py"


def _tool():
    spec = importlib.util.spec_from_file_location("module_shape", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_circle_among_module_level_imports():
    shape = _tool()
    _, top, _ = shape.build(ROOT / "kdcache")
    assert shape.strongly_connected(top) == []


def test_no_circle_among_all_imports():
    shape = _tool()
    _, top, inner = shape.build(ROOT / "kdcache")
    assert shape.strongly_connected(shape.merged(top, inner)) == []


def test_no_function_in_kdcache_is_over_80_lines():
    """Issue 19: functions a reader can hold in mind (train_student was 232 lines, dump_teacher 166)."""
    shape = _tool()
    lengths, _, _ = shape.build(ROOT / "kdcache")
    long = [f"{f.module}.{f.name}: {f.length} lines" for f in lengths if f.length > shape.LIMIT]
    assert lengths and not long, long


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_check_fails_on_a_circle_and_on_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    _write(pkg / "__init__.py", "")
    _write(pkg / "a.py", "from pkg.sub import b\n")
    _write(pkg / "sub" / "__init__.py", "")
    _write(pkg / "sub" / "b.py", "from .. import c\n")
    _write(pkg / "c.py", "import pkg.a\nfrom pkg import __name__ as parent  # a parent package: no edge\n")
    _write(pkg / "late.py", "def f():\n    from pkg import a\n")
    body = "".join(f"    x{i} = {i}\n" for i in range(99))
    _write(pkg / "long.py", f"class K:\n    def method(self):\n{body.replace('    ', '        ')}\n"
                            f"def short():\n    return 1\n")
    shape = _tool()
    found, top, inner = shape.build(pkg)
    assert top == {"pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert inner == {"pkg.late": {"pkg.a"}}
    assert shape.strongly_connected(top) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert shape.one_circle(top, ["pkg.a", "pkg.c", "pkg.sub.b"]) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    lengths = {f"{f.module}:{f.name}": f.length for f in found}
    assert lengths == {"pkg.long:K.method": 100, "pkg.long:short": 2, "pkg.late:f": 2}
    proc = subprocess.run([sys.executable, str(TOOL), str(pkg), "--check"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "pkg.long:K.method is 100 lines" in proc.stderr
    assert "module-level import circle: pkg.a -> pkg.sub.b -> pkg.c -> pkg.a" in proc.stderr
    assert "100-119: 1" in proc.stdout and "pkg.long:K.method" in proc.stdout


def test_the_check_passes_on_a_package_without_either(tmp_path):
    pkg = tmp_path / "pkg"
    _write(pkg / "__init__.py", "")
    _write(pkg / "a.py", "from pkg import b\n\ndef f():\n    from pkg import b\n")
    _write(pkg / "b.py", "import os\n")
    proc = subprocess.run([sys.executable, str(TOOL), str(pkg), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "circles (module-level imports): none" in proc.stdout
