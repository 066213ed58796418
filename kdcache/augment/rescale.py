"""A view at another size: the same stored row, with its pixel boxes scaled to the size rendered.

Everything in a view's row but two kinds of columns is size-free: the crop box is a fraction of the image, the
flip a bit, RandAugment's arguments are degrees, shears, fractions of the side (translate), thresholds and
factors, mixup's lambda a weight. The boxes of random erasing and cutmix are stored in pixels of the view
(recipe.size; small integers compress to about a byte). To render the view at `size`, each box's edges are
mapped to the new grid, round(edge · size / view_size) (half up), so the box covers the same fraction of the
view up to one pixel's rounding. lambda stays as stored: it is the weight of the teacher's target and of the
hard-label term (the box's true area at the new size differs from it by that rounding).

scale_view_row is a plain function that numba compiles into the FFCV decoder (kdcache.augment.ffcv_ops) and
that also runs as Python (rescale_params, for the teacher side and tests).
"""

import math

import numpy as np

from kdcache.augment.mixing import MODE_CUTMIX


def scale_view_row(row, layout, view_size, size):
    """In place: the erasing and cutmix boxes of one row (float32 [P]) from view_size to size pixels.
    layout is ParamLayout.as_array(): [ra offset, ra layers, erase offset, erase mode, mix offset, renderer]."""
    if size == view_size:
        return
    f = np.float64(size) / np.float64(view_size)
    erase, mix = layout[2], layout[4]
    count = int(row[erase]) if erase >= 0 else 0
    cut = 1 if mix >= 0 and int(row[mix]) == MODE_CUTMIX else 0
    for b in range(count + cut):
        at = erase + 2 + 4 * b if b < count else mix + 3       # [top, left, h, w]
        top, left = np.float64(row[at]), np.float64(row[at + 1])
        y0, x0 = math.floor(top * f + 0.5), math.floor(left * f + 0.5)
        y1 = math.floor((top + np.float64(row[at + 2])) * f + 0.5)
        x1 = math.floor((left + np.float64(row[at + 3])) * f + 0.5)
        row[at], row[at + 1], row[at + 2], row[at + 3] = y0, x0, y1 - y0, x1 - x0


def rescale_params(params: np.ndarray, layout, view_size: int, size: int) -> np.ndarray:
    """A copy of (N, P) rows with their boxes scaled to `size` (what the FFCV decoder does per row)."""
    from kdcache.augment.params import ParamLayout
    arr = layout.as_array() if isinstance(layout, ParamLayout) else np.asarray(layout, np.int64)
    out = np.array(params, dtype=np.float32, copy=True)
    if size != view_size and (arr[2] >= 0 or arr[4] >= 0):
        for row in out.reshape(-1, out.shape[-1]):
            scale_view_row(row, arr, view_size, size)
    return out
