"""`kdcache run`: a whole pipeline from a recipe, steps skipped when complete, failures named, resumed."""

import json
from pathlib import Path

import pytest

from conftest import kdcache

RECIPE = """
name = "tiny"
seed = 0
[prepare]
source = "fashion-mnist"
limit = 300
[teacher]
model = "resnet10t"
epochs = 1
batch-size = 64
workers = 2
no-progress = true
[dump]
seeds = "0:2"
topk = 3
unit-size = 128
no-progress = true
[student]
model = "{student}"
epochs = {epochs}
batch-size = 64
workers = 2
hard-loss = "ce"
temperature = 2
no-progress = true
"""


def _recipe(path: Path, student="test_resnet", epochs=1) -> Path:
    path.write_text(RECIPE.format(student=student, epochs=epochs))
    return path


def test_run_recipe_end_to_end_then_skip_and_rerun_changed_steps(tmp_path):
    recipe = _recipe(tmp_path / "tiny.toml")
    out = tmp_path / "run"
    first = kdcache("run", recipe, "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["students"]) == {"none", "online", "cache"}
    for mode, s in summary["students"].items():
        assert 0 <= s["val_top1"] <= 100 and s["epoch_time_s"] > 0
    assert summary["teacher"]["val_top1"] is not None and summary["cache"]["seeds_complete"] == [0, 1]
    assert summary["students"]["online"]["teacher_forward_s_per_epoch"] > 0
    for name in ("report.md", "students.png", "views.png", "steps.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| cache |" in report and "| online |" in report and "| none |" in report
    assert "| student | val top-1" in first.stdout

    # the same command again: every step is up to date, nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = kdcache("run", recipe, "--out", out)
    for step in ("prepare", "teacher", "dump", "student-none", "student-online", "student-cache"):
        assert f"{step}: up to date, skipped" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes

    # a changed student recipe re-runs the students only
    _recipe(recipe, epochs=2)
    changed = kdcache("run", recipe, "--out", out)
    for step in ("prepare", "teacher", "dump"):
        assert f"{step}: up to date, skipped" in changed.stderr
    assert "student-cache: running" in changed.stderr
    assert json.loads((out / "summary.json").read_text())["students"]["cache"]["epochs"] == 2
    teacher = out / "teacher" / "model.safetensors"
    assert teacher.stat().st_mtime_ns == mtimes[teacher]


def test_failed_step_is_named_and_the_next_run_resumes_there(tmp_path):
    recipe = _recipe(tmp_path / "tiny.toml", student="no_such_model")
    out = tmp_path / "run"
    proc = kdcache("run", recipe, "--out", out, check=False)
    assert proc.returncode == 2 and "step 'student-none' failed" in proc.stderr and "no_such_model" in proc.stderr
    steps = json.loads((out / "steps.json").read_text())
    assert set(steps) == {"prepare", "teacher", "dump"}
    _recipe(recipe, student="test_resnet")
    fixed = kdcache("run", recipe, "--out", out)
    for step in ("prepare", "teacher", "dump"):
        assert f"{step}: up to date, skipped" in fixed.stderr
    assert (out / "report.md").is_file()


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[prepare]\nsource = 'fashion-mnist'\n")
    proc = kdcache("run", bad, "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "no [dump] table" in proc.stderr


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parent.parent.glob("pipelines/*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    """Every recipe in pipelines/ loads (both variants) and its train-student options exist."""
    from kdcache.cli import build_parser
    from kdcache.pipeline import _options, load_recipe
    for full in (False, True):
        r = load_recipe(recipe, full=full)
        parser = build_parser()
        for table, command in (("student", "train-student"), ("teacher", "train-student"), ("dump", "dump-teacher")):
            if table not in r or "checkpoint" in r.get(table, {}):
                continue
            base = {"train-student": ["--data", "d", "--out", "o", "--kd", "none"],
                    "dump-teacher": ["--data", "d", "--out", "o", "--random-teacher", "--teacher", "resnet50"]}[command]
            extra = ["--seeds", "0:1"] if command == "dump-teacher" and "seeds" not in r[table] else []
            parser.parse_args([command, *base, *extra, *_options(r[table])])
