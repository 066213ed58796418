"""`kdcache run`: a whole pipeline from a recipe, steps skipped when complete, failures named, resumed;
harmless changes keep every output, the cache grows with new seeds, meaningful changes are refused, never
deleted; the pipeline calls the library, not cli.py."""

import contextlib
import json
import re
import warnings
from pathlib import Path

import pytest

from conftest import kdcache

RECIPE = """
name = "tiny"
seed = {seed}
{students}
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
eval-every = {eval_every}
no-progress = true
"""


def _recipe(path: Path, student="test_resnet", epochs=1, eval_every=1, students=None, seed=0) -> Path:
    path.write_text(RECIPE.format(student=student, epochs=epochs, eval_every=eval_every, seed=seed,
                                  students="" if students is None else f"students = {students!r}"))
    return path


def _files(root: Path) -> dict:
    """path -> (bytes, mtime) of every file under root."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_recipe_end_to_end_then_skip_and_rerun_changed_steps(tmp_path):
    """One pipeline run serves every step below (each run prepares, trains a teacher and dumps: shared here)."""
    out = tmp_path / "run"
    # a failed step is named, and the next run resumes there (prepare, teacher and dump are not done again)
    recipe = _recipe(tmp_path / "tiny.toml", student="no_such_model")
    proc = kdcache("run", recipe, "--out", out, check=False)
    assert proc.returncode == 2 and "step 'student-none' failed" in proc.stderr and "no_such_model" in proc.stderr
    steps = json.loads((out / "steps.json").read_text())
    assert set(steps) == {"prepare", "teacher", "dump"}
    _recipe(recipe)
    first = kdcache("run", recipe, "--out", out)
    for step in ("prepare", "teacher", "dump"):
        assert f"{step}: up to date, skipped" in first.stderr
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
    assert "One student seed per way" in report and "cannot be told from seed-to-seed noise" in report
    assert all(len(s["runs"]) == 1 and s["runs"][0]["seed"] == 0 for s in summary["students"].values())

    # a second student seed: the first seed's runs are kept (skipped), each way is trained once more, and the
    # report gives each way's mean over its runs and says whether the differences exceed the seed spread
    seed0 = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    _recipe(recipe, seed=[0, 1])
    two = kdcache("run", recipe, "--out", out)
    for step in ("prepare", "teacher", "dump", "student-none", "student-online", "student-cache"):
        assert f"{step}: up to date, skipped" in two.stderr
    for mode in ("none", "online", "cache"):
        assert f"student-{mode}-seed1: running" in two.stderr
        assert json.loads((out / "students" / f"{mode}-seed1" / "config.json").read_text())["seed"] == 1
    assert {p: v for p, v in ((p, p.stat().st_mtime_ns) for p in out.rglob("*.safetensors")) if p in seed0} == seed0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    for mode, s in summary["students"].items():
        runs = s["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        assert [r["run"] for r in runs] == [f"students/{mode}", f"students/{mode}-seed1"]
        finals = [json.loads((out / r["run"] / "summary.json").read_text())["final_top1"] for r in runs]
        assert [r["val_top1"] for r in runs] == finals
        assert s["val_top1"] == pytest.approx(sum(finals) / 2, abs=1e-4)           # (rounded to 4 decimals)
        assert s["val_top1_spread"] == pytest.approx(max(finals) - min(finals), abs=1e-4)
    comparisons = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    assert set(comparisons) == {("cache", "online"), ("cache", "none"), ("online", "none")}
    c = comparisons[("cache", "online")]
    st = summary["students"]
    assert c["diff"] == pytest.approx(st["cache"]["val_top1"] - st["online"]["val_top1"])
    assert c["exceeds"] == (abs(c["diff"]) > max(st["cache"]["val_top1_spread"], st["online"]["val_top1_spread"]))
    report = (out / "report.md").read_text()
    assert "One student seed per way" not in report
    assert f"| cache | {st['cache']['val_top1']:.2f} ± {st['cache']['val_top1_spread'] / 2:.2f} |" in report
    assert ("exceeds the seed spread" if c["exceeds"] else "within the seed spread") in \
        next(line for line in report.splitlines() if "cached vs online KD" in line)

    # the same command again: every step is up to date, nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = kdcache("run", recipe, "--out", out)
    for step in ("prepare", "teacher", "dump", "student-none", "student-online", "student-cache",
                 "student-none-seed1", "student-online-seed1", "student-cache-seed1"):
        assert f"{step}: up to date, skipped" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes
    _recipe(recipe)

    # harmless settings (eval-every, workers, log-interval) are not in a run's key: nothing is retrained
    _recipe(recipe, eval_every=2)
    harmless = kdcache("run", recipe, "--out", out)
    for step in ("prepare", "teacher", "dump", "student-none", "student-online", "student-cache"):
        assert f"{step}: up to date, skipped" in harmless.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes

    # an interrupted student resumes from its last checkpoint (here: the last epoch is done, nothing to train)
    cache_run = out / "students" / "cache"
    (cache_run / "summary.json").unlink()
    (cache_run / "model.safetensors").unlink()
    last = (cache_run / "last.pt").stat().st_mtime_ns
    resumed = kdcache("run", recipe, "--out", out)
    assert "student-cache: resuming" in resumed.stderr and "student-online: up to date, skipped" in resumed.stderr
    assert (cache_run / "summary.json").is_file() and (cache_run / "last.pt").stat().st_mtime_ns == last
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    # a meaningful change (epochs) is refused, naming the setting, old and new; nothing is deleted
    students = _files(out / "students")
    _recipe(recipe, epochs=2)
    refused = kdcache("run", recipe, "--out", out, check=False)
    assert refused.returncode == 2 and "step 'student-none' failed" in refused.stderr
    assert "epochs: 1 -> 2" in refused.stderr and "move it away" in refused.stderr
    assert _files(out / "students") == students

    # moved away, the run is trained anew with the new settings; the old one is kept where it was moved
    cache_run.rename(out / "students" / "cache.old")
    _recipe(recipe, epochs=2, students=["cache"])
    changed = kdcache("run", recipe, "--out", out)
    for step in ("prepare", "teacher", "dump"):
        assert f"{step}: up to date, skipped" in changed.stderr
    assert "student-cache: running" in changed.stderr
    assert json.loads((out / "summary.json").read_text())["students"]["cache"]["epochs"] == 2
    assert json.loads((out / "students" / "cache.old" / "summary.json").read_text())["epochs"] == 1
    teacher = out / "teacher" / "model.safetensors"
    assert teacher.stat().st_mtime_ns == mtimes[teacher]


DUMP_RECIPE = """
name = "dump-only"
students = []
[prepare]
source = "fashion-mnist"
limit = 300
[teacher]
model = "resnet10t"
checkpoint = "{weights}"
[dump]
seeds = "{seeds}"
topk = {topk}
unit-size = 128
batch-size = {batch}
no-progress = true
[student]
model = "test_resnet"
epochs = 1
"""


def test_dump_keeps_the_cache_when_harmless_settings_change_and_extends_its_seeds(tmp_path, random_teacher,
                                                                                 monkeypatch):
    """A different batch size, a touched weights file and more seeds: the cache's units stay as they are, the
    new seed is added. Another teacher (other weights) or another top-k: refused by name, the cache intact."""
    import os
    import shutil
    import safetensors.torch
    from kdcache import cli
    from kdcache.models import ModelSpec, build_model
    for command in ("prepare", "dump-teacher", "train-student"):  # the pipeline calls the library, not the CLI
        monkeypatch.setitem(cli.COMMANDS, command, lambda args: pytest.fail("kdcache run went through cli.py"))
    weights = tmp_path / "teacher.safetensors"
    shutil.copy(random_teacher[2], weights)
    recipe, out = tmp_path / "dump.toml", tmp_path / "run"

    def write(seeds="0:2", topk=3, batch=64):
        recipe.write_text(DUMP_RECIPE.format(weights=weights, seeds=seeds, topk=topk, batch=batch))

    write()
    kdcache("run", recipe, "--out", out)
    cache = out / "cache"
    units = _files(cache / "units")
    arrays = {p: v for p, v in _files(cache / "seeds").items() if p.name != "zarr.json"}
    assert len(units) == 2 * 3 and arrays

    write(seeds="0:3", batch=32)
    os.utime(weights, (weights.stat().st_atime + 100, weights.stat().st_mtime + 100))
    extended = kdcache("run", recipe, "--out", out)
    assert "dump: running" in extended.stderr
    after = _files(cache / "units")
    assert {p: v for p, v in after.items() if p in units} == units     # not one unit computed again
    assert len(after) == 3 * 3                                          # seed 2 added
    assert all(v == arrays[p] for p, v in _files(cache / "seeds").items() if p in arrays)
    assert json.loads((out / "summary.json").read_text())["cache"]["seeds_complete"] == [0, 1, 2]
    assert "dump: up to date, skipped" in kdcache("run", recipe, "--out", out).stderr

    write(seeds="0:3", topk=4)
    refused = kdcache("run", recipe, "--out", out, check=False)
    assert refused.returncode == 2 and "step 'dump' failed" in refused.stderr and "topk=3" in refused.stderr
    assert f"move {cache} away" in refused.stderr

    write(seeds="0:3")  # the teacher retrained: other weights in the same file
    other, _ = build_model(ModelSpec(name="resnet10t", random_init=True, seed=4), 10)
    safetensors.torch.save_file(other.state_dict(), str(weights))
    refused = kdcache("run", recipe, "--out", out, check=False)
    assert refused.returncode == 2 and "teacher.sha256=" in refused.stderr and f"move {cache} away" in refused.stderr
    assert _files(cache / "units") == after


def test_pipeline_does_not_import_the_cli(tmp_path, fmnist_small):
    """kdcache.pipeline calls the library; cli.py imports the pipeline, never the other way round: a fresh
    interpreter runs the prepare step (on a copy of an already prepared dataset) without importing kdcache.cli."""
    import os
    import shutil
    import subprocess
    import sys
    recipe, out = tmp_path / "r.toml", tmp_path / "run"
    recipe.write_text(RECIPE.format(student="test_resnet", epochs=1, eval_every=1, students="", seed=0)
                      .replace("limit = 300", "limit = 400\nshard-size = 150"))
    shutil.copytree(fmnist_small.root, out / "data")
    code = ("import sys\nfrom kdcache.log import setup_cli_logging\nfrom kdcache.pipeline import Pipeline, load_recipe\n"
            "setup_cli_logging()\n"   # the library logs; a program shows what it chooses (here: as the commands do)
            "p = Pipeline(load_recipe(sys.argv[1]), sys.argv[2])\np.prepare()\n"
            "sys.exit('kdcache.cli' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                    os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, str(recipe), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "already prepared from the same source and settings" in proc.stderr


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[prepare]\nsource = 'fashion-mnist'\n")
    proc = kdcache("run", bad, "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "no [teacher] table" in proc.stderr
    for seed, message in (("[0, 0]", "seed lists a seed twice"), ("'0'", "seed must be an integer or a list"),
                          ("[]", "seed must be an integer or a list"), ("[0, -1]", "seed -1: must be in [0, 4294967295]")):
        bad.write_text(RECIPE.format(student="test_resnet", epochs=1, eval_every=1, students="", seed=seed))
        proc = kdcache("run", bad, "--out", tmp_path / "r", check=False)
        assert proc.returncode == 2 and message in proc.stderr, (seed, proc.stderr)
    for table, line, message in [("student", "eval-evry = 2", "[student]: unknown setting 'eval-evry'"),
                                 ("student", "seed = 3", "[student]: 'seed' cannot be set here"),
                                 ("dump", "batch-size = 'big'", "[dump] batch-size: expected an integer"),
                                 ("prepare", "shuffle-seed = 0", "[prepare]: unknown setting 'shuffle-seed'"),
                                 ("full.student", "epoch = 2",
                                  "[student] with [full.student]: unknown setting 'epoch'")]:
        text = RECIPE.format(student="test_resnet", epochs=1, eval_every=1, students="", seed=0)
        bad.write_text(text.replace(f"[{table}]\n", f"[{table}]\n{line}\n") if f"[{table}]" in text
                       else text + f"[{table}]\n{line}\n")
        proc = kdcache("run", bad, "--out", tmp_path / "r", check=False)
        assert proc.returncode == 2 and message in proc.stderr, (line, proc.stderr)


def test_report_compares_the_ways_against_the_seed_spread():
    """Each way's val top-1 is the mean of its runs; a difference of means exceeds the seed spread only when it
    is larger than the larger max - min of the two ways; with one seed per way nothing is claimed."""
    from kdcache.report import RUN_KEYS, _verdict, compare, way_summary

    def way(*top1):
        return way_summary([{"seed": s, **{k: 1.0 for k in RUN_KEYS}, "val_top1": v} for s, v in enumerate(top1)])

    students = {"none": way(79.5, 80.1), "online": way(81.3, 81.7), "cache": way(81.6, 81.5)}
    assert students["none"]["val_top1"] == pytest.approx(79.8) and students["cache"]["val_top1"] == pytest.approx(81.55)
    assert students["none"]["val_top1_spread"] == pytest.approx(0.6) and students["none"]["seeds"] == [0, 1]
    c = {(c["a"], c["b"]): c for c in compare(students)}
    assert c[("cache", "online")]["diff"] == pytest.approx(0.05) and c[("cache", "online")]["spread"] == pytest.approx(0.4)
    assert c[("cache", "online")]["exceeds"] is False
    assert c[("cache", "online")]["per_seed"] == pytest.approx({0: 0.3, 1: -0.2})
    assert c[("cache", "none")]["exceeds"] is True and c[("online", "none")]["exceeds"] is True
    assert "within the seed spread" in _verdict(c[("cache", "online")])
    assert "exceeds the seed spread" in _verdict(c[("cache", "none")])
    # a difference as large as the spread is not more than it
    c = compare({"none": way(80.0, 80.5), "online": way(80.5, 81.0)})
    assert c[0]["diff"] == c[0]["spread"] == 0.5 and c[0]["exceeds"] is False
    c = compare({"none": way(80.0, 80.2), "online": way(81.0, 81.5)})
    assert c[0]["exceeds"] is True
    # one seed: no verdict
    c = compare({"none": way(80.0), "cache": way(85.0)})
    assert c[0]["exceeds"] is None and "cannot be told from seed-to-seed noise" in _verdict(c[0])


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parent.parent.glob("pipelines/*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    """Every recipe in pipelines/ loads (both variants): its tables' keys are options of their commands,
    and each table means what the same options mean to the command line."""
    from test_options import _argv
    from kdcache import options
    from kdcache.cli import build_parser
    from kdcache.pipeline import load_recipe
    from kdcache.pipeline import student_seeds
    for full in (False, True):
        r = load_recipe(recipe, full=full)
        if recipe.name.startswith("demo-"):  # the demos' reports weigh the ways' differences against the seed spread
            assert len(student_seeds(r.get("seed", 0))) >= 2
        parser = build_parser()
        for table, command in (("student", "train-student"), ("teacher", "train-student"), ("dump", "dump-teacher")):
            if "checkpoint" in r[table]:
                continue
            ns = options.table_options(command, r[table], f"[{table}]")
            base = {"train-student": ["--data", "d", "--out", "o", "--kd", "none"],
                    "dump-teacher": ["--data", "d", "--out", "o"]}
            parsed = parser.parse_args([command, *base[command], *_argv(r[table])])
            assert {k: getattr(ns, k.replace("-", "_")) for k in r[table]} == \
                   {k: getattr(parsed, k.replace("-", "_")) for k in r[table]}


def test_every_step_prints_progress_lines_with_rate_and_eta_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    """`make demo | tee demo.log`, CI: no terminal, so no tqdm bar; each step prints plain lines with its
    rate and ETA (here at every update: KDCACHE_PROGRESS_INTERVAL=0), and no carriage returns."""
    monkeypatch.setenv("KDCACHE_PROGRESS_INTERVAL", "0")
    recipe = _recipe(tmp_path / "tiny.toml", students=["cache"])
    recipe.write_text(recipe.read_text().replace("no-progress = true\n", ""))
    err = kdcache("run", recipe, "--out", tmp_path / "run").stderr
    assert "\r" not in err
    for line in (r"prepare train: \d+/300 img, \d+ img/s, ETA \d", r"teacher: epoch 1/1: \d+/256 img, \d+ img/s, ETA \d",
                 r"dump rank 0: \d+/600 views, \d+ img/s, \d+ view/s, ETA \d",
                 r"cache: epoch 1/1: \d+/256 img, \d+ img/s, ETA \d"):
        assert re.search(line, err), f"no line like {line!r} in:\n{err}"

    # --no-progress (no-progress = true in a recipe): none of them
    run = tmp_path / "run"
    quiet = kdcache("dump-teacher", "--data", run / "data", "--out", tmp_path / "quiet", "--seeds", "0:2", "--topk", 3,
                    "--teacher", "resnet10t", "--teacher-checkpoint", run / "teacher" / "model.safetensors",
                    "--no-progress")
    assert "600 views written" in quiet.stdout
    assert "dump rank 0" not in quiet.stderr and "ETA" not in quiet.stderr, quiet.stderr


# the keys kdcache run recorded for these settings before the options were declared once and --seed renamed
# (computed with kdcache 8a6c448's pipeline): a run directory made then resumes, nothing is redone
RECORDED_KEYS = {"prepare": "cfd621670717629d", "dump": "fd51a66296166535", "student-none": "499d18d27e4031ce",
                 "student-online": "923d0da1b72d01a8"}


@pytest.mark.parametrize("global_seed", [{"seed": 7}, {"view-global-seed": 7}], ids=["former --seed", "renamed"])
def test_step_keys_of_existing_run_directories_do_not_change(global_seed):
    from kdcache import options
    from kdcache.pipeline import PATHS, _key, dump_identity, run_settings
    from kdcache.student.config import TrainConfig
    from kdcache.teacher.config import DumpConfig
    teacher = {"name": "resnet10t", "sha256": "0" * 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    keys = {}
    ns = options.table_options("prepare", {"limit": 300, "workers": 2}, "[prepare]", source="fashion-mnist")
    ns.out = "/x/data"
    skip = set(options.harmless_fields("prepare", "fashion-mnist")) | set(PATHS)
    keys["prepare"] = _key("prepare", {k: v for k, v in vars(ns).items() if k not in skip})
    dump = {"seeds": "0:3", "topk": 3, "unit-size": 128, "batch-size": 64, "no-progress": True, **global_seed,
            "aa": "rand-m5-mstd0.5", "mixup": 0.2, "scale": [0.35, 1], "size": 32}
    with pytest.warns(FutureWarning) if "seed" in global_seed else _no_warning():
        ns = options.table_options("dump-teacher", dump, "[dump]")
    ns.data, ns.out, ns.teacher, ns.teacher_checkpoint = "/x/data", "/x/cache", "resnet10t", "/x/t.safetensors"
    cfg = DumpConfig.from_options(ns)
    assert cfg.global_seed == 7 and cfg.teacher.seed == 7
    keys["dump"] = _key("dump", dump_identity(cfg, "f" * 64, teacher))
    student = {"model": "test_resnet", "epochs": 2, "batch-size": 64, "workers": 2, "hard-loss": "ce", "temperature": 2,
               "eval-every": 1, "no-progress": True}
    for mode in ("none", "online"):
        ns = options.table_options("train-student", student, "[student]")
        ns.data, ns.out, ns.seed, ns.kd = "/x/data", "/x/s", 1, mode
        ns.view_global_seed, ns.aa, ns.mixup, ns.scale, ns.view_size = 7, "rand-m5-mstd0.5", 0.2, [0.35, 1.0], 32
        if mode == "online":
            ns.teacher, ns.teacher_checkpoint = "resnet10t", "/x/t.safetensors"
        upstream = {"dataset": "f" * 64, **({"teacher-sha256": "0" * 64} if mode == "online" else {})}
        keys[f"student-{mode}"] = _key(f"student-{mode}", run_settings(TrainConfig.from_options(ns), upstream))
    assert keys == RECORDED_KEYS


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        yield
