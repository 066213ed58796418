"""dump-teacher: cache contents, verify, resume after kill -9, torchrun, extension, compatibility."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import kdcache, reseal_markers
from kdcache.augment import ViewRecipe, view_params
from kdcache.augment.render import decode_jpeg, render_views
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.data import sources
from kdcache.data.prepare import prepare
from kdcache.models import ModelSpec, Normalize, build_model, weights_sha256

ARRAYS = ("logp", "indices", "log_tail", "params")
DUMP = ["--teacher", "resnet10t", "--random-teacher", "--topk", 5, "--unit-size", 256, "--no-progress"]


def dump_args(data, out, seeds, *extra):
    return ["dump-teacher", "--data", str(data), "--out", str(out), "--seeds", seeds, *map(str, DUMP), *map(str, extra)]


def dump_cmd(data, out, seeds, *extra):
    return [sys.executable, "-m", "kdcache", *dump_args(data, out, seeds, *extra)]


def read_all(path):
    root = zarr.open_group(str(path), mode="r")
    return {(s, a): root[f"seeds/{s:06d}/{a}"][...] for s in sorted(int(k) for k in root["seeds"].group_keys()) for a in ARRAYS}


@pytest.fixture(scope="session")
def clean_cache(fm2000, tmp_path_factory):
    """Fashion-MNIST --limit 2000, random-weight resnet10t, seeds 0:6, k = 5, one run, no interruption (in this
    process: the same thread counts as a `python -m kdcache` child, so the kill -9 test compares exactly)."""
    out = tmp_path_factory.mktemp("cache") / "clean"
    proc = kdcache(*dump_args(fm2000.root, out, "0:6"))
    assert "12000 views written" in proc.stdout and "seeds complete 0:6" in proc.stdout
    return out


def test_info_json_describes_the_cache(clean_cache, fm2000):
    info = json.loads(kdcache("info", clean_cache, "--json").stdout)
    assert info["kind"] == "cache" and info["num_samples"] == 2000 and info["num_classes"] == 10 and info["topk"] == 5
    assert info["seeds_complete"] == [0, 1, 2, 3, 4, 5]
    model, tinfo = build_model(ModelSpec(name="resnet10t", random_init=True, seed=0), 10)
    assert info["teacher"]["name"] == "resnet10t" and info["teacher"]["sha256"] == tinfo["sha256"]
    assert info["dataset_fingerprint"] == fm2000.fingerprint
    assert 0 < info["bytes_per_view"] < info["raw_bytes_per_view"] == 5 * (2 + 2) + 4 + 20
    # teacher top-1 per seed: the summary equals the labels against the stored top-1 classes
    labels = fm2000.split("train").labels
    cache = TeacherCache.open(clean_cache)
    for s in range(6):
        top1 = read_slab(cache, s).indices[:, 0]
        assert info["seed_summary"][str(s)]["teacher_top1"] == pytest.approx((top1 == labels).mean())
    assert "seeds     complete [0, 1, 2, 3, 4, 5]" in kdcache("info", clean_cache).stdout


def test_verify_replay_matches_the_teacher(clean_cache):
    report = json.loads(kdcache("verify", clean_cache, "--replay", 64, "--json").stdout)
    assert report["complete"] and report["ok"] and not report["problems"]
    r = report["replay"]
    assert r["views"] == 64 and r["precision"] == "fp32" and r["dump_precision"] == ["cpu/off"]
    assert r["thresholds"] == {"min_agreement": 0.999, "max_kl": 1e-4, "max_tail_error": 1e-3}
    assert r["top1_agreement"] >= 0.999
    assert r["replay_kl_mean"] <= 1e-4
    assert r["max_abs_logp_error"] < 1e-3          # uint16 storage: half a step is 1/4096
    assert r["tail_mass_error_max"] < 1e-3


def test_cache_rows_are_the_teacher_on_the_teacher_side_views(clean_cache, fm2000):
    """Independent of verify: rebuild a few views from scratch and compare with the stored rows."""
    cache = TeacherCache.open(clean_cache)
    split = fm2000.split("train")
    model, info = build_model(ModelSpec(name="resnet10t", random_init=True, seed=0), 10)
    norm = Normalize(info["mean"], info["std"])
    recipe = ViewRecipe(size=32)
    idx = np.array([0, 1, 255, 256, 1999])
    for s in (0, 5):
        slab = read_slab(cache, s)
        params = view_params(recipe, 0, s, idx, split.sizes[idx, 0], split.sizes[idx, 1])
        assert np.array_equal(slab.params[idx], params)
        views = np.stack([render_views(decode_jpeg(split.jpeg_reader()[i], 28, 28), params[j], 32)[0] for j, i in enumerate(idx)])
        with torch.inference_mode():
            logits = model(norm(torch.from_numpy(views).permute(0, 3, 1, 2))).float()
        top = torch.log_softmax(logits.double(), 1).topk(5, 1)
        assert np.array_equal(slab.indices[idx], top.indices.numpy())
        np.testing.assert_allclose(slab.logp[idx], top.values.numpy(), atol=1 / 4096 + 1e-5, rtol=0)  # uint16: half a step
        tail = 1 - top.values.exp().sum(1)  # float64 here: the tail is not small for this teacher
        np.testing.assert_allclose(np.exp(slab.log_tail[idx].astype(np.float64)), tail.numpy(), rtol=1e-4)


def _markers(out):
    d = Path(out) / "units"
    return len(list(d.glob("*/*.json"))) if d.is_dir() else 0


def _run_and_kill(cmd, out, when):
    """Start a dump and SIGKILL it when `when(out)` holds; returns the marker count at the kill."""
    log = out.parent / f"{out.name}.stderr"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if when(out):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return _markers(out)
        time.sleep(0.01)
    if proc.returncode is None:
        proc.kill()
        raise AssertionError("dump hung")
    raise AssertionError(f"dump ended (exit {proc.returncode}) before it could be killed:\n{log.read_text()[-3000:]}")


def test_kill9_then_rerun_equals_a_clean_run(clean_cache, fm2000, tmp_path):
    out = tmp_path / "killed"
    cmd = dump_cmd(fm2000.root, out, "0:6")
    total = 6 * 8
    at_create = _run_and_kill(cmd, out, lambda o: (o / "zarr.json").exists())
    # while the first units are being computed and written (claimed, no marker yet)
    in_unit = _run_and_kill(cmd, out, lambda o: any((o / "claims").rglob("*.json")) if (o / "claims").is_dir() else False)
    after_half = _run_and_kill(cmd, out, lambda o: _markers(o) >= total // 2)
    assert at_create <= in_unit < total // 2 <= after_half < total, (at_create, in_unit, after_half)
    kdcache(*dump_args(fm2000.root, out, "0:6"))   # the resume need not be another process: it reads the disk
    assert _markers(out) == total
    clean, resumed = read_all(clean_cache), read_all(out)
    assert clean.keys() == resumed.keys()
    for key in clean:
        assert np.array_equal(clean[key], resumed[key], equal_nan=True), f"{key} differs after kill -9 + resume"
    assert json.loads(kdcache("verify", out, "--json").stdout)["ok"]


def test_two_torchrun_processes_give_the_same_cache(small_cache, fmnist_small, tmp_path):
    """Two units (400 samples, unit size 256): block b goes to rank b mod 2, so each rank writes one."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "kdcache",
           *dump_cmd(fmnist_small.root, out, "0:2")[3:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {json.loads(p.read_text())["rank"] for p in (out / "logs").glob("*.json")}
    assert ranks == {0, 1}
    units = [json.loads(p.read_text())["rank"] for p in (out / "units").glob("*/*.json")]
    assert sorted(units) == [0, 0, 1, 1]
    assert_close_caches(read_all(small_cache), read_all(out))


def assert_close_caches(clean, other):
    """Equal up to what another forward batch or thread count changes: a uint16 step, exact ties, 1e-3."""
    assert clean.keys() == other.keys()
    for (s, a), ref in clean.items():
        got = other[(s, a)]
        if a == "indices":  # identical except exact ties, which may break either way
            diff = np.flatnonzero((got != ref).any(1))
            vals = clean[(s, "logp")]
            for r in diff:
                assert np.unique(vals[r]).size < vals[r].size, f"seed {s} sample {r}: indices differ without a tie"
        elif a == "logp":  # uint16 steps: another summation order may round to the next step
            assert np.abs(got.astype(np.int64) - ref).max() <= 1, f"seed {s}: logp differs"
        else:
            np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def small_cache(fmnist_small, tmp_path_factory):
    """Seeds 0:2 of the 400-sample Fashion-MNIST, dumped once; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("small") / "cache"
    kdcache(*dump_args(fmnist_small.root, out, "0:2"))
    return out


@pytest.fixture
def small_copy(small_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(small_cache, out)
    return out


def test_extending_seeds_leaves_old_seeds_untouched(fmnist_small, small_copy):
    out = small_copy
    old_files = {p: p.read_bytes() for p in (out / "seeds").rglob("*") if p.is_file()}
    reader = TeacherCache.open(out)               # a reader opened before the extension
    before = read_slab(reader, 1)
    proc = kdcache(*dump_args(fmnist_small.root, out, "2:4"))
    assert "seeds complete 0:4" in proc.stdout and "800 views written" in proc.stdout
    assert all(p.read_bytes() == b for p, b in old_files.items()), "extending the cache rewrote old seeds"
    after = read_slab(reader, 1)
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(before[1:], after[1:]))
    assert TeacherCache.open(out).complete_seeds() == [0, 1, 2, 3]
    again = kdcache(*dump_args(fmnist_small.root, out, "0:4"))
    assert "0 views written" in again.stdout and all(p.read_bytes() == b for p, b in old_files.items())


@pytest.mark.parametrize("change,field", [
    (["--topk", "3"], "topk"),
    (["--view-global-seed", "1"], "teacher.sha256"),  # the random teacher's init follows the views' global seed
    (["--teacher-init-seed", "1"], "teacher.sha256"),  # ... unless given its own
    (["--scale", "0.5", "1"], "recipe.scale"),
    (["--renderer", "1"], "recipe.renderer"),      # other pixels: never mixed into one cache
    (["--values-dtype", "float32"], "values_dtype"),
])
def test_incompatible_runs_are_refused_by_name(fmnist_small, small_copy, change, field):
    out = small_copy
    before = read_all(out)
    proc = kdcache(*dump_args(fmnist_small.root, out, "2:3"), *change, check=False)
    assert proc.returncode == 2 and f"cache was made with {field}=" in proc.stderr, proc.stderr
    if field == "recipe.renderer":  # the way to extend it is named
        assert "pass --renderer 2 to extend it" in proc.stderr, proc.stderr
    after = read_all(out)
    assert after.keys() == before.keys() and TeacherCache.open(out).seeds == [0, 1]
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_other_dataset_is_refused(small_copy, tmp_path):
    other = prepare(sources.fashion_mnist(limit=300), tmp_path / "other", workers=1)
    proc = kdcache(*dump_args(other.root, small_copy, "0:1"), check=False)
    assert proc.returncode == 2 and "dataset.split_fingerprint" in proc.stderr


PLAIN_READER = r'''
import json, pathlib, sys, numpy as np, zarr
path, s, i = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
root = zarr.open_group(path, mode="r")
assert root.attrs["format_version"] == 4 and root.attrs["tail_rule"] == "uniform-tail-v2"
spec, enc = root.attrs["spec"], root.attrs["logp_encoding"]
N, C, k = spec["dataset"]["num_samples"], spec["dataset"]["num_classes"], spec["topk"]
assert len(list(pathlib.Path(path, "units", f"{s:06d}").glob("*.json"))) == -(-N // spec["unit_size"])
g = root[f"seeds/{s:06d}"]
logp, indices, log_tail, params = g["logp"][:], g["indices"][:], g["log_tail"][:], g["params"][:]
logp = -logp.astype(np.float64) / enc["scale"] if enc["dtype"] == "uint16" else logp.astype(np.float64)
z = np.full(C, log_tail[i] - np.log(C - k) if k < C else -np.inf)
z[indices[i]] = logp[i]
q = np.exp(z - z.max()); q /= q.sum()
print(json.dumps({"probs": q.tolist(), "indices": indices[i].tolist(), "tail": float(np.exp(log_tail[i])),
                  "params": params[i].tolist()}))
'''


def test_plain_zarr_reader_rebuilds_the_teacher_distribution(fmnist_small, tmp_path):
    """docs/cache-format.md is enough: zarr + numpy only (no kdcache import) recover softmax(teacher):
    exactly with k = C, and with k = 5 < C the stored probabilities and the tail mass."""
    script = tmp_path / "reader.py"
    script.write_text(PLAIN_READER)
    got = {}
    for name, extra in (("exact", ["--values-dtype", "float32", "--topk", "10"]), ("top5", [])):
        kdcache(*dump_args(fmnist_small.root, tmp_path / name, "1:2", *extra))
        got[name] = json.loads(subprocess.run([sys.executable, str(script), str(tmp_path / name), "1", "17"],
                                              capture_output=True, text=True, check=True, cwd=tmp_path).stdout)
    split = fmnist_small.split("train")
    params = view_params(ViewRecipe(size=32), 0, 1, np.array([17]), split.sizes[[17], 0], split.sizes[[17], 1])
    assert np.array_equal(np.float32(got["exact"]["params"]), params[0])
    model, info = build_model(ModelSpec(name="resnet10t", random_init=True, seed=0), 10)
    view = render_views(decode_jpeg(split.jpeg_reader()[17], 28, 28), params, 32)
    with torch.inference_mode():
        logits = model(Normalize(info["mean"], info["std"])(torch.from_numpy(view).permute(0, 3, 1, 2)))[0]
    probs = torch.softmax(logits.double(), 0).numpy()
    np.testing.assert_allclose(got["exact"]["probs"], probs, atol=1e-6)
    top5, stored = got["top5"], np.array(got["top5"]["indices"])
    others = np.setdiff1d(np.arange(10), stored)
    assert np.array_equal(stored, np.argsort(-probs)[:5])
    np.testing.assert_allclose(np.array(top5["probs"])[stored], probs[stored], rtol=1e-3)    # uint16: 2.5e-4 (+ normalisation)
    np.testing.assert_allclose(top5["tail"], probs[others].sum(), rtol=1e-5)                 # stored exactly
    np.testing.assert_allclose(np.array(top5["probs"])[others], probs[others].sum() / 5, rtol=1e-3)


def test_teacher_from_checkpoint_files_and_factories(fmnist_small, tmp_path):
    import safetensors.torch
    model, info = build_model(ModelSpec(name="resnet10t", random_init=True, seed=7), 10)
    sd = model.state_dict()
    safetensors.torch.save_file(sd, str(tmp_path / "t.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "t.pth")
    for ckpt in ("t.safetensors", "t.pth"):
        out = tmp_path / f"c-{ckpt}"
        kdcache("dump-teacher", "--data", fmnist_small.root, "--out", out, "--seeds", "0:1", "--topk", 3,
                "--teacher", "resnet10t", "--teacher-checkpoint", tmp_path / ckpt, "--no-progress")
        assert TeacherCache.open(out).spec.teacher["sha256"] == weights_sha256(model) == info["sha256"]
    # the same random teacher twice has the same weights hash; another seed another one
    again = build_model(ModelSpec(name="resnet10t", random_init=True, seed=7), 10)[1]["sha256"]
    other = build_model(ModelSpec(name="resnet10t", random_init=True, seed=8), 10)[1]["sha256"]
    assert again == info["sha256"] != other
    # a model timm does not have, from a factory (tests/ is on this process's sys.path: tiny_models imports)
    out = tmp_path / "factory"
    kdcache("dump-teacher", "--data", fmnist_small.root, "--out", out, "--seeds", "0:1", "--topk", 2,
            "--teacher-module", "tiny_models:tiny_cnn", "--random-teacher", "--no-progress")
    teacher = TeacherCache.open(out).spec.teacher
    assert teacher["name"] == "tiny_models:tiny_cnn" and teacher["random_init"]
    assert json.loads(kdcache("verify", out, "--replay", 8, "--json", "--teacher-module", "tiny_models:tiny_cnn").stdout)["ok"]
    # no weight source at all: refused, nothing written
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", tmp_path / "none", "--seeds", "0:1",
                   "--teacher", "resnet10t", check=False)
    assert proc.returncode == 2 and "--random-teacher" in proc.stderr and not (tmp_path / "none").exists()
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", tmp_path / "none", "--seeds", "0:1",
                   "--teacher", "resnet10t", "--teacher-checkpoint", tmp_path / "t.pth", "--random-teacher", check=False)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", tmp_path / "none", "--seeds", "0:1",
                   "--teacher", "resnet10t", "--teacher-checkpoint", tmp_path / "missing.pth", check=False)
    assert proc.returncode == 2 and "missing.pth: teacher checkpoint not found" in proc.stderr


def test_verify_replay_fails_on_replay_errors_only_and_names_them(small_copy):
    """A correct top-5-of-10 cache passes (its top-k loss is reported, not failed); a cache whose stored
    values were changed fails, each failed check named."""
    out = small_copy
    report = json.loads(kdcache("verify", out, "--replay", 128, "--json").stdout)
    r = report["replay"]
    assert report["ok"] and report["problems"] == [] and r["precision"] == "fp32"
    assert r["topk_kl_mean"] > r["thresholds"]["max_kl"] > r["replay_kl_mean"]   # the loss that once failed it
    assert "OK" in kdcache("verify", out, "--replay", 16).stdout.splitlines()[0]
    g = zarr.open_group(str(out), mode="r+")
    for s in (0, 1):   # every row: the top class's probability divided by e^0.1, the tail mass doubled
        logp, log_tail = g[f"seeds/{s:06d}/logp"], g[f"seeds/{s:06d}/log_tail"]
        logp[:, 0] = logp[:, 0] + 205
        log_tail[...] = log_tail[...] + np.log(2)
    reseal_markers(out)
    proc = kdcache("verify", out, "--replay", 128, "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and not report["ok"]
    assert any(p.startswith("replay: mean KL(fresh || cached)") for p in report["problems"]), report["problems"]
    assert any(p.startswith("replay: mean relative tail-mass error") for p in report["problems"]), report["problems"]
    assert any("do not sum to 1" in p for p in report["problems"]), report["problems"]
    text = kdcache("verify", out, "--replay", 128, check=False).stdout
    assert text.startswith(f"cache {out}: PROBLEMS") and "problem: replay: mean KL" in text


def test_verify_finds_missing_units_and_bad_rows(small_copy):
    out = small_copy
    assert json.loads(kdcache("verify", out, "--json").stdout)["ok"]
    (out / "units" / "000001" / "000001.json").unlink()
    report = json.loads(kdcache("verify", out, "--json", check=False).stdout)
    assert not report["ok"] and report["missing_units"] == {"1": [1]}
    values = zarr.open_group(str(out), mode="r+")["seeds/000000/log_tail"]
    rows = values[0:256]
    rows[17] = np.nan
    values[0:256] = rows
    reseal_markers(out)
    report = json.loads(kdcache("verify", out, "--json", check=False).stdout)
    assert any("seed 0: 1 rows of log_tail hold NaN/inf (first sample 17)" in p for p in report["problems"])


MARKED_MODULE = """
import pathlib
import torch
pathlib.Path(__file__).with_name("imported.marker").write_text("imported")   # what a hostile module could do


def factory(num_classes):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, num_classes))
"""


def test_verify_imports_a_teacher_module_only_when_the_user_names_it(fmnist_small, tmp_path, monkeypatch):
    """A cache records the module its teacher came from; a shared cache must not make verify import it."""
    (tmp_path / "marked_teacher.py").write_text(MARKED_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))   # the working directory, as `python -m kdcache` has it
    out = tmp_path / "cache"
    kdcache("dump-teacher", "--data", fmnist_small.root, "--out", out, "--seeds", "0:1", "--topk", 2,
            "--teacher-module", "marked_teacher:factory", "--random-teacher", "--no-progress")
    assert TeacherCache.open(out).spec.teacher["module"] == "marked_teacher:factory"
    (tmp_path / "imported.marker").unlink()
    monkeypatch.delitem(sys.modules, "marked_teacher")
    assert json.loads(kdcache("verify", out, "--json").stdout)["ok"]   # no replay: no teacher needed
    proc = kdcache("verify", out, "--replay", 8, check=False)
    assert proc.returncode == 2 and not (tmp_path / "imported.marker").exists() and "marked_teacher" not in sys.modules
    assert proc.stderr.strip().splitlines() == [
        f"kdcache: error: {out}: the teacher comes from the module 'marked_teacher:factory' named in the cache; "
        "verify imports no module a cache names: pass --teacher-module marked_teacher:factory if you trust it"]
    report = json.loads(kdcache("verify", out, "--replay", 8, "--json", "--teacher-module", "marked_teacher:factory").stdout)
    assert report["ok"] and report["replay"]["views"] == 8 and (tmp_path / "imported.marker").exists()


@pytest.mark.parametrize("args,message", [
    (["--seeds=-2:3"], "seed range '-2:3': seeds are integers from 0 to 999999 (the cache names each with 6 digits)"),
    (["--seeds", "0:1000001"], "seed range '0:1000001': seeds are integers from 0 to 999999 (the cache names each with 6 digits)"),
    (["--seeds", "3:3"], "seed range '3:3' is empty: A:B is the seeds A to B - 1, so B must be greater than A"),
    (["--seeds", "5:2"], "seed range '5:2' is empty: A:B is the seeds A to B - 1, so B must be greater than A"),
    (["--seeds", "1:x"], "seed range '1:x': expected A:B (the seeds A to B - 1) or one seed A"),
    (["--seeds", "0:1", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
])
def test_bad_seed_ranges_and_batch_sizes_are_refused_before_anything_is_written(fmnist_small, tmp_path, args, message):
    out = tmp_path / "cache"
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", out, "--teacher", "resnet10t",
                   "--random-teacher", "--no-progress", *args, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"kdcache: error: {message}"], proc.stderr
    assert not out.exists()


def test_dump_config_is_checked_before_anything_is_written(fmnist_small, tmp_path):
    from kdcache.errors import KdcacheError
    from kdcache.teacher.dump import DumpConfig, dump_teacher
    for seeds, batch_size, message in (([-1, 0], 8, "seeds are integers from 0 to 999999, got -1"),
                                       ([], 8, "no seeds to dump"), ([0], 0, "--batch-size must be positive, got 0")):
        cfg = DumpConfig(data=fmnist_small.root, out=tmp_path / "cache", seeds=seeds, topk=3, batch_size=batch_size,
                         teacher=ModelSpec(name="resnet10t", random_init=True), progress=False)
        with pytest.raises(KdcacheError, match=re.escape(message)):
            dump_teacher(cfg)
        assert not (tmp_path / "cache").exists()


def test_a_reader_that_cannot_open_ends_the_dump_with_its_error(fmnist_small, tmp_path, monkeypatch):
    """The render thread's set-up (opening the shards) failing is raised by dump_teacher; before, the error
    escaped the thread before it could tell the consumer, which then waited forever."""
    import threading

    from kdcache.data.dataset import PreparedSplit
    from kdcache.teacher.dump import DumpConfig, dump_teacher

    def unreadable(self):
        raise OSError(f"{self.root}: shard unreadable")
    monkeypatch.setattr(PreparedSplit, "jpeg_reader", unreadable)
    cfg = DumpConfig(data=fmnist_small.root, out=tmp_path / "cache", seeds=[0], topk=3, batch_size=64,
                     teacher=ModelSpec(name="resnet10t", random_init=True), progress=False, workers=1)
    raised = []

    def run():
        try:
            dump_teacher(cfg)
        except BaseException as exc:
            raised.append(exc)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=300)   # a hang detector only: the dump ends in seconds or never
    assert not worker.is_alive(), "dump_teacher still waiting for a render thread that died"
    assert len(raised) == 1 and "shard unreadable" in str(raised[0]), raised


def test_the_dumps_render_is_the_same_for_any_thread_count_and_grouping(folder_ds):
    """dump-teacher renders chunks in groups of samples of equal cost, one group per thread: the grouping
    (and the thread count) decides who renders a sample, never its pixels, which are render_views' on
    the decoded image (varied sizes: decode buffers are reused within a group)."""
    import numba

    from kdcache.augment import ParamLayout
    from kdcache.augment.render import SampleBuffers, balance, render_range

    split = folder_ds.split("train")
    recipe = ViewRecipe(size=48, aa="rand-m9-mstd0.5", reprob=0.5)
    n = split.num_samples
    idx = np.arange(n)
    params = np.stack([view_params(recipe, 0, s, idx, split.sizes[:, 0], split.sizes[:, 1], n) for s in range(3)], 1)
    reader = split.jpeg_reader()
    expected = np.stack([render_views(decode_jpeg(reader[i], *split.sizes[i]), params[i], 48, ParamLayout.of(recipe))
                         for i in idx])
    data, offsets, lengths = reader.read_range(0, n)
    buffers = SampleBuffers()   # reused across calls, as the dump does
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            views = render_range(data, offsets, lengths, split.sizes[:, 0], split.sizes[:, 1], params, 48,
                                 ParamLayout.of(recipe), buffers=buffers)
            assert np.array_equal(views, expected), threads
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    # the groups: every sample exactly once, loads within one sample's cost of each other (longest first)
    cost = np.random.default_rng(0).uniform(1, 10, 101)
    for groups in (1, 3, 14, 101):
        members, bounds = balance(cost, groups)
        assert sorted(members) == list(range(101)) and bounds[0] == 0 and bounds[-1] == 101
        loads = [cost[members[bounds[g]:bounds[g + 1]]].sum() for g in range(groups)]
        assert max(loads) - min(loads) <= cost.max(), groups


def test_render_calls_of_several_batches_give_the_same_cache(fmnist_small, tmp_path, monkeypatch):
    """The dump renders several teacher batches per call and the consumer splits them again: the teacher
    sees the same batches, so the cache is the one-batch-per-call cache, bit for bit."""
    from kdcache.teacher import dump

    args = ("--batch-size", 24, "--workers", 2)   # 3 views per sample: 8 samples per teacher batch
    assert dump.batches_per_render(8, 3, 2) == 4
    kdcache(*dump_args(fmnist_small.root, tmp_path / "several", "0:3", *args))
    monkeypatch.setattr(dump, "SAMPLES_PER_RENDER_THREAD", 0)    # one batch per render call
    assert dump.batches_per_render(8, 3, 2) == 1
    kdcache(*dump_args(fmnist_small.root, tmp_path / "one", "0:3", *args))
    several, one = read_all(tmp_path / "several"), read_all(tmp_path / "one")
    assert several.keys() == one.keys() and len(several) == 3 * len(ARRAYS)
    for key in one:
        assert np.array_equal(several[key], one[key]), key
