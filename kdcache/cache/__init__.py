"""The teacher cache: a Zarr v3 group of per-seed arrays, a ledger of finished units, slab readers.
The format is specified in docs/cache-format.md."""

from kdcache.cache.schema import CacheSpec, TeacherCache

__all__ = ["CacheSpec", "TeacherCache"]
