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


def parse_labels(text: str) -> List[str]:
    """'resnet18,vit_tiny' -> ['resnet18', 'vit_tiny'] (teacher labels: no empty or repeated name)."""
    labels = [t.strip() for t in str(text).split(",")]
    if not all(labels) or len(set(labels)) != len(labels):
        raise KdcacheError(f"teacher list {text!r}: expected NAME,NAME with distinct non-empty names")
    return labels


def parse_weights(text: str) -> List[float]:
    """'0.7,0.3' -> [0.7, 0.3]: non-negative, not all zero."""
    try:
        weights = [float(t) for t in str(text).split(",")]
    except ValueError:
        weights = []
    if not weights or any(not 0 <= w < float("inf") for w in weights) or not sum(weights) > 0:
        raise KdcacheError(f"teacher weights {text!r}: expected non-negative numbers W,W, not all 0")
    return weights
