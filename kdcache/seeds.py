"""Seed ranges as the commands write them: 'A:B' (the seeds A to B - 1) read, and lists shown back.

A module of its own so that the option declarations (kdcache.options) and the cache listings
(kdcache.cache.catalog) both use it without importing each other.
"""

from typing import Iterable, List

from kdcache.errors import KdcacheError


def parse_seeds(text: str) -> List[int]:
    """'A:B' -> [A, B) ; 'A' -> [A]. Checked here, while parsing, so that a bad range creates nothing; a
    KdcacheError (one line) rather than argparse's usage text, also for a seed range from a TOML recipe."""
    try:
        a, b = (int(x) for x in text.split(":")) if ":" in text else (int(text), int(text) + 1)
    except ValueError:
        raise KdcacheError(f"seed range {text!r}: expected A:B (the seeds A to B - 1) or one seed A") from None
    if b <= a:
        raise KdcacheError(f"seed range {text!r} is empty: A:B is the seeds A to B - 1, so B must be greater than A")
    from kdcache.cache.schema import MAX_SEED   # (zarr: imported only when a range is read)
    if a < 0 or b - 1 > MAX_SEED:
        raise KdcacheError(f"seed range {text!r}: seeds are integers from 0 to {MAX_SEED} "
                           "(the cache names each with 6 digits)")
    return list(range(a, b))


def seed_ranges(seeds: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0:3,5'."""
    seeds = sorted(seeds)
    if not seeds:
        return "none"
    out, start, prev = [], seeds[0], seeds[0]
    for s in seeds[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}" if start == prev else f"{start}:{prev + 1}")
        if s is not None:
            start = prev = s
    return ",".join(out)
