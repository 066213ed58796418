"""Damage detection: each unit's marker lists the size and CRC32C of the shard objects it was written as.

A reader fetches a unit's objects, checks them against the marker, and decodes only what matches, so a
damaged, truncated, deleted or replaced shard is refused by name (seed, unit, array) instead of being
trained on. Zarr's sharding index has its own CRC32C, but a shard's data bytes do not (Blosc frames carry
no checksum), and a deleted shard silently reads as fill values: hence the per-object records.
Markers written before these records existed (kdcache 0.1) are checked for presence only.
"""

from typing import Dict, Optional

import google_crc32c  # zarr's own dependency (its crc32c codec)
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from kdcache.cache.place import DamagedObject
from kdcache.cache.schema import seed_group_name
from kdcache.errors import KdcacheError


class DamagedUnit(KdcacheError):
    pass


def object_record(data: bytes) -> dict:
    return {"bytes": len(data), "crc32c": f"{google_crc32c.value(data):08x}"}


def recorded(marker: dict, name: str) -> Optional[dict]:
    """The marker's record of one array's shard object (None in markers written before checksums)."""
    return (marker.get("objects") or {}).get(name)


def check_object(data: Optional[bytes], record: Optional[dict]) -> Optional[str]:
    """Why `data` is not the object the marker recorded, or None when it is."""
    if data is None:
        return "its shard object is missing"
    if record is None:
        return None  # an old marker: presence is all we can check
    if len(data) != record["bytes"]:
        return f"its shard object has {len(data)} bytes, the marker recorded {record['bytes']}"
    crc = f"{google_crc32c.value(data):08x}"
    if crc != record["crc32c"]:
        return f"its shard object's CRC32C is {crc}, the marker recorded {record['crc32c']}"
    return None


def damaged(cache, seed: int, block: int, name: str, why: str) -> DamagedUnit:
    a, b = cache.spec.block_bounds(block)
    return DamagedUnit(f"{cache.path}: seed {seed}, unit {block} (samples {a}:{b}), array {name}: {why}; the unit is "
                       f"damaged and is not used (to recompute it, delete {cache.ledger.marker_key(seed, block)} "
                       "and run the same dump-teacher again)")


def read_units(cache, seed: int, markers: Dict[int, dict]) -> Dict[str, np.ndarray]:
    """The arrays of one seed, the units in `markers` read, checked and decoded (other rows: fill values).

    Each array's shard objects are fetched in one batch (concurrent GETs on an object store), checked,
    and decoded from memory: the bytes that were checked are the bytes that are used."""
    out = {}
    proto = default_buffer_prototype().buffer
    for name, arr in cache.arrays(seed).items():
        prefix = f"{seed_group_name(seed)}/{name}/"
        keys = {b: cache.chunk_key(seed, arr, name, b) for b in markers}
        got = cache.location.read_many(keys.values())
        store = {"zarr.json": proto.from_bytes(cache.location.read(prefix + "zarr.json"))}
        for b, key in keys.items():
            why = check_object(got[key], recorded(markers[b], name))
            if why:
                raise damaged(cache, seed, b, name, why)
            store[key[len(prefix):]] = proto.from_bytes(got[key])
        mem = zarr.open_array(MemoryStore(store), mode="r")
        data = np.full(arr.shape, arr.fill_value, dtype=arr.dtype)
        for b in markers:
            a, e = cache.spec.block_bounds(b)
            try:
                data[a:e] = mem[a:e]
            except Exception as exc:  # bytes the codecs cannot decode (old markers have no checksum)
                raise damaged(cache, seed, b, name, f"its shard cannot be decoded ({type(exc).__name__}: {exc})") from None
        out[name] = data
    return out


def unit_records(cache, seed: int, block: int) -> Dict[str, dict]:
    """Size and CRC32C of a just-written unit's shard objects, read back from the store (for its marker)."""
    arrays = cache.arrays(seed)
    keys = {name: cache.chunk_key(seed, arr, name, block) for name, arr in arrays.items()}
    cache.location.sync(keys.values())
    got = cache.location.read_many(keys.values())
    out = {}
    for name, key in keys.items():
        if got[key] is None:
            raise KdcacheError(f"{cache.path}: {key} was written but cannot be read back")
        out[name] = dict(object_record(got[key]), key=key)
    return out


def damaged_units(cache, seed: int, markers: Dict[int, dict]) -> Dict[int, str]:
    """block -> the damage message, for every finished unit of `seed` whose objects fail their check."""
    out = {}
    for name, arr in cache.arrays(seed).items():
        keys = {b: cache.chunk_key(seed, arr, name, b) for b in markers}
        try:
            got, refused = cache.location.read_many(keys.values()), {}
        except DamagedObject as exc:   # objects of a published root that fail its index (kdcache.cache.http)
            got, refused = exc.got, exc.why
        for b, key in keys.items():
            why = refused.get(key) or check_object(got.get(key), recorded(markers[b], name))
            if why and b not in out:
                out[b] = str(damaged(cache, seed, b, name, why))
    return out


def check_sizes(cache, seeds) -> None:
    """Cheap check before training starts, from one listing: every finished unit of `seeds` has its shard
    objects, of the recorded sizes. (The CRC32C is checked when each slab is read.)"""
    sizes = cache.location.sizes("seeds")
    for seed in seeds:
        arrays = cache.arrays(seed)
        for block, marker in sorted(cache.markers(seed).items()):
            for name, arr in arrays.items():
                key = cache.chunk_key(seed, arr, name, block)
                record = recorded(marker, name)
                if key not in sizes:
                    raise damaged(cache, seed, block, name, "its shard object is missing")
                if record is not None and sizes[key] != record["bytes"]:
                    raise damaged(cache, seed, block, name, f"its shard object has {sizes[key]} bytes, "
                                                            f"the marker recorded {record['bytes']}")
