"""View parameters: RandomResizedCrop box and flip of view (i, s), vectorised over index ranges.

Parameters are a float32 row per view, as fractions of the source image so they hold at any stored
resolution:

    [top, left, height, width, flip]     top/height in units of the image height, left/width of its width;
                                         flip is 0.0 or 1.0

The crop follows torchvision's RandomResizedCrop.get_params exactly, in pixels of the canonical
image (area and log-aspect drawn uniformly, integer rounding, 10 attempts, centre-crop fallback);
only the random source differs (counter-based instead of torch's global generator).
"""

import numpy as np

from kdcache.augment.recipe import ViewRecipe
from kdcache.augment.rng import STREAM_FLIP, STREAM_RRC, uniform, view_keys

NUM_PARAMS = 5
RRC_ATTEMPTS = 10


def rrc_boxes(keys: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale, ratio):
    """Integer crop boxes (top, left, h, w) with torchvision's semantics, one per key."""
    H = np.asarray(heights, dtype=np.float64)
    W = np.asarray(widths, dtype=np.float64)
    n = len(keys)
    top = np.zeros(n, np.int64)
    left = np.zeros(n, np.int64)
    h = np.zeros(n, np.int64)
    w = np.zeros(n, np.int64)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    pending = np.arange(n)
    for attempt in range(RRC_ATTEMPTS):
        if pending.size == 0:
            break
        k, Hp, Wp = keys[pending], H[pending], W[pending]
        stream = STREAM_RRC + 4 * attempt
        target_area = Hp * Wp * (scale[0] + uniform(k, stream) * (scale[1] - scale[0]))
        aspect = np.exp(log_lo + uniform(k, stream + 1) * (log_hi - log_lo))
        cw = np.round(np.sqrt(target_area * aspect))   # round half to even, like Python's round()
        ch = np.round(np.sqrt(target_area / aspect))
        ok = (cw > 0) & (cw <= Wp) & (ch > 0) & (ch <= Hp)
        done = pending[ok]
        h[done], w[done] = ch[ok], cw[ok]
        # torch.randint(0, H - h + 1): floor of a uniform over H - h + 1 integers
        top[done] = np.floor(uniform(k[ok], stream + 2) * (Hp[ok] - ch[ok] + 1))
        left[done] = np.floor(uniform(k[ok], stream + 3) * (Wp[ok] - cw[ok] + 1))
        pending = pending[~ok]
    if pending.size:  # torchvision's fallback: the central crop at the nearest allowed aspect ratio
        Hp, Wp = H[pending], W[pending]
        in_ratio = Wp / Hp
        cw, ch = Wp.copy(), Hp.copy()
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        ch[narrow] = np.round(cw[narrow] / min(ratio))
        cw[wide] = np.round(ch[wide] * max(ratio))
        h[pending], w[pending] = ch, cw
        top[pending] = (Hp - ch) // 2
        left[pending] = (Wp - cw) // 2
    return top, left, h, w


def view_params(recipe: ViewRecipe, global_seed: int, aug_seed: int, indices, heights, widths) -> np.ndarray:
    """float32 (n, 5) parameters of views (indices[j], aug_seed) for images of the given sizes.

    heights/widths are the canonical image sizes of those samples (same length as indices). The result
    for one sample never depends on which other samples are in the call.
    """
    indices = np.asarray(indices, dtype=np.int64)
    heights = np.asarray(heights)
    widths = np.asarray(widths)
    if not (len(indices) == len(heights) == len(widths)):
        raise ValueError("indices, heights and widths must have the same length")
    keys = view_keys(global_seed, aug_seed, indices)
    top, left, h, w = rrc_boxes(keys, heights, widths, recipe.scale, recipe.ratio)
    out = np.empty((len(indices), NUM_PARAMS), np.float32)
    H = heights.astype(np.float64)
    W = widths.astype(np.float64)
    out[:, 0] = top / H
    out[:, 1] = left / W
    out[:, 2] = h / H
    out[:, 3] = w / W
    out[:, 4] = uniform(keys, STREAM_FLIP) < recipe.hflip
    return out
