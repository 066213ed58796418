"""Counter-based random numbers: uniform draws addressed by (global seed, augmentation seed, sample, stream).

There is no generator state, so a view's draws never depend on batch size, worker count, rank,
shard split or processing order. The hash is splitmix64 (Steele et al. 2014), vectorised over uint64
arrays; numpy wraps uint64 arithmetic modulo 2**64, which is exactly what the hash needs.

Streams in use: the table in docs/views.md ("Random numbers") lists every one with its role (crop 0..39,
flip 64, RandAugment 128..191, mixing 200..205, erasing 300..302 and 320..639, the dump's draws from the teacher's
tail 700); new augmentations take new streams, so adding one never changes the draws of another.
"""

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 2.0 ** -53

STREAM_RRC = 0
STREAM_FLIP = 64
STREAM_TAIL_DRAWS = 700   # dump-teacher --targets sampled: the systematic draws' offset u (kdcache.teacher.runner)


def splitmix64(x) -> np.ndarray:
    """The splitmix64 finaliser of x + golden gamma, elementwise on uint64."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
        return z ^ (z >> np.uint64(31))


def view_keys(global_seed: int, aug_seed: int, indices) -> np.ndarray:
    """One 64-bit key per view (i, s): a hash chain over (global seed, s, i)."""
    base = splitmix64(splitmix64(np.uint64(global_seed)) ^ np.uint64(aug_seed))
    return splitmix64(base ^ np.asarray(indices, dtype=np.uint64))


def uniform(keys: np.ndarray, stream: int) -> np.ndarray:
    """Uniform float64 in [0, 1) for each key on one stream; 53 random bits each."""
    bits = splitmix64(keys ^ splitmix64(np.uint64(stream)))
    return (bits >> np.uint64(11)).astype(np.float64) * _TO_UNIT
