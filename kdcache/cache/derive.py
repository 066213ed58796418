"""`kdcache derive SRC DST`: a smaller cache made from a cache: a smaller k, some seeds, some teachers.

A smaller k is exact. The first K of the k stored columns are kept as they are stored (the same uint16 or
float32 values: decoding and encoding them again gives the same numbers), and the probability of the
dropped classes joins the tail mass, in float64 from the stored values:

    log_tail' = logaddexp(log_tail, logsumexp(logp[:, K:]))

So a derived row is the row a top-K dump of the same teacher over the same views stores, up to the rounding
of the dropped values: each was stored within half a step of 1/2048 in log space (2.44e-4 relative on its
probability), so the merged tail mass is within 2.44e-4 relative (plus float32). Sampled targets keep their
k: their draws come from the classes beyond the original top-k, so they are no sample of a larger tail.

Writing follows kdcache.cache.copy: a source unit's shard objects are checked against its marker before they
are used; the destination's shards are written, read back and checked, and only then is the unit's marker
created, exclusively, sealed with the destination's identity. A rerun of the same command resumes (units
marked at the destination are skipped), from any store to any store. The derived cache has an identity of
its own: the source teacher's spec with the new k, plus `derived_from` (the source's identity hash, path,
k, seeds and teachers), so a run with other options into the same DST is refused, naming what differs.
"""

import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, List, Optional, Tuple

import numpy as np
import zarr
from tqdm import tqdm
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from kdcache.cache.catalog import targets_text
from kdcache.cache.integrity import DamagedUnit, check_object, object_record, recorded
from kdcache.cache.ledger import Ledger
from kdcache.cache.location import Location
from kdcache.cache.marker import seal
from kdcache.cache.schema import (TARGET_ARRAYS, CacheSpec, IncompatibleCache, TeacherCache, decode_logp,
                                  seed_group_name)
from kdcache.errors import KdcacheError
from kdcache.seeds import seed_ranges

MARKER_FIELDS = ("views", "correct", "device", "amp")   # what a derived unit's marker keeps of its source's


def fewer_columns(logp: np.ndarray, indices: np.ndarray, log_tail: np.ndarray, k: int,
                  encoding: dict) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k rows as stored (logp uint16 or float32) -> their top-`k` rows: the first k columns as they are,
    the others' probability added to the tail mass (float64, from the decoded stored values)."""
    if k >= logp.shape[1]:
        return logp, indices, log_tail
    both = np.concatenate([decode_logp(logp[:, k:], encoding), log_tail[:, None]], 1).astype(np.float64)
    top = both.max(1, keepdims=True)   # the log-sum-exp of the dropped values and the tail (-inf: all -inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = top[:, 0] + np.log(np.exp(both - np.where(np.isfinite(top), top, 0)).sum(1))
    return logp[:, :k], indices[:, :k], tail.astype(np.float32)


@dataclasses.dataclass
class _Teacher:
    """One teacher of the derived cache: where its rows come from, its k there, and its cache there."""
    label: str
    src: TeacherCache                       # its cache in SRC (its targets)
    k: int                                  # its k in DST
    params: Optional[TeacherCache] = None   # SRC's main cache (the views), for DST's own teacher
    dst: Optional[TeacherCache] = None

    @property
    def spec(self) -> CacheSpec:
        return dataclasses.replace(self.src.spec, topk=self.k)

    @property
    def sources(self) -> Dict[str, TeacherCache]:
        """array -> the source cache it is read from."""
        out = {name: self.src for name in TARGET_ARRAYS}
        if self.params is not None:
            out["params"] = self.params
        return out


def _derived_k(label: str, cache: TeacherCache, topk: Optional[int]) -> int:
    spec = cache.spec
    if topk is None or topk == spec.topk:
        return spec.topk
    if spec.sampled:
        raise KdcacheError(f"--topk {topk}: teacher {label} of {cache.path} has {spec.targets} targets ({spec.topk} exact "
                           f"classes and {spec.samples} draws from the classes beyond them): the draws are no sample "
                           "of a larger tail, so a smaller k cannot be derived from them; derive its seeds or "
                           "teachers without --topk, or dump again with the k you want")
    if topk > spec.topk:
        raise KdcacheError(f"--topk {topk}: teacher {label} of {cache.path} stores its top {spec.topk} classes per "
                           f"view; a derived cache keeps at most those (--topk 1 to {spec.topk}; dump again for more)")
    return topk


def _choose_teachers(src: TeacherCache, labels: Optional[List[str]], topk: Optional[int]) -> List[_Teacher]:
    """The derived cache's teachers, its own first (with SRC's views), each with its derived k (checked)."""
    available = src.teachers()
    labels = list(labels or available)
    unknown = [t for t in labels if t not in available]
    if unknown:
        raise KdcacheError(f"--teachers: {src.path} has no teacher {unknown[0]!r}; its teachers are "
                           f"{', '.join(available)}")
    parts = [_Teacher(t, available[t], _derived_k(t, available[t], topk)) for t in labels]
    parts[0].params = src
    return parts


def _choose_seeds(src: TeacherCache, parts: List[_Teacher], seeds: Optional[List[int]]) -> List[int]:
    """The seeds to derive: those asked for, each complete in SRC's main cache and in every chosen teacher;
    by default every seed that is."""
    caches = {src.path: ("the views", src)}
    caches.update({p.src.path: (f"teacher {p.label}", p.src) for p in parts})
    complete = None
    for what, cache in caches.values():
        done = set(cache.complete_seeds())
        complete = done if complete is None else complete & done
        missing = [s for s in (seeds or []) if s not in done]
        if missing:
            raise KdcacheError(f"--seeds: {src.path} holds seeds {seed_ranges(missing)} of {what} incompletely or "
                               f"not at all (complete: {seed_ranges(done)}); a derived cache is "
                               "made from complete seeds (finish them with dump-teacher, or derive others)")
    if seeds is None:
        seeds = sorted(complete)
        if not seeds:
            raise KdcacheError(f"{src.path}: no seed is complete in every teacher chosen; nothing to derive")
    return sorted(seeds)


def _place(loc: Location) -> str:
    """A cache's place as recorded and compared: absolute for a local one (the record outlives the working
    directory)."""
    return str(loc.path.resolve()) if loc.is_local else loc.url.rstrip("/")


def _recorded(dst: Location) -> Optional[dict]:
    """The derived_from of an existing DST (None when there is none yet)."""
    if not dst.exists("zarr.json"):
        return None
    cache = TeacherCache.open(dst)
    rec = cache.attrs.get("derived_from")
    if not isinstance(rec, dict):
        raise IncompatibleCache(f"{dst}: a cache that was not derived (no derived_from); derive into another DST")
    return dict(rec, _topk=cache.spec.topk, _label=cache.label)


def _check_recorded(dst: Location, recorded_: Optional[dict], wanted: dict, lead: _Teacher) -> dict:
    """Refuse another derivation into an existing DST, naming the first setting that differs; the source may
    have moved since (a copy of it: the same identity), so the recorded path is kept."""
    if recorded_ is None:
        return wanted
    asked = dict(wanted, _topk=lead.k, _label=lead.label)
    names = {"identity_sha256": "the source's identity", "teachers": "--teachers", "seeds": "--seeds",
             "topk": "the source's k", "_topk": "--topk", "_label": "its own teacher"}
    for key, name in names.items():
        if recorded_.get(key) != asked[key]:
            was, now = recorded_.get(key), asked[key]
            if key == "seeds":
                was, now = seed_ranges(was or []), seed_ranges(now)
            elif key == "identity_sha256":
                was, now = str(was)[:16], now[:16]
            raise IncompatibleCache(f"{dst}: derived with {name} {was}, this run asks for {now}; derive into "
                                    "another DST (the same command resumes this one)")
    return dict(wanted, path=recorded_.get("path", wanted["path"]))


def _open_destination(dst_where, src: TeacherCache, parts: List[_Teacher], seeds: List[int],
                      recorded_: Optional[dict]) -> TeacherCache:
    """Create DST (or open it, checked) with its own teacher's spec, then its other teachers under teachers/."""
    dst = Location.of(dst_where)
    lead = parts[0]
    derived_from = _check_recorded(dst, recorded_, {
        "identity_sha256": src.identity_hash, "path": _place(src.location), "topk": lead.src.spec.topk,
        "seeds": seeds, "teachers": [p.label for p in parts]}, lead)
    extra = {"derived_from": derived_from}
    if isinstance(src.attrs.get("renderer"), dict):   # what made the views: the source's renderer, not ours
        extra["renderer"] = src.attrs["renderer"]
    if lead.label != lead.spec.teacher.get("name"):   # an added teacher leads: its label stays its label
        extra["teacher_label"] = lead.label
    lead.dst = TeacherCache.create_or_open(dst, lead.spec, seeds, extra=extra)
    for part in parts[1:]:
        part.dst = lead.dst.add_teacher(part.label, part.spec, seeds)
    return lead.dst


def _decode(doc: bytes, data: bytes, rel: str, rows: slice) -> np.ndarray:
    """One shard object's rows, decoded from memory with its array's metadata document."""
    proto = default_buffer_prototype().buffer
    mem = zarr.open_array(MemoryStore({"zarr.json": proto.from_bytes(doc), rel: proto.from_bytes(data)}), mode="r")
    return mem[rows]


def _encode(doc: bytes, rel: str, rows: slice, values: np.ndarray) -> bytes:
    """The shard object that zarr writes for these rows, made in memory with the array's metadata document."""
    proto = default_buffer_prototype().buffer
    store = {"zarr.json": proto.from_bytes(doc)}
    zarr.open_array(MemoryStore(store), mode="r+")[rows] = values
    if rel not in store:
        raise KdcacheError(f"{rel}: zarr wrote no shard for rows {rows.start}:{rows.stop} (all fill values)")
    return store[rel].to_bytes()


class _Derivation:
    """The work of one derive: units (teacher, seed, block), the sources' checked markers, the arrays' keys
    and metadata documents (read once, shared by the worker threads)."""

    def __init__(self, parts: List[_Teacher], seeds: List[int]):
        self.parts, self.seeds = parts, seeds
        self.damaged: List[str] = []
        self.markers: Dict[Tuple[str, int], Dict[int, dict]] = {}
        self.docs: Dict[Tuple[str, int, str], bytes] = {}
        self.keys: Dict[Tuple[str, int, str], tuple] = {}   # (cache, seed, array) -> (its chunk key rule, ndim)

    def todo(self) -> Tuple[list, int]:
        """The units not marked at the destination yet, each with good markers at the source; and how many
        are there already."""
        todo, there = [], 0
        for part in self.parts:
            done = part.dst.ledger.done_units()
            for seed in self.seeds:
                there += len(done.get(seed, set()) & set(range(part.src.spec.num_blocks)))
                todo += [(part, seed, b) for b in range(part.src.spec.num_blocks) if b not in done.get(seed, ())]
        for cache in {c.path: c for p, _, _ in todo for c in p.sources.values()}.values():
            for seed in sorted({s for _, s, _ in todo}):
                self._read_markers(cache, seed)
        return [(p, s, b) for p, s, b in todo if all(b in self.markers[c.path, s] for c in p.sources.values())], there

    def _read_markers(self, cache: TeacherCache, seed: int) -> None:
        if (cache.path, seed) not in self.markers:
            good, bad = cache.checked_markers(seed)   # a unit whose marker fails its own check is not derived
            self.markers[cache.path, seed] = good
            self.damaged += [bad[b] for b in sorted(bad)]

    def layout(self, todo: list) -> None:
        """Read the metadata documents and shard key rules of the arrays that `todo` reads and writes."""
        for cache, seed in {(c.path, s): (c, s) for p, s, _ in todo for c in (p.dst, *p.sources.values())}.values():
            for name, arr in cache.arrays(seed).items():
                self.docs[cache.path, seed, name] = cache.location.read(f"{seed_group_name(seed)}/{name}/zarr.json")
                self.keys[cache.path, seed, name] = (arr.metadata.encode_chunk_key, arr.ndim)

    def key(self, cache: TeacherCache, seed: int, name: str, block: int) -> Tuple[str, str]:
        """(store key, key relative to the array) of unit (seed, block)'s shard of one array."""
        encode, ndim = self.keys[cache.path, seed, name]
        rel = encode((block,) + (0,) * (ndim - 1))
        return f"{seed_group_name(seed)}/{name}/{rel}", rel

    def read(self, part: _Teacher, seed: int, block: int) -> Dict[str, bytes]:
        """The unit's source shard objects, each checked against its marker (DamagedUnit names a bad one)."""
        out = {}
        for cache in {c.path: c for c in part.sources.values()}.values():
            names = [n for n, c in part.sources.items() if c is cache]
            keys = {n: self.key(cache, seed, n, block)[0] for n in names}
            got = cache.location.read_many(keys.values())
            for name, key in keys.items():
                why = check_object(got[key], recorded(self.markers[cache.path, seed][block], name))
                if why:
                    raise self._damage(part, cache, seed, block, name, why)
                out[name] = got[key]
        return out

    def _damage(self, part: _Teacher, cache: TeacherCache, seed: int, block: int, name: str, why: str) -> DamagedUnit:
        a, b = cache.spec.block_bounds(block)
        whose = "" if cache is part.params or not cache.views_of else f"teacher {part.label}, "
        return DamagedUnit(f"{whose}seed {seed}, unit {block} (samples {a}:{b}), array {name}: {why}")

    def transform(self, part: _Teacher, seed: int, block: int, raw: Dict[str, bytes]) -> Dict[str, bytes]:
        """The destination's shard objects: a source object as it is where the array is unchanged and laid
        out alike, else decoded, cut to k columns (the tail taking the rest) and encoded again."""
        a, b = part.src.spec.block_bounds(block)
        rows = slice(a, b)
        src_of, dst = part.sources, part.dst
        same = {n for n in raw if (n == "params" or part.k == part.src.spec.topk)
                and json.loads(self.docs[src_of[n].path, seed, n]) == json.loads(self.docs[dst.path, seed, n])}
        out = {n: raw[n] for n in same}
        if len(out) == len(raw):
            return out
        values = {}
        for n in raw:
            if n not in same:
                doc, rel = self.docs[src_of[n].path, seed, n], self.key(src_of[n], seed, n, block)[1]
                try:
                    values[n] = _decode(doc, raw[n], rel, rows)
                except Exception as exc:  # bytes the codecs cannot decode (old markers have no checksum)
                    raise self._damage(part, src_of[n], seed, block, n, f"its shard cannot be decoded "
                                       f"({type(exc).__name__}: {exc})") from None
        if part.k != part.src.spec.topk:
            values["logp"], values["indices"], values["log_tail"] = fewer_columns(
                values["logp"], values["indices"], values["log_tail"], part.k, part.src.attrs["logp_encoding"])
        for n in raw:
            if n not in same:
                out[n] = _encode(self.docs[dst.path, seed, n], self.key(dst, seed, n, block)[1], rows, values[n])
        return out

    def write(self, part: _Teacher, seed: int, block: int, objects: Dict[str, bytes]) -> dict:
        """Write the unit's shard objects, read them back and check them; their records for the marker."""
        dst = part.dst
        keys = {n: self.key(dst, seed, n, block)[0] for n in objects}
        records = {n: dict(object_record(objects[n]), key=keys[n]) for n in objects}
        for n, key in keys.items():
            dst.location.write(key, objects[n])
        dst.location.sync(keys.values())
        back = dst.location.read_many(keys.values())
        for n, key in keys.items():
            why = check_object(back[key], records[n])
            if why:
                raise KdcacheError(f"{dst.path}: {key} does not read back as written ({why})")
        return records

    def unit(self, job) -> int:
        """Derive one unit: 1 when written, 0 when its source is damaged (named in self.damaged)."""
        part, seed, block = job
        try:
            raw = self.read(part, seed, block)
            objects = self.transform(part, seed, block, raw)
        except DamagedUnit as exc:
            self.damaged.append(str(exc))
            return 0
        records = _store_unit(self, part, seed, block, objects)
        source = self.markers[part.src.path, seed][block]
        payload = {k: source[k] for k in MARKER_FIELDS if k in source}
        payload.update(objects=records, host=part.dst.ledger.host, time=time.time(),
                       derived_from={"path": part.src.path, "identity_sha256": part.src.identity_hash})
        part.dst.location.create(Ledger.marker_key(seed, block), seal(payload, part.dst.identity_hash))
        return 1


def _store_unit(job: _Derivation, part: _Teacher, seed: int, block: int, objects: Dict[str, bytes]) -> dict:
    """Write one derived unit's shards (a seam for the tests' interruptions)."""
    return job.write(part, seed, block, objects)


def _run(job: _Derivation, todo: list, workers: int, progress: bool) -> int:
    """The units in a pool of threads; on an error (or an interrupt) the units not started are cancelled, the
    running ones finish, and the error is raised: the same command then resumes. The units written."""
    bar = tqdm(total=len(todo), unit="unit", desc="derive", file=sys.stderr, disable=not progress or None,
               mininterval=1.0)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(job.unit, u) for u in todo]
        written = 0
        try:
            for fut in as_completed(futures):
                written += fut.result()
                bar.update(1)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        finally:
            bar.close()
    return written


def derive_cache(src_where, dst_where, topk: Optional[int] = None, seeds: Optional[List[int]] = None,
                 teachers: Optional[List[str]] = None, workers: int = 4, progress: bool = True) -> dict:
    """Write the derived cache DST from SRC (module docstring); a summary of what was done."""
    t0 = time.time()
    src = TeacherCache.open(src_where)
    if src.views_of:
        raise KdcacheError(f"{src.path}: an added teacher (its views are its main cache's); derive from the main "
                           f"cache with --teachers {src.label}")
    if src.version < 2:
        raise KdcacheError(f"{src.path}: a format {src.version} cache; derive reads format 2 and later (convert it "
                           "by dumping again)")
    if _place(Location.of(dst_where)) == _place(src.location):
        raise KdcacheError(f"{src.path}: DST is the source itself; derive into another place")
    recorded_ = _recorded(Location.of(dst_where))
    if recorded_ is not None:   # resuming: by default the seeds and teachers it was made with
        seeds = seeds if seeds is not None else recorded_.get("seeds")
        teachers = teachers or recorded_.get("teachers")
    parts = _choose_teachers(src, teachers, topk)
    seeds = _choose_seeds(src, parts, seeds)
    dst = _open_destination(dst_where, src, parts, seeds, recorded_)
    job = _Derivation(parts, seeds)
    todo, there = job.todo()
    job.layout(todo)
    written = _run(job, todo, workers, progress)
    complete = set(seeds)
    for part in parts:
        complete &= set(part.dst.complete_seeds(seeds))
    return {"source": src.path, "destination": dst.path, "teachers": [p.label for p in parts],
            "topk": parts[0].k, "targets": targets_text(dataclasses.asdict(parts[0].dst.spec)),
            "units_written": written, "units_already_there": there,
            "damaged": job.damaged, "seeds_complete": sorted(complete), "seconds": round(time.time() - t0, 2)}


def derive_cache_with(cfg) -> dict:
    """derive_cache() with a kdcache.teacher.config.DeriveConfig."""
    return derive_cache(cfg.src, cfg.dst, topk=cfg.topk, seeds=cfg.seeds, teachers=cfg.teachers,
                        workers=cfg.workers, progress=cfg.progress)
