"""Cache roots published over HTTP (issue 21): `kdcache publish`, then ls, info, verify, train-student and copy
from a real static server on loopback (aiohttp's static files, Range answered with 206, every request logged):
the same arrays as the source, damaged objects named and not trained on, a republished root detected, downloads
resumed, the read-through copy, and no write request ever."""

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import assert_same_slabs, kdcache, slabs
from kdcache.cache.http import INDEX, HttpLocation, RootChanged
from kdcache.cache.integrity import unit_records
from kdcache.cache.marker import seal
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.errors import KdcacheError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from static_server import StaticServer  # noqa: E402

TEACHER = ("--teacher", "test_resnet", "--random-teacher", "--unit-size", 128, "--topk", 5, "--no-progress")
STUDENT = ("--model", "test_resnet", "--epochs", 1, "--batch-size", 64, "--workers", 2, "--no-progress")
UNITS = 8   # 400 samples in units of 128: 4 units per seed, seeds 0 and 1


@pytest.fixture(scope="module")
def source_root(fmnist_small, tmp_path_factory):
    """A cache root holding one cache (seeds 0:2), with an added teacher over its views."""
    root = tmp_path_factory.mktemp("source") / "root"
    kdcache("dump-teacher", "--data", fmnist_small.root, "--cache-root", root, "--seeds", "0:2", *TEACHER)
    [cache_dir] = [p for p in root.iterdir() if p.is_dir()]
    _add_teacher(TeacherCache.open(cache_dir, mode="r+"), "second")
    return root


def _add_teacher(cache: TeacherCache, label: str) -> None:
    """An added teacher (teachers/<label>/, format 4) holding the main teacher's rows: only its layout matters here."""
    spec = dataclasses.replace(cache.spec, teacher=dict(cache.spec.teacher, sha256="1" * 64, name="other"))
    teacher = cache.add_teacher(label, spec, cache.complete_seeds())
    for seed in cache.complete_seeds():
        slab_arrays, arrays = cache.arrays(seed), teacher.arrays(seed)
        for name, arr in arrays.items():
            arr[...] = slab_arrays[name][...]
        for block in range(spec.num_blocks):
            teacher.ledger.mark_done(seed, block, {"views": 0, "correct": 0, "run": "test", "rank": 0,
                                                  "objects": unit_records(teacher, seed, block)})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    try:
        srv = StaticServer(base).start()
    except Exception as exc:   # no loopback socket (a sandbox): nothing of this module can run
        pytest.skip(f"the loopback HTTP server (aiohttp) cannot start here: {type(exc).__name__}: {exc}")
    yield srv
    srv.stop()


@pytest.fixture
def published(source_root, server, request):
    """A fresh copy of the source root under the server, published: its local path, root URL, cache id and URL."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:60]
    local = server.root / name
    shutil.copytree(source_root, local)
    kdcache("publish", local, "--no-progress")
    [cache_id] = [p.name for p in local.iterdir() if p.is_dir()]
    url = f"{server.url}/{name}"
    return SimpleNamespace(local=local, url=url, id=cache_id, cache=local / cache_id, cache_url=f"{url}/{cache_id}",
                           first_request=len(server.requests))


def requests(server, since: int):
    return server.requests[since:]


def assert_read_only(server, since: int = 0):
    seen = requests(server, since)
    assert seen, "the readers sent no request at all: the check would prove nothing"
    methods = {r.method for r in seen}
    assert methods <= {"GET", "HEAD"}, f"a reader sent {methods - {'GET', 'HEAD'}}"


def shard_gets(server, since: int):
    return [r for r in requests(server, since) if r.method == "GET" and "/c/" in r.path]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard(cache_dir: Path, seed: int, array: str, block: int) -> Path:
    base = cache_dir / "seeds" / f"{seed:06d}" / array / "c" / str(block)
    return base / "0" if (base / "0").is_file() else base


def test_publish_indexes_what_readers_open_and_only_finished_units(published, tmp_path):
    index = json.loads((published.local / INDEX).read_text())
    assert index["format"] == "kdcache-published-root" and index["generation"] == 1 and index["caches"] == [published.id]
    keys = set(index["objects"])
    on_disk = {str(p.relative_to(published.local)) for p in published.local.rglob("*") if p.is_file()} - {INDEX}
    assert keys <= on_disk
    # writers' state is not published; everything else of the cache is, the added teacher's included
    assert {k for k in on_disk - keys if "/claims/" not in k and "/logs/" not in k} == set()
    assert any(k.startswith(f"{published.id}/logs/") for k in on_disk)
    assert sum(k.startswith(f"{published.id}/teachers/second/units/") for k in keys) == UNITS
    assert sum(k.startswith(f"{published.id}/units/") for k in keys) == UNITS
    # a unit without its marker (being written) is left out, shards included; the generation grows
    (published.cache / "units" / "000001" / "000002.json").unlink()
    out = kdcache("publish", published.local, "--json", "--no-progress").stdout
    s = json.loads(out)
    assert s["generation"] == 2 and s["units"] == 2 * UNITS - 1 and s["hashed"] == 0   # nothing changed: reused
    keys2 = set(json.loads((published.local / INDEX).read_text())["objects"])
    assert keys - keys2 == {f"{published.id}/units/000001/000002.json"} | {
        str(_shard(published.cache, 1, a, 2).relative_to(published.local)) for a in ("logp", "indices", "log_tail", "params")}
    # a shard damaged at the source: its unit is named and left out (exit 1); --rehash reads everything again
    _flip(_shard(published.cache, 0, "indices", 1))
    proc = kdcache("publish", published.local, "--no-progress", check=False)
    assert proc.returncode == 1 and "seed 0, unit 1 (samples 128:256)" in proc.stderr and "CRC32C" in proc.stderr
    assert f"{published.id}/units/000000/000001.json" not in json.loads((published.local / INDEX).read_text())["objects"]
    s = json.loads(kdcache("publish", published.local, "--json", "--rehash", "--no-progress", check=False).stdout)
    assert s["hashed"] == s["objects"] + 5 and s["generation"] == 4   # (+ the damaged unit's marker and shards)
    # copy --root --publish: the copy (with its added teacher) lands in a root, which is then published; of the main
    # cache's 7 finished units the damaged one is not copied
    proc = kdcache("copy", published.cache, tmp_path / "root2", "--root", "--publish", "--no-progress", check=False)
    assert proc.returncode == 1 and "seed 0, unit 1 (samples 128:256)" in proc.stderr
    assert "generation 1: 1 caches, 14 units" in proc.stdout and (tmp_path / "root2" / INDEX).is_file()
    assert kdcache("copy", published.cache, tmp_path / "c", "--publish", check=False).returncode == 2


def test_publish_a_root_on_s3_then_read_it_over_http(source_root, s3_root, server, tmp_path):
    """publish writes the index with the Location's write (one PUT on S3) and keeps the records of unchanged objects
    by their ETag; the root, fetched as files and served, reads as the source."""
    import s3fs
    [cache] = [p for p in source_root.iterdir() if p.is_dir()]
    kdcache("copy", cache, f"{s3_root}/published", "--root", "--no-progress")
    first = json.loads(kdcache("publish", f"{s3_root}/published", "--json", "--no-progress").stdout)
    again = json.loads(kdcache("publish", f"{s3_root}/published", "--json", "--no-progress").stdout)
    assert first["units"] == 2 * UNITS and first["hashed"] == first["objects"]   # the added teacher's too
    assert again["generation"] == 2 and again["hashed"] == 0 and again["reused"] == first["objects"]
    served = server.root / "from_s3"
    s3fs.S3FileSystem(skip_instance_cache=True).get(f"{s3_root}/published/", str(served), recursive=True)
    assert_same_slabs(slabs(cache), slabs(f"{server.url}/from_s3/{cache.name}"))


def test_ls_info_verify_train_from_a_published_root(published, server, fmnist_small, tmp_path):
    since = published.first_request
    [entry] = json.loads(kdcache("ls", published.url, "--json").stdout)["caches"]
    assert entry["id"] == published.id and entry["path"] == published.cache_url and entry["seeds_complete"] == [0, 1]
    assert entry["problems"] == [] and entry["bytes"] > 0
    info = json.loads(kdcache("info", published.cache_url, "--json").stdout)
    assert info["seeds_complete"] == [0, 1] and info["path"] == published.cache_url
    report = json.loads(kdcache("verify", published.cache_url, "--json").stdout)
    assert report["ok"] and report["seeds_complete"] == [0, 1]
    assert_same_slabs(slabs(published.cache), slabs(published.cache_url))
    cache = TeacherCache.open(published.cache_url)
    teachers = cache.teachers()
    assert list(teachers) == ["test_resnet", "second"] and teachers["second"].complete_seeds() == [0, 1]
    np.testing.assert_array_equal(read_slab(teachers["second"], 1).logp, read_slab(cache, 1).logp)
    # zarr itself reads through the same checked reads (its sharding codec asks for byte ranges)
    import zarr
    remote = zarr.open_array(cache.location.zarr_store(read_only=True), path="seeds/000001/params", mode="r")
    np.testing.assert_array_equal(remote[100:300], zarr.open_array(str(published.cache / "seeds/000001/params"),
                                                                    mode="r")[100:300])
    with pytest.raises(KdcacheError, match="read-only"):
        cache.location.zarr_store(read_only=False)
    kdcache("train-student", "--data", fmnist_small.root, *STUDENT, "--cache-root", published.url, "--out", tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["cache"] == published.cache_url
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["cache"] == published.cache_url
    # nothing is ever written: not by readers (the server's log), and a write is refused by name
    assert_read_only(server, since)
    for call in (lambda: cache.location.write("x", b""), lambda: cache.location.create("units/x", b"")):
        with pytest.raises(KdcacheError, match="a published root is read-only") as exc:
            call()
        assert published.cache_url in str(exc.value)
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", f"{published.url}/new", "--seeds", "0:1",
                   *TEACHER, check=False)
    assert proc.returncode == 2 and "read-only" in proc.stderr
    assert_read_only(server, since)


def test_read_through_copy_second_reader_sends_no_shard_get(published, server, fmnist_small, tmp_path, monkeypatch):
    copy_dir = tmp_path / "copy"
    monkeypatch.setenv("KDCACHE_HTTP_CACHE", str(copy_dir))
    since = len(server.requests)
    local = slabs(published.cache)
    assert_same_slabs(local, slabs(published.cache_url))
    assert len(shard_gets(server, since)) == 4 * UNITS   # the four arrays of each unit
    second = len(server.requests)
    assert_same_slabs(local, slabs(published.cache_url))
    kdcache("train-student", "--data", fmnist_small.root, *STUDENT, "--cache", published.cache_url, "--out", tmp_path / "s")
    assert shard_gets(server, second) == []
    assert {r.path.rsplit("/", 1)[-1] for r in requests(server, second) if r.status == 200} == {INDEX}
    # a damaged copy on disk is not used: fetched again (one GET), the same arrays
    host = server.url.split("//")[1].replace(":", "_")
    kept = copy_dir / host / published.local.name / _shard(published.cache, 1, "logp", 0).relative_to(published.local)
    _flip(kept)
    third = len(server.requests)
    assert_same_slabs(local, slabs(published.cache_url))
    assert [r.path for r in shard_gets(server, third)] == [f"/{kept.relative_to(copy_dir / host)}"]
    assert_read_only(server, since)


def test_interrupted_download_resumes_with_range_and_without_it(published, server, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_HTTP_CACHE", str(tmp_path / "copy"))
    key = str(_shard(published.cache, 0, "logp", 1).relative_to(published.cache))
    path = f"/{published.local.name}/{published.id}/{key}"
    want = (published.cache / key).read_bytes()
    loc = HttpLocation(published.cache_url)
    server.inject(path, "truncate", "fail", "fail")
    with pytest.raises(KdcacheError, match=r"stopped after \d+ of \d+ bytes, 3 times") as exc:
        loc.read(key)
    partial = Path(str(loc.root.copy_path(f"{published.id}/{key}")) + ".partial")
    assert f"kept in {partial}" in str(exc.value) and partial.stat().st_size == len(want) // 2
    since = len(server.requests)
    assert loc.read(key) == want        # resumed where it stopped
    [r] = requests(server, since)
    assert (r.range, r.status) == (f"bytes={len(want) // 2}-", 206) and not partial.exists()
    # a server that ignores Range (200): the whole object, from its start
    key2 = str(_shard(published.cache, 0, "logp", 2).relative_to(published.cache))
    path2 = f"/{published.local.name}/{published.id}/{key2}"
    server.inject(path2, "truncate", "fail", "fail", "ignore-range")
    with pytest.raises(KdcacheError, match="stopped after"):
        loc.read(key2)
    since = len(server.requests)
    assert loc.read(key2) == (published.cache / key2).read_bytes()
    [r] = requests(server, since)
    assert r.range is not None and r.status == 200
    # without a read-through copy a dropped connection is resumed in memory
    monkeypatch.delenv("KDCACHE_HTTP_CACHE")
    key3 = str(_shard(published.cache, 1, "params", 3).relative_to(published.cache))
    server.inject(f"/{published.local.name}/{published.id}/{key3}", "truncate")
    since = len(server.requests)
    assert HttpLocation(published.cache_url).read(key3) == (published.cache / key3).read_bytes()
    assert [(r.status, r.range is not None) for r in shard_gets(server, since)] == [(200, False), (206, True)]
    assert_read_only(server, published.first_request)


def test_copy_from_a_published_root_interrupted_then_resumed(published, server, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_HTTP_CACHE", str(tmp_path / "copy"))
    dst = tmp_path / "fetched"
    shard = _shard(published.cache, 1, "indices", 0)   # the first unit of seed 1: seed 0's 4 units come first
    path = f"/{published.local.name}/{shard.relative_to(published.local)}"
    server.inject(path, "truncate", "fail", "fail")
    proc = kdcache("copy", published.cache_url, dst, "--workers", 1, "--no-progress", check=False)
    assert proc.returncode == 2 and "stopped after" in proc.stderr and path in proc.stderr
    done = TeacherCache.open(dst).ledger.done_units()
    assert done[0] == {0, 1, 2, 3} and 0 not in done.get(1, ())   # (units queued behind the failed one may be copied)
    since = len(server.requests)
    out = kdcache("copy", published.cache_url, dst, "--no-progress").stdout
    copied, there = map(int, re.search(r"copy: (\d+) units .* (\d+) already there", out).groups())
    assert there == sum(map(len, done.values())) and copied + there == 2 * UNITS   # then the added teacher's 8
    resumed = [r for r in requests(server, since) if r.path == path]
    assert [(r.range, r.status) for r in resumed] == [(f"bytes={shard.stat().st_size // 2}-", 206)]
    assert_same_slabs(slabs(published.cache), slabs(dst))
    assert json.loads(kdcache("verify", dst, "--json").stdout)["ok"]
    assert_read_only(server, published.first_request)


def test_a_damaged_object_on_the_server_is_named_and_not_trained_on(published, server, fmnist_small, tmp_path):
    shard = _shard(published.cache, 1, "logp", 1)
    _flip(shard)   # after publishing: the server now serves bytes the index does not record
    url = f"{server.url}/{shard.relative_to(server.root)}"
    report = json.loads(kdcache("verify", published.cache_url, "--json", check=False).stdout)
    assert not report["ok"] and report["seeds_complete"] == [0]
    [problem] = report["problems"]
    assert "seed 1, unit 1 (samples 128:256), array logp" in problem and url in problem and "CRC32C" in problem
    proc = kdcache("train-student", "--data", fmnist_small.root, *STUDENT, "--cache", published.cache_url,
                   "--view-seeds", "1:2", "--out", tmp_path / "s", check=False)
    assert proc.returncode == 2 and url in proc.stderr and "damaged" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s" / "summary.json").exists()
    proc = kdcache("copy", published.cache_url, tmp_path / "fetched", "--no-progress", check=False)
    assert proc.returncode == 1 and "seed 1, unit 1 (samples 128:256)" in proc.stderr and url in proc.stderr
    assert TeacherCache.open(tmp_path / "fetched").ledger.done_units() == {0: {0, 1, 2, 3}, 1: {0, 2, 3}}
    assert_read_only(server, published.first_request)


def test_a_root_republished_under_a_reader_is_named(published, server, monkeypatch, tmp_path):
    monkeypatch.setenv("KDCACHE_HTTP_CACHE", str(tmp_path / "copy"))
    assert_same_slabs(slabs(published.cache), slabs(published.cache_url))   # generation 1 in the read-through copy
    monkeypatch.delenv("KDCACHE_HTTP_CACHE")
    reader = TeacherCache.open(published.cache_url)      # opens generation 1 (reading from the server)
    assert reader.location.generation == 1
    # the publisher recomputes a unit (other bytes, a new marker) and publishes again: generation 2
    cache = TeacherCache.open(published.cache, mode="r+")
    arr = cache.arrays(0)["log_tail"]
    arr[0:128] = arr[0:128] + 1
    marker_path = published.cache / cache.ledger.marker_key(0, 0)
    marker = json.loads(marker_path.read_text())
    marker["objects"] = unit_records(cache, 0, 0)
    marker_path.write_bytes(seal(marker, cache.identity_hash))
    s = json.loads(kdcache("publish", published.local, "--json", "--no-progress").stdout)
    assert s["generation"] == 2 and s["hashed"] == 2
    with pytest.raises(RootChanged) as exc:
        read_slab(reader, 0)
    text = str(exc.value)
    assert "published generation 2, published 20" in text and "this reader opened generation 1" in text
    assert published.url in text
    # a new reader reads generation 2: of its read-through copy, only the two changed objects are fetched again
    monkeypatch.setenv("KDCACHE_HTTP_CACHE", str(tmp_path / "copy"))
    since = len(server.requests)
    assert_same_slabs(slabs(published.cache), slabs(published.cache_url))
    fetched = sorted(r.path.split(published.id + "/", 1)[1] for r in requests(server, since)
                     if r.status == 200 and not r.path.endswith(INDEX))
    assert fetched == ["seeds/000000/log_tail/c/0", "units/000000/000000.json"]
    assert_read_only(server, published.first_request)


def test_a_url_without_an_index_is_refused_by_name(server, tmp_path):
    (server.root / "plain").mkdir()
    with pytest.raises(KdcacheError, match="no kdcache-index.json here or above") as exc:
        HttpLocation(f"{server.url}/plain/x")
    assert f"{server.url}/plain/x/{INDEX}" in str(exc.value) and "kdcache publish" in str(exc.value)
    (server.root / "bad").mkdir()
    (server.root / "bad" / INDEX).write_text(json.dumps({"format": "kdcache-published-root", "version": 1,
                                                         "generation": 1, "objects": {"../etc/passwd": [1, "00000000"]}}))
    with pytest.raises(KdcacheError, match="not a plain path inside the root"):
        HttpLocation(f"{server.url}/bad")
