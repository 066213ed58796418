"""The public surface (kdcache.__all__, docs/api.md) and the proof that it is complete: the commands
dump-teacher, train-student, verify and run are built on it alone."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import kdcache

ROOT = Path(__file__).resolve().parent.parent
# Modules the commands may use besides `kdcache` itself: the option declarations they parse with, the
# error type, the writers, the seed ranges and the log handler they print with; `kdcache run` is the
# pipeline (checked here) with its report (kdcache.report: it reads the students' logs and renders the
# preview, the run's own output, not a use of the library).
UTILITY_MODULES = {"kdcache.options", "kdcache.option", "kdcache.errors", "kdcache.files", "kdcache.seeds",
                   "kdcache.log"}
RUN_LAYER = {"kdcache.pipeline", "kdcache.report"}


def _kdcache_imports(node):
    """(module, names) of every kdcache import inside `node` (module-level and inside functions)."""
    found = []
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "kdcache":
            found.append((n.module, [a.name for a in n.names]))
        elif isinstance(n, ast.Import):
            found += [(a.name, []) for a in n.names if a.name.split(".")[0] == "kdcache"]
    return found


def _non_public(imports, allowed_modules):
    bad = []
    for module, names in imports:
        if module == "kdcache":
            bad += [f"kdcache.{n}" for n in names if n not in kdcache.__all__ and f"kdcache.{n}" not in allowed_modules]
        elif module not in allowed_modules:
            bad.append(module)
    return bad


def test_every_public_name_resolves_and_import_kdcache_loads_no_torch():
    for name in kdcache.__all__:
        assert getattr(kdcache, name) is not None, name
    assert sorted(dir(kdcache)) == sorted(kdcache.__all__)
    code = "import sys, kdcache; print('torch' in sys.modules, 'ffcv' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_an_unknown_name_is_an_attribute_error():
    try:
        kdcache.open_cahce
    except AttributeError as exc:
        assert "open_cahce" in str(exc)
    else:
        raise AssertionError("kdcache.open_cahce resolved")


def test_docs_api_documents_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in kdcache.__all__ if n != "__version__" and not re.search(rf"\b{re.escape(n)}\b", text)]
    assert not missing, f"docs/api.md does not mention {missing}"


def test_the_commands_dump_train_verify_and_run_use_public_names_only():
    cli = ast.parse((ROOT / "kdcache" / "cli.py").read_text())
    commands = {f.name: f for f in cli.body if isinstance(f, ast.FunctionDef)}
    bad = {}
    for name in ("_cmd_dump", "_cmd_train", "_cmd_verify", "_cmd_run", "_cmd_copy"):
        imports = _kdcache_imports(commands[name])
        assert imports, f"{name} imports nothing from kdcache: the check would prove nothing"
        bad[name] = _non_public(imports, UTILITY_MODULES | RUN_LAYER)
    for module in ("kdcache.pipeline",):
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        bad[module] = _non_public(_kdcache_imports(tree), UTILITY_MODULES | RUN_LAYER)
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}


def test_the_check_catches_an_internal_import():
    tree = ast.parse("def f():\n    from kdcache.teacher.dump import dump_teacher\n    from kdcache import open_cahce\n")
    assert _non_public(_kdcache_imports(tree), UTILITY_MODULES) == ["kdcache.teacher.dump", "kdcache.open_cahce"]
