"""The cache a dump writes into: its identity (CacheSpec), where it is (--out or under --cache-root), and
its creation by each launch's coordinator, which the other ranks wait for."""

import errno
from typing import List, Optional, Tuple

from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.location import Location
from kdcache.cache.schema import CacheSpec, TeacherCache, check_compatible
from kdcache.data.dataset import PreparedDataset
from kdcache.errors import KdcacheError
from kdcache.teacher.config import DumpConfig

DEFAULT_UNIT_SIZE = 32768


def dataset_identity(ds: PreparedDataset, split_name: str) -> dict:
    split = ds.split(split_name)
    return {"fingerprint": ds.fingerprint, "split": split_name, "split_fingerprint": split.fingerprint,
            "num_samples": split.num_samples, "num_classes": ds.num_classes, "view_size": ds.view_size,
            "path": str(ds.root.resolve())}


def cache_spec(cfg: DumpConfig, ds: PreparedDataset, recipe: ViewRecipe, teacher: dict, unit_size: int) -> CacheSpec:
    # one inner chunk per shard: students read whole slabs (BENCHMARKS.md)
    return CacheSpec(teacher=teacher, dataset=dataset_identity(ds, cfg.split), recipe=recipe.to_dict(),
                     global_seed=cfg.global_seed, topk=cfg.topk, values_dtype=cfg.values_dtype,
                     unit_size=unit_size, chunk_rows=unit_size)


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


def _create(ctx, target: str, spec: CacheSpec, seeds: List[int]) -> None:
    """The coordinator of each launch creates the cache and its arrays (idempotent, also against other
    launches doing the same); the other ranks wait, then every rank raises the coordinator's error."""
    error = None
    if ctx.is_coordinator:
        try:
            TeacherCache.create_or_open(target, spec, seeds)
        except KdcacheError as exc:
            error = exc
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            error = disk_full(exc, target)
    ctx.barrier()
    if ctx.all_sum(1.0 if error else 0.0):
        raise error or KdcacheError(f"{target}: the coordinator (rank 0) could not create or open the cache")


def open_target(cfg: DumpConfig, ctx, ds: PreparedDataset, recipe: ViewRecipe,
                teacher: dict) -> Tuple[TeacherCache, CacheSpec]:
    """The cache this dump writes, created if needed and checked against this run's identity, with the
    run's spec (unit size: --unit-size, else the existing cache's, else DEFAULT_UNIT_SIZE)."""
    spec = cache_spec(cfg, ds, recipe, teacher, cfg.unit_size or DEFAULT_UNIT_SIZE)
    target = resolve_target(cfg, spec)
    if cfg.unit_size is None:  # extending a cache: its unit size, whatever today's default
        spec = cache_spec(cfg, ds, recipe, teacher, existing_unit_size(target) or DEFAULT_UNIT_SIZE)
    _create(ctx, target, spec, cfg.seeds)
    cache = TeacherCache.open(target, mode="r+")
    check_compatible(cache.path, cache.spec, spec)
    cache.ledger.claim_ttl = cfg.claim_ttl
    return cache, spec
