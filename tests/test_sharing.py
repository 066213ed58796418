"""Sharing caches: cache roots and `kdcache ls`, `kdcache copy`, S3 (a local moto server), damaged units,
read-only readers."""

import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from conftest import assert_same_slabs, kdcache, slabs
from kdcache.cache.schema import TeacherCache

TEACHER = ("--teacher", "test_resnet", "--random-teacher", "--unit-size", 128, "--topk", 5, "--no-progress")


def dump(data, *where, seeds="0:2", extra=()):
    return kdcache("dump-teacher", "--data", data, *where, "--seeds", seeds, *TEACHER, *extra)


def ls(root):
    return json.loads(kdcache("ls", root, "--json").stdout)["caches"]


def test_a_cache_root_gathers_dumps_of_one_identity_into_one_cache(fmnist_small, tmp_path):
    root = tmp_path / "root"
    dump(fmnist_small.root, "--cache-root", root, seeds="0:2")
    dump(fmnist_small.root, "--cache-root", root, seeds="2:4")
    caches = ls(root)
    assert len(caches) == 1 and caches[0]["seeds_complete"] == [0, 1, 2, 3]
    c = caches[0]
    assert c["teacher"]["name"] == "test_resnet" and c["id"].startswith("test_resnet-train-")
    assert c["path"] == str(root / c["id"]) and c["bytes"] > 0 and "@" in c["created_by"]
    assert c["dataset"]["num_samples"] == 400 and c["seeds_in_progress"] == {}
    assert "4 complete 0:4" in kdcache("ls", root).stdout
    # another teacher (other init seed = other weights): a second cache beside the first
    dump(fmnist_small.root, "--cache-root", root, seeds="0:1", extra=("--teacher-init-seed", 1))
    caches = {c["id"]: c for c in ls(root)}
    assert len(caches) == 2
    # a student finds the cache for its dataset; with two, it must be told which (the error lists both)
    args = ("train-student", "--data", fmnist_small.root, "--model", "test_resnet", "--epochs", 1, "--batch-size", 64,
            "--workers", 2, "--no-progress", "--cache-root", root)
    proc = kdcache(*args, "--out", tmp_path / "s0", check=False)
    assert proc.returncode == 2 and "2 caches match" in proc.stderr and all(i in proc.stderr for i in caches)
    first = c["id"]
    sha = caches[first]["teacher"]["sha256"][:10]
    kdcache(*args, "--out", tmp_path / "s1", "--teacher-sha256", sha)
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["cache"] == str(root / first)
    proc = kdcache(*args, "--out", tmp_path / "s2", "--cache-id", "nope", check=False)
    assert proc.returncode == 2 and "no cache for this dataset" in proc.stderr and first in proc.stderr


def _damage(path, seed, array, how):
    shard = path / "seeds" / f"{seed:06d}" / array / "c" / "1" / ("0" if array != "log_tail" else "")
    shard = shard if shard.is_file() else shard.parent
    if how == "delete":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(data))


def test_damaged_units_are_named_by_verify_and_refused_by_training(fmnist_small, tmp_path):
    """Reproduced defect: bytes overwritten inside one shard -> verify flagged it but train-student trained on
    it (exit 0); a deleted shard trained on fill values (loss NaN)."""
    cache = tmp_path / "cache"
    dump(fmnist_small.root, "--out", cache, seeds="0:2")
    _damage(cache, 1, "logp", "flip")
    _damage(cache, 0, "params", "delete")
    report = json.loads(kdcache("verify", cache, "--json", check=False).stdout)
    assert not report["ok"] and report["seeds_complete"] == []
    flipped, deleted = (next(p for p in report["problems"] if f"seed {s}, unit 1 (samples 128:256), array {a}:" in p)
                        for s, a in ((1, "logp"), (0, "params")))
    assert "CRC32C" in flipped and "missing" in deleted
    for view_seeds in ("1:2", "0:1"):
        proc = kdcache("train-student", "--data", fmnist_small.root, "--model", "test_resnet", "--epochs", 1,
                       "--batch-size", 64, "--workers", 2, "--no-progress", "--cache", cache, "--view-seeds", view_seeds,
                       "--out", tmp_path / f"s{view_seeds[0]}", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert (flipped if view_seeds == "1:2" else deleted) in proc.stderr
        assert not (tmp_path / f"s{view_seeds[0]}" / "summary.json").exists()
    # the fix the message gives: delete the marker, dump again
    for seed in (0, 1):
        (cache / "units" / f"{seed:06d}" / "000001.json").unlink()
    dump(fmnist_small.root, "--out", cache, seeds="0:2")
    assert json.loads(kdcache("verify", cache, "--json").stdout)["ok"]


def test_copy_publishes_finished_units_checked_and_resumes(fmnist_small, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    dump(fmnist_small.root, "--out", src, seeds="0:3")
    kdcache("copy", src, dst, "--seeds", "0:1", "--no-progress")
    assert TeacherCache.open(dst).complete_seeds() == [0]
    out = kdcache("copy", src, dst, "--no-progress").stdout   # resumes: seed 0's units are not copied again
    assert "8 units" in out and "4 already there" in out
    assert_same_slabs(slabs(src), slabs(dst))
    assert json.loads(kdcache("verify", dst, "--json").stdout)["ok"]
    # a damaged source unit is not copied, and named
    _damage(src, 2, "indices", "flip")
    shutil.rmtree(dst)
    proc = kdcache("copy", src, dst, "--no-progress", check=False)
    assert proc.returncode == 1 and "seed 2, unit 1 (samples 128:256), array indices" in proc.stderr
    assert TeacherCache.open(dst).complete_seeds() == [0, 1]
    # --root: the copy lands under the cache's id, where `ls` and --cache-root find it
    kdcache("copy", dst, tmp_path / "root", "--root", "--no-progress")
    [entry] = ls(tmp_path / "root")
    assert entry["seeds_complete"] == [0, 1]


def test_s3_dump_train_verify_ls_copy_equal_local(fmnist_small, tmp_path, s3_root):
    """The whole sequence against an S3-compatible server, with the same arrays as on local disk."""
    local = tmp_path / "local"
    dump(fmnist_small.root, "--out", local, seeds="0:2")
    # two writers at once (claims and markers through conditional PUTs): both end with exit code 0, and
    # every unit is computed once
    cmd = [sys.executable, "-m", "kdcache", "dump-teacher", "--data", str(fmnist_small.root),
           "--cache-root", f"{s3_root}/root", "--seeds", "0:2", *map(str, TEACHER)]
    other = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kdcache(*cmd[3:])   # the second writer in this process (its compiled renderer is reused: faster tests)
    assert other.wait(timeout=600) == 0, other.stderr.read()[-3000:]
    [entry] = ls(f"{s3_root}/root")
    remote = entry["path"]
    assert remote.startswith(f"{s3_root}/root/") and entry["seeds_complete"] == [0, 1]
    cache = TeacherCache.open(remote)
    computed = Counter()
    for key in cache.location.list("logs"):
        for unit in json.loads(cache.location.read(key))["units"]:
            computed.update((s, unit["block"]) for s in unit["seeds"])
    assert sorted(computed) == [(s, b) for s in range(2) for b in range(4)] and set(computed.values()) == {1}
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    before = {k: v["ETag"] for k, v in fs.find(remote, detail=True).items()}
    assert_same_slabs(slabs(local), slabs(remote))
    assert json.loads(kdcache("verify", remote, "--json").stdout)["ok"]
    assert json.loads(kdcache("info", remote, "--json").stdout)["seeds_complete"] == [0, 1]
    kdcache("train-student", "--data", fmnist_small.root, "--model", "test_resnet", "--epochs", 1, "--batch-size", 64,
            "--workers", 2, "--no-progress", "--cache-root", f"{s3_root}/root", "--out", tmp_path / "student")
    assert json.loads((tmp_path / "student" / "summary.json").read_text())["epochs"] == 1
    after = {k: v["ETag"] for k, v in fs.find(remote, detail=True).items()}
    assert after == before, "readers (verify, info, ls, train-student) wrote nothing to the bucket"
    # publish to a bucket and fetch back: the same arrays everywhere
    kdcache("copy", local, f"{s3_root}/published", "--no-progress")
    kdcache("copy", f"{s3_root}/published", tmp_path / "fetched", "--no-progress")
    assert_same_slabs(slabs(local), slabs(tmp_path / "fetched"))
    assert json.loads(kdcache("verify", tmp_path / "fetched", "--json").stdout)["ok"]


def _mount_read_only(src, dst) -> bool:
    dst.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode:
        return False
    if subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True).returncode:
        subprocess.run(["umount", str(dst)])
        return False
    return True


def test_readers_need_no_write_access(fmnist_small, tmp_path):
    root = tmp_path / "root"
    dump(fmnist_small.root, "--cache-root", root, seeds="0:2")
    ro = tmp_path / "ro"
    if not _mount_read_only(root, ro):
        pytest.skip("a read-only bind mount needs root and mount(2) (not allowed here)")
    try:
        [entry] = ls(ro)
        cache = ro / entry["id"]
        with pytest.raises(OSError):
            (cache / "probe").write_text("x")   # really read-only
        assert json.loads(kdcache("verify", cache, "--json").stdout)["ok"]
        assert json.loads(kdcache("info", cache, "--json").stdout)["seeds_complete"] == [0, 1]
        kdcache("train-student", "--data", fmnist_small.root, "--model", "test_resnet", "--epochs", 1,
                "--batch-size", 64, "--workers", 2, "--no-progress", "--cache-root", ro, "--out", tmp_path / "s")
        kdcache("copy", cache, tmp_path / "copy", "--no-progress")
    finally:
        subprocess.run(["umount", str(ro)])
