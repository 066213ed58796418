"""Slab reads: one seed's rows for all samples, read whole into memory (never per-sample Zarr reads in a
hot loop: zarr-python spends ~1 ms per call; a contiguous shard-aligned read costs ~0.3 us per row)."""

import threading
from concurrent.futures import Future
from typing import Dict, NamedTuple, Optional

import numpy as np

from kdcache.cache.integrity import read_units
from kdcache.cache.schema import TeacherCache, decode_logp
from kdcache.errors import KdcacheError


class Slab(NamedTuple):
    """One seed's rows in memory, the same for every format version (docs/cache-format.md)."""
    seed: int
    logp: np.ndarray      # (N, k) float32 top-k log-probabilities, descending
    indices: np.ndarray   # (N, k) int16/int32 their classes
    log_tail: np.ndarray  # (N,) float32 log of the mass of the other C - k classes (-inf when k = C)
    params: Optional[np.ndarray]   # (N, P) float32 view parameters; None for an added teacher (the main cache's)


def v1_to_logp(values: np.ndarray, lse: np.ndarray, num_classes: int):
    """Format 1 rows (top-k logits, log-sum-exp) -> (logp, log_tail) whose v2 rebuild equals the v1 rule
    ("uniform-logit-tail-v1": tail mass max(1 - sum p, 1e-12)). NaN rows stay NaN."""
    logp = values.astype(np.float64) - lse.astype(np.float64)[:, None]
    if values.shape[1] == num_classes:
        log_tail = np.full(len(lse), -np.inf)
        log_tail[np.isnan(lse)] = np.nan
    else:
        log_tail = np.log(np.maximum(1.0 - np.exp(logp).sum(1), 1e-12))
    return logp.astype(np.float32), log_tail.astype(np.float32)


def read_slab(cache: TeacherCache, seed: int, require_complete: bool = True, exclude=()) -> Slab:
    """One seed's rows. Only finished units are read, each checked against its marker (a damaged one is
    refused by name, kdcache.cache.integrity); rows of unfinished (or excluded) units hold fill values."""
    markers = cache.markers(seed, exclude)
    if require_complete:
        missing = cache.missing_blocks(seed, done=markers)
        if missing:
            raise KdcacheError(f"{cache.path}: seed {seed} is not complete ({len(missing)} of "
                               f"{cache.spec.num_blocks} units missing, e.g. block {missing[0]}); "
                               "finish it with dump-teacher first")
    arrays = read_units(cache, seed, markers)
    indices, params = arrays["indices"], arrays.get("params")
    if cache.version == 1:
        logp, log_tail = v1_to_logp(arrays["values"], arrays["lse"], cache.spec.num_classes)
    else:
        logp, log_tail = decode_logp(arrays["logp"], cache.attrs["logp_encoding"]), arrays["log_tail"]
    return Slab(seed, logp, indices, log_tail, params)


class SlabPrefetcher:
    """Reads the next seed's slab in a background thread while the current epoch trains."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache
        self._pending: Dict[int, Future] = {}

    def prefetch(self, seed: int) -> None:
        if seed in self._pending:
            return
        fut: Future = Future()

        def work():
            try:
                fut.set_result(read_slab(self.cache, seed))
            except BaseException as exc:
                fut.set_exception(exc)
        threading.Thread(target=work, daemon=True, name=f"kdcache-slab-{seed}").start()
        self._pending[seed] = fut

    def get(self, seed: int, next_seed: Optional[int] = None) -> Slab:
        self.prefetch(seed)
        slab = self._pending.pop(seed).result()
        if next_seed is not None:
            self.prefetch(next_seed)
        return slab
