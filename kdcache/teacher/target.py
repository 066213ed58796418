"""The cache a dump writes into: its identity (CacheSpec), where it is (--out or under --cache-root), and
its creation by each launch's coordinator, which the other ranks wait for.

With --add-teacher the dump writes another teacher's targets over the views of an existing cache (the
"main" cache): CACHE/teachers/<label>/, a cache of its own (kdcache.cache.schema.TeacherCache.add_teacher)
whose views are the main cache's. Every rendered pass is checked against the view parameters the main
cache stores (MainViews) before the teacher scores it."""

import errno
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.integrity import check_object, damaged, recorded
from kdcache.cache.location import Location
from kdcache.cache.schema import CacheSpec, TeacherCache, check_compatible, seed_group_name
from kdcache.data.dataset import PreparedDataset
from kdcache.errors import KdcacheError
from kdcache.seeds import seed_ranges
from kdcache.teacher.config import DumpConfig

DEFAULT_UNIT_SIZE = 32768


def dataset_identity(ds: PreparedDataset, split_name: str) -> dict:
    split = ds.split(split_name)
    return {"fingerprint": ds.fingerprint, "split": split_name, "split_fingerprint": split.fingerprint,
            "num_samples": split.num_samples, "num_classes": ds.num_classes, "view_size": ds.view_size,
            "path": str(ds.root.resolve())}


def _targets(cfg: DumpConfig) -> dict:
    return dict(targets=cfg.targets, samples=cfg.samples, sample_temperature=cfg.sample_temperature)


def cache_spec(cfg: DumpConfig, ds: PreparedDataset, recipe: ViewRecipe, teacher: dict, unit_size: int) -> CacheSpec:
    # one inner chunk per shard: students read whole slabs (BENCHMARKS.md)
    return CacheSpec(teacher=teacher, dataset=dataset_identity(ds, cfg.split), recipe=recipe.to_dict(),
                     global_seed=cfg.global_seed, topk=cfg.topk, values_dtype=cfg.values_dtype,
                     unit_size=unit_size, chunk_rows=unit_size, **_targets(cfg))


def resolve_target(cfg: DumpConfig, spec: CacheSpec) -> str:
    """The cache to write: --out, or under --cache-root the cache of this identity (kdcache.cache.catalog)."""
    if cfg.cache_root is not None:
        from kdcache.cache.catalog import cache_id
        return str(Location.of(cfg.cache_root).child(cache_id(spec)))
    if cfg.out is None:
        raise KdcacheError("dump-teacher needs --out CACHE or --cache-root ROOT")
    return str(cfg.out)


def existing_unit_size(target: str) -> Optional[int]:
    try:
        return TeacherCache.open(target).spec.unit_size
    except KdcacheError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: OSError, where: str) -> KdcacheError:
    return KdcacheError(f"{where}: no space left on the device ({exc.filename or where}); finished units are kept "
                        "and this run's claims were released: free space and run the same command again")


def _create(ctx, target: str, make: Callable[[], object]) -> None:
    """The coordinator of each launch creates the cache and its arrays (`make`: idempotent, also against
    other launches doing the same); the other ranks wait, then every rank raises the coordinator's error."""
    error = None
    if ctx.is_coordinator:
        try:
            make()
        except KdcacheError as exc:
            error = exc
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            error = disk_full(exc, target)
    ctx.barrier()
    if ctx.all_sum(1.0 if error else 0.0):
        raise error or KdcacheError(f"{target}: the coordinator (rank 0) could not create or open the cache")


def open_target(cfg: DumpConfig, ctx, ds: PreparedDataset, recipe: ViewRecipe, teacher: dict,
                main: Optional[TeacherCache] = None) -> Tuple[TeacherCache, CacheSpec]:
    """The cache this dump writes, created if needed and checked against this run's identity, with the
    run's spec (unit size: --unit-size, else the existing cache's, else DEFAULT_UNIT_SIZE). `main`: the
    cache whose views an added teacher scores (--add-teacher, main_cache)."""
    if main is not None:
        return _open_added(cfg, ctx, main, teacher)
    spec = cache_spec(cfg, ds, recipe, teacher, cfg.unit_size or DEFAULT_UNIT_SIZE)
    target = resolve_target(cfg, spec)
    if cfg.unit_size is None:  # extending a cache: its unit size, whatever today's default
        spec = cache_spec(cfg, ds, recipe, teacher, existing_unit_size(target) or DEFAULT_UNIT_SIZE)
    _create(ctx, target, lambda: TeacherCache.create_or_open(target, spec, cfg.seeds))
    cache = TeacherCache.open(target, mode="r+")
    check_compatible(cache.path, cache.spec, spec)
    cache.ledger.claim_ttl = cfg.claim_ttl
    return cache, spec


# ---- --add-teacher ------------------------------------------------------------------------------------
def main_cache(cfg: DumpConfig, ds: PreparedDataset) -> TeacherCache:
    """--add-teacher: the cache whose views the teacher scores (--out, or the one for --data under
    --cache-root), checked: made for this dataset, sealed, and holding every asked seed complete."""
    if cfg.cache_root is not None:
        from kdcache.cache.catalog import find_cache
        try:
            main = find_cache(cfg.cache_root, ds.split(cfg.split).fingerprint)
        except KdcacheError as exc:
            raise KdcacheError(f"dump-teacher --add-teacher: {exc}\n(give the cache with --out CACHE)") from None
    elif cfg.out is None:
        raise KdcacheError("dump-teacher --add-teacher needs the cache: --out CACHE or --cache-root ROOT")
    else:
        main = TeacherCache.open(cfg.out)
    if main.views_of:
        raise KdcacheError(f"{main.path}: is itself an added teacher; --add-teacher takes the main cache (the "
                           "folder that holds teachers/)")
    if not main.identity_hash:
        raise KdcacheError(f"{main.path}: format {main.version} cache without an identity_sha256; teachers are "
                           "added to sealed caches only (dump one anew)")
    main.check_made_for(ds, cfg.split)
    complete = set(main.complete_seeds(cfg.seeds))
    missing = [s for s in cfg.seeds if s not in complete]
    if missing:
        have = seed_ranges(main.complete_seeds()) or "none"
        raise KdcacheError(f"{main.path}: --add-teacher scores the views of complete seeds only; seeds "
                           f"{seed_ranges(missing)} are not complete in the cache (complete: {have}); finish "
                           "them with the cache's own dump-teacher first")
    return main


def added_spec(cfg: DumpConfig, main: TeacherCache, teacher: dict) -> CacheSpec:
    """The added teacher's identity: the main cache's views (dataset, recipe, global seed, units), this
    run's teacher and targets."""
    m = main.spec
    unit = cfg.unit_size or m.unit_size   # another --unit-size is refused by add_teacher, by name
    return CacheSpec(teacher=teacher, dataset=dict(m.dataset), recipe=dict(m.recipe), global_seed=m.global_seed,
                     topk=cfg.topk, values_dtype=cfg.values_dtype, unit_size=unit,
                     chunk_rows=m.chunk_rows if unit == m.unit_size else unit, **_targets(cfg))


def _open_added(cfg: DumpConfig, ctx, main: TeacherCache, teacher: dict) -> Tuple[TeacherCache, CacheSpec]:
    spec = added_spec(cfg, main, teacher)
    label = cfg.teacher_label or str(teacher.get("name"))
    try:
        where = main.teacher_location(label)
    except KdcacheError as exc:
        raise KdcacheError(f"{exc}; name the added teacher with --teacher-label") from None
    _create(ctx, str(where), lambda: main.add_teacher(label, spec, cfg.seeds))
    cache = TeacherCache.open(where, mode="r+")
    check_compatible(cache.path, cache.spec, spec)
    if cache.views_of != main.identity_hash:   # (add_teacher checked it; a rank may have raced a replacement)
        raise KdcacheError(f"{cache.path}: made over the views of another cache (views_of {str(cache.views_of)[:16]})")
    cache.ledger.claim_ttl = cfg.claim_ttl
    return cache, spec


def stored_params(main: TeacherCache, seed: int, block: int, marker: dict) -> np.ndarray:
    """The view parameters of unit (seed, block) of the main cache: its shard object read once, checked against
    its marker's record (kdcache.cache.integrity) and decoded from those bytes."""
    arr = main.arrays(seed)["params"]
    key = main.chunk_key(seed, arr, "params", block)
    data = main.location.read_many([key])[key]
    why = check_object(data, recorded(marker, "params"))
    if why:
        raise damaged(main, seed, block, "params", why)
    prefix = f"{seed_group_name(seed)}/params/"
    proto = default_buffer_prototype().buffer
    store = {"zarr.json": proto.from_bytes(main.location.read(prefix + "zarr.json")),
             key[len(prefix):]: proto.from_bytes(data)}
    a, b = main.spec.block_bounds(block)
    try:
        return zarr.open_array(MemoryStore(store), mode="r")[a:b]
    except Exception as exc:  # bytes the codecs cannot decode
        raise damaged(main, seed, block, "params", f"its shard cannot be decoded ({type(exc).__name__}: {exc})") from None


class MainViews:
    """--add-teacher: the views a pass rendered must be the ones the main cache holds. A pass's parameters are
    compared with the stored ones, unit by unit, before the teacher scores them: another renderer, recipe
    code or library that drew other parameters would make the added teacher score other images."""

    def __init__(self, main: TeacherCache, seeds: List[int]):
        self.main = main
        self.markers: Dict[int, Dict[int, dict]] = {s: main.markers(s) for s in seeds}   # complete: read once

    def check(self, block: int, seeds: List[int], params: np.ndarray) -> None:
        """params: (samples, seeds, P) rendered for `seeds` of `block`; KdcacheError at the first difference."""
        a, _ = self.main.spec.block_bounds(block)
        for j, s in enumerate(seeds):
            stored = stored_params(self.main, s, block, self.markers[s][block])
            mine = np.asarray(params[:, j], np.float32)
            if stored.shape == mine.shape and np.array_equal(stored, mine):
                continue
            if stored.shape != mine.shape:
                what = f"{mine.shape[1]} parameter columns against the cache's {stored.shape[1]}"
            else:
                r, c = np.argwhere(stored != mine)[0]
                what = f"sample {a + r}, parameter column {c}: {mine[r, c]!r} against the stored {stored[r, c]!r}"
            raise KdcacheError(f"{self.main.path}: seed {s}, unit {block}: this kdcache renders other views than the "
                               f"cache holds ({what}); another renderer, recipe code or library made them, so the "
                               "added teacher would score other images: add it with the kdcache that made the cache")
