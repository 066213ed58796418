"""`kdcache derive`: a smaller k (exact), some seeds (S3 to local disk), some teachers, resumable, refusals."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import kdcache
from kdcache.cache import derive as derive_module
from kdcache.cache.schema import LOGP_SCALE, TeacherCache, encode_logp, logp_encoding
from kdcache.cache.slabs import read_slab

TEACHER = ("--teacher", "test_resnet", "--random-teacher", "--unit-size", 128, "--no-progress")


def dump(data, out, topk, seeds="0:2", *extra):
    kdcache("dump-teacher", "--data", data, "--out", out, "--seeds", seeds, "--topk", topk, *TEACHER, *extra)
    return out


@pytest.fixture(scope="module")
def k10(fmnist_small, tmp_path_factory):
    """Seeds 0:2 of fmnist_small (4 units of 128 each), random test_resnet, k = 10 = C (log_tail -inf)."""
    return dump(fmnist_small.root, tmp_path_factory.mktemp("k10") / "cache", 10)


def derive(*args, check=True):
    return kdcache("derive", *args, "--no-progress", check=check)


def verify_ok(path):
    report = json.loads(kdcache("verify", path, "--json").stdout)
    assert report["ok"], report


def slabs(cache):
    return {s: read_slab(cache, s) for s in cache.complete_seeds()}


def shards(path):
    """Every shard object of a cache, by key: the arrays byte for byte."""
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "seeds").rglob("*"))
            if p.is_file() and "c" in p.relative_to(root).parts}


@pytest.mark.parametrize("k, classes", [(10, 1000), (100, 21841)])
def test_fewer_columns_moves_the_dropped_mass_into_the_tail(k, classes):
    """Synthetic rows with a finite tail (k < C): the merged tail is the exact tail beyond the top 5 within
    2.44e-4 relative (each dropped value stored within half a step of 1/2048) plus float32 (1e-6)."""
    rng = np.random.default_rng(k)
    z = rng.normal(0, 3, (300, classes))
    logp = z - np.logaddexp.reduce(z, 1, keepdims=True)
    order = np.argsort(-logp, 1)
    top = np.take_along_axis(logp, order[:, :k], 1)
    tail = np.logaddexp.reduce(np.take_along_axis(logp, order[:, k:], 1), 1).astype(np.float32)
    stored = encode_logp(top, "uint16")
    lp, ix, lt = derive_module.fewer_columns(stored, order[:, :k], tail, 5, logp_encoding("uint16"))
    np.testing.assert_array_equal(lp, stored[:, :5])
    np.testing.assert_array_equal(ix, order[:, :5])
    exact = np.logaddexp.reduce(np.take_along_axis(logp, order[:, 5:], 1), 1)
    err = np.abs(np.expm1(lt.astype(np.float64) - exact))
    assert err.max() <= 2.44e-4 + 1e-6 and err.max() > 1e-6   # the rounding shows, within its bound


def test_derive_topk_equals_a_dump_at_that_k(fmnist_small, k10, tmp_path):
    k5 = dump(fmnist_small.root, tmp_path / "k5", 5)
    out = derive(k10, tmp_path / "derived", "--topk", 5).stdout
    assert "8 units written, 0 already there" in out and "top-5" in out
    derived, dumped = TeacherCache.open(tmp_path / "derived"), TeacherCache.open(k5)
    assert derived.spec.identity() == dumped.spec.identity()
    source = TeacherCache.open(k10)
    assert derived.attrs["derived_from"] == {"identity_sha256": source.identity_hash, "path": str(Path(k10).resolve()),
                                             "topk": 10, "seeds": [0, 1], "teachers": ["test_resnet"]}
    a, b = slabs(derived), slabs(dumped)
    assert sorted(a) == sorted(b) == [0, 1]
    for s in a:
        np.testing.assert_array_equal(a[s].indices, b[s].indices)
        np.testing.assert_array_equal(a[s].params, b[s].params)
        # the same quantised value, up to one step where the two dumps' float32 log-softmax rounds across a boundary
        np.testing.assert_array_less(np.abs(a[s].logp - b[s].logp), 1 / LOGP_SCALE + 1e-7)
        # the tail: the 5 dropped values were stored within half a step each (2.44e-4 relative on each probability),
        # so their sum is within 2.44e-4 relative; plus float32 (the stored tail, the dump's own log-sum-exp: 1e-5)
        err = np.abs(np.expm1(a[s].log_tail.astype(np.float64) - b[s].log_tail.astype(np.float64)))
        assert err.max() <= 2.44e-4 + 1e-5, err.max()
        assert np.isfinite(a[s].log_tail).all() and np.isneginf(read_slab(source, s).log_tail).all()
    verify_ok(tmp_path / "derived")


def test_derive_seeds_from_s3_to_local_disk(k10, tmp_path, s3_root):
    remote = f"{s3_root}/derive-src"
    kdcache("copy", k10, remote, "--no-progress")
    out = derive(remote, tmp_path / "local", "--seeds", "1:2", "--topk", 3).stdout
    assert "4 units written" in out and "seeds complete 1" in out
    local = TeacherCache.open(tmp_path / "local")
    assert local.seeds == [1] and local.attrs["derived_from"]["path"] == remote
    # the same rows as a derive from the local original
    derive(k10, tmp_path / "from_local", "--seeds", "1:2", "--topk", 3)
    assert shards(tmp_path / "local") == shards(tmp_path / "from_local")
    verify_ok(tmp_path / "local")
    # and from local disk to a bucket: the same rows
    derive(k10, f"{s3_root}/derived", "--seeds", "1:2", "--topk", 3)
    verify_ok(f"{s3_root}/derived")
    [(s, got)], [(_, want)] = slabs(TeacherCache.open(f"{s3_root}/derived")).items(), slabs(local).items()
    assert s == 1 and all(np.array_equal(x, y) for x, y in zip(got, want))


def test_an_interrupted_derive_resumes_to_the_same_bytes(k10, tmp_path, monkeypatch):
    derive(k10, tmp_path / "whole", "--topk", 4, "--workers", 1)
    calls = []
    real = derive_module._store_unit

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt   # stands for a kill in the middle of the derive
        return real(*args)

    monkeypatch.setattr(derive_module, "_store_unit", failing)
    with pytest.raises(KeyboardInterrupt):
        derive(k10, tmp_path / "resumed", "--topk", 4, "--workers", 1)
    # the units not started were cancelled (the one the worker thread had taken meanwhile may be written)
    there = sum(map(len, TeacherCache.open(tmp_path / "resumed").ledger.done_units().values()))
    assert 3 <= there <= 4
    monkeypatch.setattr(derive_module, "_store_unit", real)
    out = derive(k10, tmp_path / "resumed", "--topk", 4, "--workers", 2).stdout
    assert f"{8 - there} units written, {there} already there" in out
    assert shards(tmp_path / "resumed") == shards(tmp_path / "whole") and len(shards(tmp_path / "whole")) == 8 * 4
    verify_ok(tmp_path / "resumed")
    # a rerun writes nothing; another --topk or --seeds into it is refused, naming what differs
    assert "0 units written, 8 already there" in derive(k10, tmp_path / "resumed", "--topk", 4).stdout
    for args, says in ((("--topk", 3), "derived with --topk 4, this run asks for 3"),
                       (("--topk", 4, "--seeds", "0:1"), "derived with --seeds 0:2, this run asks for 0")):
        proc = derive(k10, tmp_path / "resumed", *args, check=False)
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr


def test_derive_teachers_an_added_teacher_leads_with_the_views_of_the_main_cache(fmnist_small, k10, tmp_path):
    shutil.copytree(k10, tmp_path / "main")
    dump(fmnist_small.root, tmp_path / "main", 10, "0:2", "--teacher-init-seed", 7, "--add-teacher",
         "--teacher-label", "second")
    main = TeacherCache.open(tmp_path / "main")
    second = main.teachers()["second"]
    assert list(main.teachers()) == ["test_resnet", "second"]
    out = derive(tmp_path / "main", tmp_path / "derived", "--teachers", "second,test_resnet", "--topk", 5).stdout
    assert "teachers second, test_resnet" in out and "16 units written" in out
    derived = TeacherCache.open(tmp_path / "derived")
    assert derived.label == "second" and list(derived.teachers()) == ["second", "test_resnet"]
    assert derived.spec.teacher["sha256"] == second.spec.teacher["sha256"] != main.spec.teacher["sha256"]
    own, added = slabs(derived), slabs(derived.teachers()["test_resnet"])
    for s in (0, 1):
        theirs, mine = read_slab(second, s), read_slab(main, s)
        np.testing.assert_array_equal(own[s].indices, theirs.indices[:, :5])
        np.testing.assert_array_equal(own[s].logp, theirs.logp[:, :5])
        np.testing.assert_array_equal(own[s].params, mine.params)   # the main cache's views
        np.testing.assert_array_equal(added[s].indices, mine.indices[:, :5])
        assert added[s].params is None
    verify_ok(tmp_path / "derived")
    # only the added teacher: it is the derived cache's own, with the main cache's views, and no teachers/
    derive(tmp_path / "main", tmp_path / "only", "--teachers", "second")
    only = TeacherCache.open(tmp_path / "only")
    assert list(only.teachers()) == ["second"] and only.attrs["derived_from"]["teachers"] == ["second"]
    for s in (0, 1):
        got, theirs = read_slab(only, s), read_slab(second, s)
        for name in ("logp", "indices", "log_tail"):
            np.testing.assert_array_equal(getattr(got, name), getattr(theirs, name))
        np.testing.assert_array_equal(got.params, read_slab(main, s).params)
    verify_ok(tmp_path / "only")


def _sampled_cache(k10, path):
    spec = TeacherCache.open(k10).spec
    spec = dataclasses.replace(spec, topk=5, targets="sampled", samples=4)
    TeacherCache.create_or_open(path, spec, [0])
    return path


@pytest.mark.parametrize("args, says", [
    (("--topk", 11), "--topk 11: teacher test_resnet of"),
    (("--teachers", "test_resnet,nobody"), "has no teacher 'nobody'; its teachers are test_resnet"),
    (("--seeds", "1:4"), "holds seeds 2:4 of teacher test_resnet incompletely or not at all (complete: 0:2)"),
    ("sampled", "has sampled targets"),
])
def test_refusals_name_the_setting_and_write_nothing(k10, tmp_path, args, says):
    src = k10
    if args == "sampled":
        src, args = _sampled_cache(k10, tmp_path / "sampled"), ("--topk", 3)
    proc = derive(src, tmp_path / "dst", *args, check=False)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "dst").exists()


def test_a_derived_cache_takes_no_rows_of_another_source_but_a_copy_of_its_own(k10, tmp_path):
    derive(k10, tmp_path / "dst", "--seeds", "0:1")
    derive(tmp_path / "dst", tmp_path / "dst2")   # a cache derived from the derived one: another identity
    proc = derive(tmp_path / "dst2", tmp_path / "dst", check=False)
    assert proc.returncode != 0 and "derived with the source's identity" in proc.stderr, proc.stderr
    # a copy of the source has its identity: the derive resumes from it (and keeps the recorded path)
    kdcache("copy", k10, tmp_path / "moved", "--no-progress")
    assert "0 units written, 4 already there" in derive(tmp_path / "moved", tmp_path / "dst").stdout
    assert TeacherCache.open(tmp_path / "dst").attrs["derived_from"]["path"] == str(Path(k10).resolve())


def test_a_damaged_source_unit_is_named_and_the_rest_derived(k10, tmp_path):
    shutil.copytree(k10, tmp_path / "src")
    shard = tmp_path / "src" / "seeds" / "000001" / "logp" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = derive(tmp_path / "src", tmp_path / "dst", "--topk", 5, check=False)
    assert proc.returncode == 1 and "7 units written" in proc.stdout and "seeds complete 0 " in proc.stdout
    assert "seed 1, unit 2 (samples 256:384), array logp: its shard object's CRC32C" in proc.stderr
    assert "not derived" in proc.stderr
    verify = json.loads(kdcache("verify", tmp_path / "dst", "--json", check=False).stdout)
    assert not verify["ok"]   # seed 1 lacks the unit: the derived cache says so, it holds nothing unchecked
