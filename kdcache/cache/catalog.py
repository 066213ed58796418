"""Cache roots: one directory or bucket prefix holding many caches, each under an id derived from what
made it, so that jobs of one identity meet in one cache and `kdcache ls` can say what a root holds.

    ROOT/<teacher>-<split>-<hash>/     a cache (kdcache.cache.schema)

The hash covers the teacher's weights (sha256) and normalisation, the dataset split's fingerprint, the
view recipe, the global seed, k and the stored value type: everything that changes a stored row. The
unit size is left out (it changes the layout, not the rows): a dump into an existing cache takes its.
"""

import hashlib
import json
import re
from typing import List, Optional

from kdcache.cache.location import Location
from kdcache.cache.schema import CacheSpec, NotACache, TeacherCache
from kdcache.errors import KdcacheError
from kdcache.seeds import seed_ranges


def cache_id(spec: CacheSpec) -> str:
    ident = {"teacher.sha256": spec.teacher["sha256"], "teacher.mean": spec.teacher["mean"],
             "teacher.std": spec.teacher["std"], "dataset.split_fingerprint": spec.dataset["split_fingerprint"],
             "recipe": spec.recipe, "global_seed": spec.global_seed, "topk": spec.topk,
             "values_dtype": spec.values_dtype}
    if spec.targets != "topk":   # only then: the ids of top-k caches stay what they were before format 4
        ident.update(targets=spec.targets, samples=spec.samples, sample_temperature=spec.sample_temperature)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{_id_part(spec.teacher.get('name'), 'teacher')}-{_id_part(spec.dataset.get('split'), 'train')}-{digest}"


def _id_part(text, default: str) -> str:
    """A name from a cache's metadata (someone else's cache: any string) -> letters, digits, '_' and '.' only,
    no leading dot: an id is always one plain directory name inside its root."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(text or default)).strip("_.")[:40] or default


def list_caches(root, unreadable: Optional[List[dict]] = None) -> List[TeacherCache]:
    """The caches directly under a root. Other Zarr groups and files there are ignored; a cache that
    cannot be opened (damaged identity, a format this kdcache does not read) is appended to `unreadable`
    as {"id", "path", "error"}, never dropped silently."""
    loc = Location.of(root)
    if loc.is_local and not loc.path.is_dir():
        raise KdcacheError(f"{root}: no such cache root (not a directory)")
    out = []
    for name in loc.children():
        try:
            child = loc.child(name)
        except KdcacheError:
            continue  # a name no cache id can have (kdcache.cache.location.check_name)
        if child.exists("zarr.json"):
            try:
                out.append(TeacherCache.open(child))
            except NotACache:
                continue
            except KdcacheError as exc:
                if unreadable is not None:
                    unreadable.append({"id": name, "path": str(child), "error": str(exc)})
    return out


def metadata_problems(cache: TeacherCache) -> List[str]:
    """What is wrong with a cache's array metadata and unit markers (each named by path); [] when nothing."""
    problems = []
    for s in cache.seeds:
        try:
            cache.arrays(s)
        except KdcacheError as exc:
            problems.append(str(exc))
            continue
        _, bad = cache.checked_markers(s)
        problems += [bad[b] for b in sorted(bad)]
    return problems


def describe(cache: TeacherCache) -> dict:
    """One `kdcache ls` entry."""
    spec = cache.spec
    done = cache.ledger.done_units()
    seeds = cache.seeds
    complete = cache.complete_seeds(seeds, done)
    live = cache.ledger.live_claims()
    writing = sorted({s for s, _ in live})
    from kdcache.cache.schema import _recipe_summary, _teacher_entry
    added = cache.added_teachers()
    teachers = [dict(_teacher_entry(cache), seeds_complete=complete)]
    teachers += [dict(_teacher_entry(t), seeds_complete=t.complete_seeds()) for t in added.values()]
    problems = metadata_problems(cache)
    for label, t in added.items():
        problems += [f"teacher {label}: {p}" for p in metadata_problems(t)]
    return {
        "id": cache.location.name, "path": cache.path,
        "teacher": {"name": spec.teacher.get("name"), "sha256": spec.teacher.get("sha256")},
        "dataset": {"split": spec.dataset.get("split"), "num_samples": spec.num_samples,
                    "num_classes": spec.num_classes, "fingerprint": spec.dataset.get("fingerprint"),
                    "split_fingerprint": spec.dataset.get("split_fingerprint"), "path": spec.dataset.get("path")},
        "recipe": _recipe_summary(spec.recipe), "global_seed": spec.global_seed, "topk": spec.topk,
        "values_dtype": spec.values_dtype, "targets": spec.targets, "samples": spec.samples,
        "sample_temperature": spec.sample_temperature,
        "teachers": teachers,
        "seeds_complete": complete,
        "seeds_in_progress": {str(s): {"units_done": len(done.get(s, ())), "units": spec.num_blocks,
                                       "units_being_written": sum(1 for t, _ in live if t == s)}
                              for s in seeds if s not in complete and (done.get(s) or s in writing)},
        "bytes": cache.bytes_on_disk(),
        "created": cache.attrs.get("created"), "created_by": cache.attrs.get("created_by"),
        "format_version": cache.version,
        "problems": problems,
    }


def find_cache(root, split_fingerprint: str, cache_id_: Optional[str] = None,
               teacher_sha256: Optional[str] = None) -> TeacherCache:
    """The one cache under `root` for this dataset split (narrowed by id or teacher hash prefix)."""
    unreadable: List[dict] = []
    caches = list_caches(root, unreadable)
    match = [c for c in caches if c.spec.dataset.get("split_fingerprint") == split_fingerprint]
    if cache_id_:
        match = [c for c in match if c.location.name == cache_id_]
    if teacher_sha256:
        match = [c for c in match if str(c.spec.teacher.get("sha256", "")).startswith(teacher_sha256)]
    if len(match) == 1:
        return match[0]

    def line(c):
        return (f"  {c.location.name}: teacher {c.spec.teacher.get('name')} sha256 {str(c.spec.teacher.get('sha256'))[:12]}, "
                f"seeds complete {len(c.complete_seeds())}")
    if not match:
        others = "\n".join([line(c) for c in caches] + [f"  {u['id']}: unreadable: {u['error']}" for u in unreadable]) \
            or "  (no caches)"
        narrowed = " and " + ", ".join(f"{k} {v}" for k, v in (("--cache-id", cache_id_), ("--teacher-sha256", teacher_sha256)) if v) \
            if (cache_id_ or teacher_sha256) else ""
        raise KdcacheError(f"{root}: no cache for this dataset split (fingerprint {split_fingerprint[:12]}){narrowed}; "
                           f"the root holds:\n{others}")
    raise KdcacheError(f"{root}: {len(match)} caches match this dataset; choose one with --cache-id or "
                       "--teacher-sha256:\n" + "\n".join(line(c) for c in match))


def render_ls(entries: List[dict], unreadable: Optional[List[dict]] = None) -> str:
    if not entries and not unreadable:
        return "no caches"
    lines = []
    for u in unreadable or ():
        lines += [f"{u['id']}", f"  UNREADABLE {u['error']}"]
    for e in entries:
        seeds = e["seeds_complete"]
        progress = ", ".join(f"{s} ({p['units_done']}/{p['units']} units)" for s, p in e["seeds_in_progress"].items())
        lines += [f"{e['id']}",
                  f"  teacher   {e['teacher']['name']}  sha256 {str(e['teacher']['sha256'])[:16]}",
                  f"  dataset   {e['dataset']['split']} {e['dataset']['num_samples']} samples, {e['dataset']['num_classes']} "
                  f"classes, fingerprint {str(e['dataset']['split_fingerprint'])[:16]}",
                  f"  recipe    {e['recipe']}, global seed {e['global_seed']}, {targets_text(e)} {e['values_dtype']}",
                  f"  seeds     {len(seeds)} complete {seed_ranges(seeds)}" + (f"; in progress {progress}" if progress else ""),
                  *teacher_lines(e.get("teachers", ()), "  teachers  ", "            "),
                  f"  size      {e['bytes'] / 2**20:.1f} MiB, created {e['created']} by {e['created_by']}",
                  f"  path      {e['path']}"]
        lines += [f"  PROBLEM   {p}" for p in e.get("problems", ())]
    return "\n".join(lines)


def targets_text(entry: dict) -> str:
    """A cache's (or teacher's) targets in words: "top-10", or "sampled 10+8 at Td 4" (k exact + m draws at
    the sampling temperature; "sampled-cv ...": with the median control variate; docs/cache-format.md)."""
    kind = entry.get("targets", "topk")
    if kind != "topk":
        return f"{kind} {entry['topk']}+{entry['samples']} at Td {entry['sample_temperature']:g}"
    return f"top-{entry['topk']}"


def teacher_lines(teachers, first: str, more: str) -> List[str]:
    """One line per teacher of a cache: label, name, weights' sha256, targets, complete seeds."""
    return [f"{first if n == 0 else more}{t['label']}: {t['name']} sha256 {str(t['sha256'])[:12]}, {targets_text(t)}, "
            f"seeds complete {seed_ranges(t['seeds_complete']) or 'none'}" for n, t in enumerate(teachers)]
