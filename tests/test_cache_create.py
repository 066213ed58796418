"""Creating a cache survives a kill at any write of its metadata: the next run opens or finishes it."""

import pytest
from zarr.storage import LocalStore

from kdcache.cache.schema import CacheSpec, TeacherCache


class Killed(BaseException):
    """Stands for kill -9: raised instead of a write, nothing after it runs."""


def _spec():
    teacher = {"name": "t", "sha256": "ab" * 32, "num_classes": 10, "mean": [0.5] * 3, "std": [0.5] * 3}
    dataset = {"fingerprint": "f", "split": "train", "split_fingerprint": "sf", "num_samples": 100,
               "num_classes": 10, "view_size": 32}
    return CacheSpec(teacher=teacher, dataset=dataset, recipe={"size": 32}, global_seed=0, topk=5, unit_size=64,
                     chunk_rows=64)


def _root_metadata_writes(tmp_path, monkeypatch):
    """Count the metadata writes (group and array zarr.json files) of a clean creation."""
    writes = []
    real_set = LocalStore.set

    async def counting_set(self, key, value):
        if key.endswith("zarr.json"):
            writes.append(key)
        return await real_set(self, key, value)
    monkeypatch.setattr(LocalStore, "set", counting_set)
    TeacherCache.create_or_open(tmp_path / "count", _spec(), [0, 1])
    monkeypatch.setattr(LocalStore, "set", real_set)
    return len(writes)


def test_a_kill_at_any_metadata_write_leaves_a_cache_the_next_run_opens(tmp_path, monkeypatch):
    writes = _root_metadata_writes(tmp_path, monkeypatch)
    assert writes >= 2 * 4  # per seed four arrays (and their groups); the root's identity is one exclusive create
    # killed before the root's identity is created: nothing but an empty directory, which the next run fills
    from kdcache.cache.location import LocalLocation

    def dying_create(self, key, data):
        raise Killed()
    monkeypatch.setattr(LocalLocation, "create", dying_create)
    with pytest.raises(Killed):
        TeacherCache.create_or_open(tmp_path / "killed-root", _spec(), [0, 1])
    monkeypatch.undo()
    assert TeacherCache.create_or_open(tmp_path / "killed-root", _spec(), [0, 1]).seeds == [0, 1]
    real_set = LocalStore.set
    for kill_at in range(writes):
        path = tmp_path / f"killed-{kill_at}"
        seen = []

        async def dying_set(self, key, value):
            if key.endswith("zarr.json") and self.root == path:
                if len(seen) == kill_at:
                    raise Killed()
                seen.append(key)
            return await real_set(self, key, value)
        monkeypatch.setattr(LocalStore, "set", dying_set)
        with pytest.raises(Killed):
            TeacherCache.create_or_open(path, _spec(), [0, 1])
        monkeypatch.setattr(LocalStore, "set", real_set)
        cache = TeacherCache.create_or_open(path, _spec(), [0, 1])  # the same command again
        assert cache.spec == _spec() and cache.seeds == [0, 1], kill_at
        assert TeacherCache.open(path).arrays(1)["logp"].shape == (100, 5)


def test_an_array_directory_without_its_metadata_is_created_again(tmp_path):
    """Seen in a kill -9 at creation: the array's folder existed (a temporary file in it), its zarr.json not."""
    TeacherCache.create_or_open(tmp_path / "c", _spec(), [0, 1])
    meta = tmp_path / "c" / "seeds" / "000001" / "logp" / "zarr.json"
    meta.unlink()
    (meta.parent / "zarr.0123abcd.partial").write_bytes(b"{")
    cache = TeacherCache.create_or_open(tmp_path / "c", _spec(), [0, 1])
    assert cache.arrays(1)["logp"].shape == (100, 5)
