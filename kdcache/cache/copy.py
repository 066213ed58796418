"""`kdcache copy SRC DST`: publish or fetch a cache between stores (local, NFS, s3://).

Only finished units are copied. Each unit's shard objects are checked against the source marker's
CRC32C before they are written, read back and checked again at the destination, and only then does the
destination get the unit's marker: a destination unit with a marker is complete and intact, so an
interrupted copy resumes by running the same command (units already marked there are skipped), and a
reader of the destination never sees a half-copied unit. Copying into a cache that a dump is extending
at the same time is safe too: both sides use the same exclusive markers.

The teachers added over a cache's views (CACHE/teachers/<label>/, dump-teacher --add-teacher) are copied
with it, each the same way: its identity byte for byte (so its views_of still names the destination's
identity, which is the source's), its units checked.
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from tqdm import tqdm

from kdcache.cache.integrity import check_object, object_record, recorded
from kdcache.cache.ledger import Ledger
from kdcache.cache.marker import seal
from kdcache.cache.location import DamagedObject, Location
from kdcache.cache.schema import TeacherCache, check_compatible, refuse_foreign_directory
from kdcache.errors import KdcacheError


def _open_destination(src: TeacherCache, dst: Location) -> TeacherCache:
    if not dst.exists("zarr.json"):
        refuse_foreign_directory(dst)
        dst.create("zarr.json", src.location.read("zarr.json"))  # the identity, byte for byte
    cache = TeacherCache.open(dst, mode="r+")
    if cache.version != src.version:
        raise KdcacheError(f"{dst}: a format {cache.version} cache; the source is format {src.version}")
    check_compatible(dst, cache.spec, src.spec)
    return cache


def copy_cache(src_where, dst_where, seeds: Optional[List[int]] = None, workers: int = 8,
               progress: bool = True) -> dict:
    """Copy a cache and the teachers added over its views (each into DST/teachers/<label>/, its identity byte
    for byte, its units checked as the main cache's); `seeds`: only these seeds, of every teacher."""
    t0 = time.time()
    src = TeacherCache.open(src_where)
    dst = _open_destination(src, Location.of(dst_where))
    pairs = [("", src, dst)]
    for label, teacher in src.added_teachers().items():   # each checked to be made over src's views
        pairs.append((label, teacher, _open_destination(teacher, dst.teacher_location(label))))
    results = [_copy_units(s, d, seeds, workers, progress, label) for label, s, d in pairs]
    damaged = [f"teacher {label}: {line}" if label else line
               for (label, _, _), r in zip(pairs, results) for line in r["damaged"]]
    return {"source": src.path, "destination": dst.path,
            "units_copied": sum(r["units_copied"] for r in results),
            "units_already_there": sum(r["units_already_there"] for r in results),
            "bytes_copied": sum(r["bytes_copied"] for r in results), "damaged": damaged,
            "seeds_complete": dst.complete_seeds(),
            "teachers": {d.label: d.complete_seeds() for _, _, d in pairs},
            "seconds": round(time.time() - t0, 2)}


def _copy_units(src: TeacherCache, dst: TeacherCache, seeds: Optional[List[int]], workers: int, progress: bool,
                label: str = "") -> dict:
    """Copy the finished units of one cache (a main cache or an added teacher) into its opened destination."""
    wanted = [s for s in src.seeds if seeds is None or s in seeds]
    # the seeds' group and array metadata (identical documents; created exclusively, so repeatable)
    for key in src.location.list("seeds"):
        if key.endswith("zarr.json") and key.split("/")[1].isdigit() and int(key.split("/")[1]) in wanted \
                or key == "seeds/zarr.json":
            if not dst.location.exists(key):
                dst.location.create(key, src.location.read(key))
    done_src, done_dst = src.ledger.done_units(), dst.ledger.done_units()
    todo = [(s, b) for s in wanted for b in sorted(done_src.get(s, ())) if b not in done_dst.get(s, ())]
    skipped = sum(len(done_src.get(s, ()) & done_dst.get(s, set())) for s in wanted)
    src_arrays = {s: src.arrays(s) for s in {s for s, _ in todo}}
    damaged: List[str] = []
    markers: Dict[int, Dict[int, dict]] = {}
    for s in sorted({s for s, _ in todo}):  # a unit whose marker fails its own check is not copied
        markers[s], bad = src.checked_markers(s)
        damaged += [bad[b] for b in sorted(bad)]
    bad_markers = list(damaged)
    todo = [(s, b) for s, b in todo if b in markers[s]]
    copied_bytes = 0

    def copy_unit(unit) -> int:
        return _copy_unit(src, dst, unit, src_arrays[unit[0]], markers[unit[0]][unit[1]], damaged)

    bar = tqdm(total=len(todo), unit="unit", desc=f"copy {label}".strip(), file=sys.stderr,
               disable=not progress or None, mininterval=1.0)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for n in pool.map(copy_unit, todo):
            copied_bytes += n
            bar.update(1)
    bar.close()
    return {"units_copied": len(todo) - len(damaged) + len(bad_markers), "units_already_there": skipped,
            "bytes_copied": copied_bytes, "damaged": damaged}


def _copy_unit(src: TeacherCache, dst: TeacherCache, unit, src_arrays: dict, marker: dict, damaged: List[str]) -> int:
    """One unit: its objects checked against the source marker, written, read back and checked, then marked."""
    seed, block = unit
    keys = {name: src.chunk_key(seed, arr, name, block) for name, arr in src_arrays.items()}
    try:
        data = src.location.read_many(keys.values())
    except DamagedObject as exc:   # a published root's object that fails its index (kdcache.cache.http)
        a, b = src.spec.block_bounds(block)
        damaged.append(f"seed {seed}, unit {block} (samples {a}:{b}): {exc}")
        return 0
    records: Dict[str, dict] = {}
    for name, key in keys.items():
        why = check_object(data[key], recorded(marker, name))
        if why:
            a, b = src.spec.block_bounds(block)
            damaged.append(f"seed {seed}, unit {block} (samples {a}:{b}), array {name}: {why}")
            return 0
        records[name] = dict(object_record(data[key]), key=key)
    for key in keys.values():
        dst.location.write(key, data[key])
    dst.location.sync(keys.values())
    back = dst.location.read_many(keys.values())
    for name, key in keys.items():
        why = check_object(back[key], records[name])
        if why:
            raise KdcacheError(f"{dst.path}: {key} does not read back as written ({why})")
    payload = dict(marker, objects=records, copied_from=src.path, copied_at=time.time())
    dst.location.create(Ledger.marker_key(seed, block), seal(payload, dst.identity_hash))
    return sum(len(d) for d in data.values())


def copy_cache_with(cfg) -> dict:
    """copy_cache() with a kdcache.teacher.config.CopyConfig; with cfg.root the destination is the cache's place
    under the root cfg.dst (dst/<cache id>, kdcache.cache.catalog)."""
    dst = cfg.dst
    if cfg.root:
        from kdcache.cache.catalog import cache_id
        dst = str(Location.of(cfg.dst).child(cache_id(TeacherCache.open(cfg.src).spec)))
    return copy_cache(cfg.src, dst, seeds=cfg.seeds, workers=cfg.workers, progress=cfg.progress)
