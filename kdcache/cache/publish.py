"""`kdcache publish ROOT`: make a cache root readable over plain HTTP(S) by writing its index.

A static web server or a public bucket can serve a root's files but cannot list them, and a reader must be
able to check what it got. The index, ROOT/kdcache-index.json (format: kdcache.cache.http), lists every
object a reader opens, with its size and CRC32C:

- each cache's identity and array metadata (the zarr.json documents of the cache, `seeds/` and each seed's
  arrays), and the same for its added teachers (teachers/<label>/, caches of their own);
- of each finished unit: its marker (units/<seed>/<block>.json) and its shard objects. A unit without a
  marker is left out, so a root that a dump is still writing is published as a consistent snapshot of its
  finished units; a unit whose shards fail their marker's CRC32C (or are missing), or whose marker fails its
  own check, is left out too and named (the command then exits 1);
- not: claims/ and logs/ (writers' state: a reader needs neither, and they change all the time), nor any
  other file under the root.

Each publish writes the index whole (atomically: the Location's write), with generation = the previous
index's + 1, so that a reader can tell a republished root from the one it opened. Re-publishing is
incremental: an object whose size and stamp (local: mtime in ns; S3: ETag) are those the previous index
recorded keeps its checksum; the others are read and checksummed (--rehash: all of them).
"""

import argparse
import datetime
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from kdcache.cache.http import INDEX, INDEX_FORMAT, INDEX_VERSION, HttpLocation, parse_index, record_of
from kdcache.cache.integrity import recorded
from kdcache.cache.ledger import Ledger
from kdcache.cache.location import Location
from kdcache.cache.schema import NotACache, TeacherCache, seed_group_name
from kdcache.errors import KdcacheError

WRITERS_STATE = ("claims", "logs")   # never published (see the module docstring)


@dataclass
class PublishConfig:
    """What `kdcache publish` does: write root's index (root: a directory or an s3:// URL); rehash: checksum
    every object again instead of reusing the previous index's records of unchanged ones."""
    root: str
    rehash: bool = False
    workers: int = 8
    progress: bool = True

    @classmethod
    def from_options(cls, ns: argparse.Namespace) -> "PublishConfig":
        from kdcache import options
        return options.make_config(cls, options.config_values("publish", ns))


@dataclass
class _Unit:
    where: str                              # "<cache path>: seed s, unit b (samples a:e)", for messages
    keys: List[str]                         # its marker and its shard objects, under the root
    expected: Dict[str, Optional[dict]]     # shard key -> the marker's record (None: an old marker)


def publish_root(cfg: PublishConfig) -> dict:
    """Write ROOT/kdcache-index.json for the caches under cfg.root (the module docstring); returns a summary:
    generation, caches, objects, bytes, units, hashed / reused counts, damaged and unreadable entries."""
    t0 = time.time()
    loc = Location.of(cfg.root)
    if isinstance(loc, HttpLocation):
        raise KdcacheError(f"{cfg.root}: a published root is read-only; publish the root where it is stored "
                           "(a directory or an s3:// URL), then serve that")
    if loc.is_local and not loc.path.is_dir():
        raise KdcacheError(f"{cfg.root}: no such cache root (not a directory)")
    previous = _previous_index(loc)
    problems: List[str] = []
    caches = _caches(loc, problems)
    meta: List[str] = []
    units: List[_Unit] = []
    for prefix, cache in caches:   # every marker is read before the listing: a unit's shards precede its marker
        _cache_parts(cache, prefix, meta, units, problems)
    stamps = loc.stamps()
    records, hashed, hashed_bytes = _records(loc, [k for k in meta if k in stamps] + [k for u in units for k in u.keys
                                                                                      if k in stamps],
                                             stamps, previous.get("objects", {}), cfg)
    reused = len(records) - hashed
    damaged = []
    for unit in units:
        why = _unit_damage(unit, records)
        if why:
            damaged.append(f"{unit.where}: {why}; not published")
            for key in unit.keys:
                records.pop(key, None)
    generation = int(previous.get("generation", 0)) + 1
    doc = _index_document(generation, [p for p, _ in caches], records)
    loc.write(INDEX, doc)
    return {"root": loc.url, "index": f"{loc.url.rstrip('/')}/{INDEX}", "generation": generation,
            "caches": [p for p, _ in caches], "objects": len(records),
            "bytes": sum(r[0] for r in records.values()), "units": len(units) - len(damaged),
            "hashed": hashed, "hashed_bytes": hashed_bytes, "reused": reused,
            "damaged": damaged, "unreadable": problems, "index_bytes": len(doc), "seconds": round(time.time() - t0, 2)}


def _previous_index(loc) -> dict:
    """The index this publish replaces ({} when none): its generation, and its records (with their stamps)."""
    try:
        data = loc.read(INDEX)
    except FileNotFoundError:
        return {}
    where = f"{loc.url.rstrip('/')}/{INDEX}"
    parse_index(data, where)   # the same checks a reader makes
    doc = json.loads(data)
    return {"generation": doc["generation"], "objects": doc["objects"]}


def _caches(loc, problems: List[str]) -> List[Tuple[str, TeacherCache]]:
    """(key prefix under the root, cache) of every cache to publish: the caches directly under the root, or the
    root itself when it is one cache."""
    if loc.exists("zarr.json"):
        try:
            return [("", TeacherCache.open(loc))]
        except NotACache:
            pass   # another Zarr group: a root holding caches
    from kdcache.cache.catalog import list_caches
    unreadable: List[dict] = []
    caches = [(c.location.name, c) for c in list_caches(loc, unreadable)]
    problems += [f"{u['path']}: {u['error']}; not published" for u in unreadable]
    return caches


def _cache_parts(cache: TeacherCache, prefix: str, meta: List[str], units: List["_Unit"], problems: List[str]) -> None:
    """The metadata documents and finished units of one cache, then of its added teachers."""
    p = f"{prefix}/" if prefix else ""
    seeds = []
    for s in cache.seeds:
        try:
            arrays = cache.arrays(s)
        except KdcacheError as exc:
            problems.append(f"{exc}; seed {s} not published")
            continue
        seeds.append(s)
        good, bad = cache.checked_markers(s)
        problems += [f"{bad[b]}; not published" for b in sorted(bad)]
        for block, marker in sorted(good.items()):
            shards = {name: p + cache.chunk_key(s, arr, name, block) for name, arr in arrays.items()}
            a, e = cache.spec.block_bounds(block)
            units.append(_Unit(f"{cache.path}: seed {s}, unit {block} (samples {a}:{e})",
                               [p + Ledger.marker_key(s, block), *shards.values()],
                               {key: recorded(marker, name) for name, key in shards.items()}))
    meta += [p + "zarr.json", p + "seeds/zarr.json"]
    meta += [p + f"{seed_group_name(s)}/zarr.json" for s in seeds]
    meta += [p + f"{seed_group_name(s)}/{a}/zarr.json" for s in seeds for a in cache.array_names]
    if prefix.count("/") or cache.views_of:
        return   # an added teacher has no teachers of its own
    try:
        added = cache.added_teachers()
    except KdcacheError as exc:
        problems.append(f"{exc}; its added teachers are not published")
        return
    for label, teacher in added.items():
        _cache_parts(teacher, f"{p}teachers/{label}", meta, units, problems)


def _records(loc, keys: List[str], stamps: Dict[str, tuple], previous: Dict[str, list],
             cfg: PublishConfig) -> Tuple[Dict[str, list], int, int]:
    """key -> [bytes, crc32c, stamp] of every key: the previous record where the object is unchanged (same size
    and stamp), else read and checksummed (cfg.workers at once). Also: how many were read, and their bytes."""
    out: Dict[str, list] = {}
    todo = []
    for key in dict.fromkeys(keys):
        size, stamp = stamps[key]
        old = previous.get(key)
        if (not cfg.rehash and stamp is not None and isinstance(old, list) and len(old) >= 3 and old[0] == size
                and old[2] == stamp):
            out[key] = [size, old[1], stamp]
        else:
            todo.append(key)

    def one(key):
        return key, list(record_of(loc.read(key))) + [stamps[key][1]]
    from tqdm import tqdm
    read_bytes = 0
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool, \
            tqdm(total=len(todo), unit="obj", desc="checksums", disable=not cfg.progress or not todo) as bar:
        for key, rec in pool.map(one, todo):
            out[key] = rec if rec[2] is not None else rec[:2]
            read_bytes += rec[0]
            bar.update(1)
    return out, len(todo), read_bytes


def _unit_damage(unit: "_Unit", records: Dict[str, list]) -> Optional[str]:
    """Why a finished unit cannot be published (an object missing, a shard that fails its marker), or None."""
    for key in unit.keys:
        if key not in records:
            return f"{key} is missing"
    for key, want in unit.expected.items():
        if want is not None and (records[key][0] != want["bytes"] or records[key][1] != want["crc32c"]):
            return (f"{key} has {records[key][0]} bytes, CRC32C {records[key][1]}; its marker records {want['bytes']} "
                    f"bytes, CRC32C {want['crc32c']} (the shard is damaged)")
    return None


def _index_document(generation: int, caches: List[str], records: Dict[str, list]) -> bytes:
    """The index's bytes: one object per line (a diff between two generations reads line by line)."""
    from kdcache import __version__
    now = datetime.datetime.now(datetime.timezone.utc)
    head = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "generation": generation,
            "published": now.isoformat(timespec="seconds"), "kdcache_version": __version__, "caches": caches}
    lines = [f"{json.dumps(k)}: {json.dumps(records[k], separators=(',', ':'))}" for k in sorted(records)]
    return (json.dumps(head)[:-1] + ', "objects": {\n' + ",\n".join(lines) + "\n}}\n").encode()
