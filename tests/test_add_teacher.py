"""dump-teacher --add-teacher: another teacher over the views a cache holds, stored under teachers/<label>/
as a cache of its own (targets only), checked against the main cache's stored views before it scores them."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import kdcache, reseal_markers
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab

TARGETS = ("logp", "indices", "log_tail")
MAIN = ["--teacher", "resnet10t", "--random-teacher", "--topk", 5, "--unit-size", 128, "--no-progress"]
# the added teacher: a factory model (tests/ is on sys.path), whose default label ("tiny_models:tiny_cnn") is no
# folder name, so it is named
TINY = ["--teacher-module", "tiny_models:tiny_cnn", "--random-teacher", "--teacher-init-seed", 5, "--topk", 3,
        "--no-progress"]


def dump(data, out, seeds, *extra):
    return kdcache("dump-teacher", "--data", data, "--out", out, "--seeds", seeds, *extra)


def add(data, out, seeds, *extra, check=True):
    return kdcache("dump-teacher", "--data", data, "--out", out, "--seeds", seeds, *TINY, "--add-teacher",
                   "--teacher-label", "tiny", *extra, check=check)


def file_hashes(root: Path, skip=("teachers",)) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in skip}


def target_arrays(path) -> dict:
    root = zarr.open_group(str(path), mode="r")
    return {(s, a): root[f"seeds/{s:06d}/{a}"][...] for s in sorted(int(k) for k in root["seeds"].group_keys())
            for a in TARGETS}


@pytest.fixture(scope="module")
def main_cache(fmnist_small, tmp_path_factory):
    """Seeds 0:2 of the 400-sample Fashion-MNIST with a strong recipe (RandAugment, erasing, cutmix: every
    kind of view parameter), 4 units of 128 per seed."""
    out = tmp_path_factory.mktemp("main") / "cache"
    dump(fmnist_small.root, out, "0:2", *MAIN, "--view-global-seed", 3, "--aa", "rand-m9-n2", "--reprob", 0.5,
         "--cutmix", 1.0, "--mix-block", 16)
    return out


@pytest.fixture
def main_copy(main_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(main_cache, out)
    return out


def test_added_teacher_writes_only_its_targets_and_equals_its_own_dump(fmnist_small, main_copy, tmp_path):
    before = file_hashes(main_copy)
    proc = add(fmnist_small.root, main_copy, "0:2")
    assert "800 views written" in proc.stdout and "seeds complete 0:2" in proc.stdout, proc.stdout
    assert file_hashes(main_copy) == before, "adding a teacher changed the main cache's files"
    where = main_copy / "teachers" / "tiny"
    assert sorted(p.name for p in (main_copy / "teachers").iterdir()) == ["tiny"]
    arrays = {p.parent.name for p in where.glob("seeds/*/*/zarr.json")}
    assert arrays == set(TARGETS), "an added teacher stores targets only (no params)"
    main, teacher = TeacherCache.open(main_copy), TeacherCache.open(where)
    assert teacher.views_of == main.identity_hash and teacher.label == "tiny" and teacher.spec.topk == 3
    assert set(main.teachers()) == {"resnet10t", "tiny"} and teacher.complete_seeds() == [0, 1]
    assert teacher.spec.recipe == main.spec.recipe and teacher.spec.global_seed == 3
    # its own ledger: markers under teachers/tiny/units/, recording its three arrays only
    markers = sorted(where.glob("units/*/*.json"))
    assert len(markers) == 8 and all(set(json.loads(m.read_text())["objects"]) == set(TARGETS) for m in markers)
    assert read_slab(teacher, 1).params is None
    # the same teacher dumped on its own over the same views (recipe, global seed): the same rows, bit for bit
    alone = tmp_path / "alone"
    dump(fmnist_small.root, alone, "0:2", *TINY, "--unit-size", 128, "--view-global-seed", 3, "--aa", "rand-m9-n2",
         "--reprob", 0.5, "--cutmix", 1.0, "--mix-block", 16)
    mine, theirs = target_arrays(where), target_arrays(alone)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert np.array_equal(mine[key], theirs[key], equal_nan=True), f"{key} differs from a dump of its own"
    # running it again writes nothing and changes nothing
    again = add(fmnist_small.root, main_copy, "0:2")
    assert "0 views written" in again.stdout and file_hashes(main_copy) == before


def test_an_interrupted_added_teacher_resumes_to_the_same_bytes(fmnist_small, main_cache, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    shutil.copytree(main_cache, clean)
    add(fmnist_small.root, clean, "0:2")
    partial = tmp_path / "partial"
    shutil.copytree(main_cache, partial)
    import kdcache.teacher.dump as dump_module
    real, calls = dump_module.write_pass, []

    def dies_on_the_third_pass(*args, **kwargs):   # two passes (4 units) written, then the process "dies"
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)
    monkeypatch.setattr(dump_module, "write_pass", dies_on_the_third_pass)
    with pytest.raises(RuntimeError, match="killed"):
        add(fmnist_small.root, partial, "0:2")
    monkeypatch.undo()
    where = partial / "teachers" / "tiny"
    assert len(list(where.glob("units/*/*.json"))) == 4
    proc = add(fmnist_small.root, partial, "0:2")
    assert "288 views written" in proc.stdout, proc.stdout   # units 2 and 3 (128 + 16 samples) of both seeds
    assert file_hashes(where / "seeds", skip=()) == file_hashes(clean / "teachers" / "tiny" / "seeds", skip=())
    # extended with another seed once the main cache has it
    dump(fmnist_small.root, partial, "2:3", *MAIN, "--view-global-seed", 3, "--aa", "rand-m9-n2", "--reprob", 0.5,
         "--cutmix", 1.0, "--mix-block", 16)
    proc = add(fmnist_small.root, partial, "2:3")
    assert "seeds complete 0:3" in proc.stdout and TeacherCache.open(where).complete_seeds() == [0, 1, 2]


def test_seeds_not_complete_in_the_cache_are_refused(fmnist_small, main_copy):
    proc = add(fmnist_small.root, main_copy, "1:3", check=False)
    assert proc.returncode == 2 and "seeds 2 are not complete in the cache (complete: 0:2)" in proc.stderr, proc.stderr
    next(iter((main_copy / "units" / "000001").glob("*.json"))).unlink()   # seed 1 no longer complete
    proc = add(fmnist_small.root, main_copy, "0:2", check=False)
    assert proc.returncode == 2 and "seeds 1 are not complete in the cache (complete: 0)" in proc.stderr, proc.stderr
    assert not (main_copy / "teachers").exists()


def test_other_views_are_refused_before_anything_is_written(fmnist_small, main_copy, monkeypatch):
    import kdcache.teacher.dump as dump_module
    real = dump_module.view_params

    def another_renderer(*args, **kwargs):   # draws that differ in one column (another library's rounding)
        p = real(*args, **kwargs)
        p[:, 0] += np.float32(2 ** -13)
        return p
    monkeypatch.setattr(dump_module, "view_params", another_renderer)
    proc = add(fmnist_small.root, main_copy, "0:2", check=False)
    assert proc.returncode == 2 and "seed 0, unit 0: this kdcache renders other views than the cache holds (sample 0, " \
        "parameter column 0" in proc.stderr, proc.stderr
    assert not (main_copy / "teachers").exists()


def test_a_unit_whose_stored_views_differ_is_refused_by_name(fmnist_small, main_copy):
    """Stored parameters of seed 1, unit 2 changed (and resealed: a writer that stored other views): the
    added teacher refuses that pass before scoring it; the units before it are written."""
    arr = zarr.open_array(str(main_copy / "seeds" / "000001" / "params"), mode="r+")
    arr[300, 1] = arr[300, 1] + np.float32(0.25)
    reseal_markers(main_copy)
    proc = add(fmnist_small.root, main_copy, "0:2", check=False)
    assert proc.returncode == 2 and "seed 1, unit 2: this kdcache renders other views than the cache holds (sample " \
        "300, parameter column 1" in proc.stderr, proc.stderr
    units = {p.relative_to(main_copy / "teachers/tiny/units").as_posix()
             for p in (main_copy / "teachers/tiny/units").glob("*/*.json")}
    assert units == {"000000/000000.json", "000001/000000.json", "000000/000001.json", "000001/000001.json"}


def test_added_teacher_under_a_cache_root_and_its_label(fmnist_small, tmp_path):
    root = tmp_path / "root"
    kdcache("dump-teacher", "--data", fmnist_small.root, "--cache-root", root, "--seeds", "0:1", *MAIN)
    [main] = list(root.iterdir())
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--cache-root", root, "--seeds", "0:1", *TINY,
                   "--add-teacher", check=False)   # no label: the factory's name is no folder name
    assert proc.returncode == 2 and "name the added teacher with --teacher-label" in proc.stderr, proc.stderr
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--cache-root", root, "--seeds", "0:1", *TINY,
                   "--add-teacher", "--teacher-label", "resnet10t", check=False)
    assert proc.returncode == 2 and "give the added teacher another --teacher-label" in proc.stderr, proc.stderr
    kdcache("dump-teacher", "--data", fmnist_small.root, "--cache-root", root, "--seeds", "0:1", *TINY,
            "--add-teacher", "--teacher-label", "tiny")
    assert [p.name for p in root.iterdir()] == [main.name]   # no second cache in the root
    assert TeacherCache.open(main / "teachers" / "tiny").complete_seeds() == [0]
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", main / "teachers" / "tiny", "--seeds", "0:1",
                   *TINY, "--add-teacher", "--teacher-label", "t2", check=False)
    assert proc.returncode == 2 and "is itself an added teacher" in proc.stderr
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", tmp_path / "x", "--seeds", "0:1", *TINY,
                   "--teacher-label", "t2", check=False)
    assert proc.returncode == 2 and "--teacher-label names a teacher added with --add-teacher" in proc.stderr


def test_verify_checks_and_replays_every_teacher(fmnist_small, main_copy):
    """`kdcache verify CACHE` verifies the added teacher too: its own units, markers and checksums, and with
    --replay its own teacher on the main cache's views (fp32 on the CPU: the fp32 thresholds)."""
    add(fmnist_small.root, main_copy, "0:2")
    report = json.loads(kdcache("verify", main_copy, "--replay", 24, "--json", "--teacher-module",
                                "tiny_models:tiny_cnn").stdout)
    assert report["ok"] and not report["problems"], report["problems"]
    assert report["replay"]["precision"] == "fp32" and report["replay"]["top1_agreement"] == 1.0   # resnet10t, by name
    tiny = report["teachers"]["tiny"]
    assert tiny["ok"] and tiny["seeds_complete"] == [0, 1] and tiny["cache"].endswith("teachers/tiny")
    r = tiny["replay"]
    assert r["views"] == 24 and r["precision"] == "fp32" and r["top1_agreement"] == 1.0
    assert r["replay_kl_mean"] <= 1e-8 and r["tail_mass_error_max"] < 1e-5
    assert "teacher tiny" in kdcache("verify", main_copy).stdout
    # without the factory's module the added teacher cannot be rebuilt: named as its problem, the main one replays
    report = json.loads(kdcache("verify", main_copy, "--replay", 8, "--json", check=False).stdout)
    assert report["replay"]["top1_agreement"] == 1.0 and not report["ok"]
    assert report["problems"] == ["teacher tiny: replay: " + report["teachers"]["tiny"]["problems"][0][len("replay: "):]]
    assert "pass --teacher-module tiny_models:tiny_cnn" in report["problems"][0]
    # a damaged shard of the added teacher: named by verify of the main cache
    shard = next(p for p in sorted((main_copy / "teachers/tiny/seeds/000001/logp").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    report = json.loads(kdcache("verify", main_copy, "--json", check=False).stdout)
    assert not report["ok"] and not report["teachers"]["tiny"]["ok"]
    assert any(p.startswith("teacher tiny: ") and "seed 1, unit" in p and "array logp" in p for p in report["problems"])
