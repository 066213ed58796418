"""Random erasing as timm's RandomErasing (--reprob, --remode, --recount), drawn per view and applied in uint8.

Draws follow timm's `_erase`: with probability reprob, count = randint(1, recount) boxes; each box tries
10 times: area uniform in [0.02, 1/3] of the view divided by count, log-aspect uniform in
log([0.3, 1/0.3]), h = round(sqrt(area·aspect)), w = round(sqrt(area/aspect)), accepted if w < W and
h < H, then top = randint(0, H-h), left = randint(0, W-w). Boxes are stored in pixels of the view
(small integers in float32 compress to about a byte on disk; fractions j/size cost four).

timm erases the normalised tensor with N(0, 1) values ("pixel": per pixel, "rand": per box and channel,
"const": 0). kdcache's views are uint8 (the teacher scores the stored uint8 view, the student replays
it), so the fill is that value mapped back to pixels with timm's ImageNet mean and std:
round(255·(mean_c + std_c·z)) clipped to [0, 255] ("const" is the mean colour). The noise comes from
the counter-based RNG keyed by the view's 24-bit noise seed, the box, the pixel and the channel, so it
is never stored pixel by pixel.
"""

import math

import numpy as np

from kdcache.augment.rng import splitmix64, uniform

STREAM_ERASE_APPLY = 300
STREAM_ERASE_COUNT = 301
STREAM_ERASE_NOISE = 302
STREAM_ERASE_BOX = 320        # box b, attempt t: 320 + 40 b + 4 t + (0 area, 1 aspect, 2 top, 3 left)
ATTEMPTS = 10
MIN_AREA, MAX_AREA = 0.02, 1.0 / 3.0
MIN_ASPECT, MAX_ASPECT = 0.3, 1.0 / 0.3
MODE_IDS = {"const": 0, "rand": 1, "pixel": 2}
# timm's IMAGENET_DEFAULT_MEAN / STD: the normalisation the N(0, 1) fill is defined in
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def erase_columns(recount: int) -> int:
    """[count, noise seed, then (top, left, h, w) per box]"""
    return 2 + 4 * recount


def draw_erasing(keys: np.ndarray, reprob: float, recount: int, size: int) -> np.ndarray:
    """float32 (n, erase_columns(recount)) for views of `size` x `size` pixels."""
    n = len(keys)
    out = np.zeros((n, erase_columns(recount)), np.float32)
    applied = uniform(keys, STREAM_ERASE_APPLY) < reprob
    count = np.where(applied, 1 + np.floor(uniform(keys, STREAM_ERASE_COUNT) * recount).astype(np.int64), 0)
    out[:, 0] = count
    # 24 bits: exact in float32
    out[:, 1] = (splitmix64(keys ^ splitmix64(np.uint64(STREAM_ERASE_NOISE))) >> np.uint64(40)).astype(np.float32)
    area = float(size * size)
    log_lo, log_hi = math.log(MIN_ASPECT), math.log(MAX_ASPECT)
    for b in range(recount):
        pending = np.flatnonzero(count > b)
        col = 2 + 4 * b
        for t in range(ATTEMPTS):
            if pending.size == 0:
                break
            k, stream = keys[pending], STREAM_ERASE_BOX + 40 * b + 4 * t
            target = (MIN_AREA + uniform(k, stream) * (MAX_AREA - MIN_AREA)) * area / count[pending]
            aspect = np.exp(log_lo + uniform(k, stream + 1) * (log_hi - log_lo))
            h = np.round(np.sqrt(target * aspect))      # Python's round(): half to even
            w = np.round(np.sqrt(target / aspect))
            ok = (w < size) & (h < size)
            done = pending[ok]
            top = np.floor(uniform(k[ok], stream + 2) * (size - h[ok] + 1))
            left = np.floor(uniform(k[ok], stream + 3) * (size - w[ok] + 1))
            out[done, col:col + 4] = np.stack([top, left, h[ok], w[ok]], 1)
            pending = pending[~ok]
        # a box whose 10 attempts all failed stays empty (h = w = 0), as timm erases nothing then
    return out


# ---- rendering (numba-compatible plain functions; the renderer compiles them) -------------------------

def _splitmix(x):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def noise_normal(seed, box, position, channel):
    """N(0, 1) by Box-Muller from two counter-based uniforms of (seed, box, position, channel)."""
    base = _splitmix(np.uint64(seed) ^ (np.uint64(box) << np.uint64(32)))
    k = _splitmix(base ^ (np.uint64(position) * np.uint64(4) + np.uint64(channel)))
    u1 = (np.float64(k >> np.uint64(11)) + 1.0) * 2.0 ** -53       # (0, 1]: log is finite
    u2 = np.float64(_splitmix(k) >> np.uint64(11)) * 2.0 ** -53
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def fill_value(z, channel):
    v = 255.0 * (MEAN[channel] + STD[channel] * z)
    v = math.floor(v + 0.5)
    return np.uint8(min(max(v, 0.0), 255.0))


def apply_erasing(image, row, mode):
    """Erase the boxes of one view in place; row = [count, noise seed, (top, left, h, w) * boxes]."""
    size_h, size_w = image.shape[0], image.shape[1]
    count = int(row[0])
    seed = np.uint64(int(row[1]))
    for b in range(count):
        h = min(int(row[4 + 4 * b]), size_h)
        w = min(int(row[5 + 4 * b]), size_w)
        if h <= 0 or w <= 0:
            continue
        top = int(row[2 + 4 * b])
        left = int(row[3 + 4 * b])
        top = min(max(top, 0), size_h - h)
        left = min(max(left, 0), size_w - w)
        c0 = fill_value(noise_normal(seed, b, 0, 0) if mode == 1 else 0.0, 0)
        c1 = fill_value(noise_normal(seed, b, 0, 1) if mode == 1 else 0.0, 1)
        c2 = fill_value(noise_normal(seed, b, 0, 2) if mode == 1 else 0.0, 2)
        for y in range(top, top + h):
            for x in range(left, left + w):
                if mode == 2:
                    p = (y - top) * w + (x - left)
                    image[y, x, 0] = fill_value(noise_normal(seed, b, p, 0), 0)
                    image[y, x, 1] = fill_value(noise_normal(seed, b, p, 1), 1)
                    image[y, x, 2] = fill_value(noise_normal(seed, b, p, 2), 2)
                else:
                    image[y, x, 0] = c0
                    image[y, x, 1] = c1
                    image[y, x, 2] = c2
