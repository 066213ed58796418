"""The one view renderer: decode the canonical JPEG, crop by the view's parameters, resize, flip.

Both stages call these compiled functions: the teacher side directly (render_views), the student side
from inside kdcache's FFCV decoder (render_into). Decode is FFCV's libffcv imdecode (turbojpeg with
TJFLAG_FASTDCT, so not PIL's pixels) and resize is FFCV's resize_crop (cv::resize INTER_AREA), so the
student's replayed view of (i, s) is the image the teacher scored, bit for bit.
"""

import numba
import numpy as np
from ffcv.libffcv import imdecode, resize_crop

_imdecode = numba.njit(imdecode)
_resize_crop = numba.njit(resize_crop)


@numba.njit(fastmath=False, cache=True)
def crop_box(height, width, params):
    """Integer (top, left, h, w) of the crop in an image of height x width; params are fractions.

    Rounding, not fastmath: both stages must get the same integers from the same float32 row."""
    h = int(np.floor(np.float64(params[2]) * height + 0.5))
    w = int(np.floor(np.float64(params[3]) * width + 0.5))
    h = min(max(h, 1), height)
    w = min(max(w, 1), width)
    top = int(np.floor(np.float64(params[0]) * height + 0.5))
    left = int(np.floor(np.float64(params[1]) * width + 0.5))
    top = min(max(top, 0), height - h)
    left = min(max(left, 0), width - w)
    return top, left, h, w


@numba.njit(cache=True)
def flip_horizontal(image):
    width = image.shape[1]
    for r in range(image.shape[0]):
        for c in range(width // 2):
            for ch in range(image.shape[2]):
                tmp = image[r, c, ch]
                image[r, c, ch] = image[r, width - 1 - c, ch]
                image[r, width - 1 - c, ch] = tmp


@numba.njit
def render_into(image, params, out):
    """Render view `params` of the decoded HxWx3 `image` into `out` (SxSx3 uint8)."""
    top, left, h, w = crop_box(image.shape[0], image.shape[1], params)
    _resize_crop(image, top, top + h, left, left + w, out)
    if params[4] > 0.5:
        flip_horizontal(out)


@numba.njit
def decode_into(jpeg, height, width, out):
    """Decode canonical JPEG bytes into out (height x width x 3); returns turbojpeg's status (0 = ok)."""
    return _imdecode(jpeg, out, height, width, height, width, 0, 0, 1, 1, False, False)


def decode_jpeg(jpeg: bytes, height: int, width: int, what: str = "image") -> np.ndarray:
    out = np.empty((height, width, 3), np.uint8)
    status = decode_into(np.frombuffer(jpeg, np.uint8), height, width, out)
    if status != 0:
        raise ValueError(f"{what}: JPEG decode failed (turbojpeg status {status})")
    return out


@numba.njit
def _render_many(image, params, out):
    for v in range(params.shape[0]):
        render_into(image, params[v], out[v])


def render_views(image: np.ndarray, params: np.ndarray, size: int) -> np.ndarray:
    """All views (rows of params) of one decoded image: (V, size, size, 3) uint8."""
    params = np.ascontiguousarray(params, dtype=np.float32).reshape(-1, 5)
    out = np.empty((len(params), size, size, 3), np.uint8)
    _render_many(np.ascontiguousarray(image), params, out)
    return out
