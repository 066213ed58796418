"""The one view renderer: decode the canonical JPEG, crop by the view's parameters, resize, flip.

Both stages run this code: the teacher side directly (decode_jpeg, render_views), the student side
inside kdcache's FFCV decoder. Decode is FFCV's libffcv imdecode (turbojpeg with TJFLAG_FASTDCT, so
not PIL's pixels) and resize is FFCV's resize_crop (cv::resize INTER_AREA), so the student's replayed
view of (i, s) is the image the teacher scored, bit for bit (tests/test_views.py checks it).

Every FFCV pipeline gets its own compiled copies (make_renderer), as FFCV's own decoders do: with
numba 0.68, a dispatcher that a second FFCV pipeline compiles against again raises KeyError from its
overload table inside the loader thread, and the Loader then hangs (reproduced with two loaders in
one process). Same source, same flags (fastmath off): the same machine code in both stages.
"""

from typing import NamedTuple

import numba
import numpy as np
from ffcv.libffcv import imdecode, resize_crop


def crop_box(height, width, params):
    """Integer (top, left, h, w) of the crop in an image of height x width; params are fractions.
    Rounded in float64 without fastmath: both stages must get the same integers from the same row."""
    h = int(np.floor(np.float64(params[2]) * height + 0.5))
    w = int(np.floor(np.float64(params[3]) * width + 0.5))
    h = min(max(h, 1), height)
    w = min(max(w, 1), width)
    top = int(np.floor(np.float64(params[0]) * height + 0.5))
    left = int(np.floor(np.float64(params[1]) * width + 0.5))
    top = min(max(top, 0), height - h)
    left = min(max(left, 0), width - w)
    return top, left, h, w


def flip_horizontal(image):
    width = image.shape[1]
    for r in range(image.shape[0]):
        for c in range(width // 2):
            for ch in range(image.shape[2]):
                tmp = image[r, c, ch]
                image[r, c, ch] = image[r, width - 1 - c, ch]
                image[r, width - 1 - c, ch] = tmp


class Renderer(NamedTuple):
    decode_into: object   # (jpeg u8[:], height, width, out u8[h, w, 3]) -> turbojpeg status (0 = ok)
    render_into: object   # (image u8[h, w, 3], params f32[5], out u8[S, S, 3]) -> None
    render_many: object   # (image, params f32[V, 5], out u8[V, S, S, 3]) -> None
    render_samples: object  # parallel over samples: decode each once, render all its views (teacher side)


def make_renderer() -> Renderer:
    imdecode_c = numba.njit(imdecode)
    resize_crop_c = numba.njit(resize_crop)
    crop_box_c = numba.njit(fastmath=False)(crop_box)
    flip_c = numba.njit(flip_horizontal)

    @numba.njit
    def decode_into(jpeg, height, width, out):
        return imdecode_c(jpeg, out, height, width, height, width, 0, 0, 1, 1, False, False)

    @numba.njit
    def render_into(image, params, out):
        top, left, h, w = crop_box_c(image.shape[0], image.shape[1], params)
        resize_crop_c(image, top, top + h, left, left + w, out)
        if params[4] > 0.5:
            flip_c(out)

    @numba.njit
    def render_many(image, params, out):
        for v in range(params.shape[0]):
            render_into(image, params[v], out[v])

    @numba.njit(parallel=True)
    def render_samples(data, offsets, lengths, heights, widths, params, temp, out, status):
        """data: concatenated JPEGs; params (n, V, 5); temp (n, >= max h*w*3); out (n, V, S, S, 3)."""
        for j in numba.prange(offsets.shape[0]):
            h, w = heights[j], widths[j]
            image = temp[j, :h * w * 3].reshape((h, w, 3))
            status[j] = decode_into(data[offsets[j]:offsets[j] + lengths[j]], np.uint32(h), np.uint32(w), image)
            for v in range(params.shape[1]):
                render_into(image, params[j, v], out[j, v])

    return Renderer(decode_into, render_into, render_many, render_samples)


_teacher_side = None


def _renderer() -> Renderer:
    global _teacher_side
    if _teacher_side is None:
        _teacher_side = make_renderer()
    return _teacher_side


def decode_jpeg(jpeg: bytes, height: int, width: int, what: str = "image") -> np.ndarray:
    """Canonical JPEG bytes -> HxWx3 uint8, with FFCV's decoder."""
    out = np.empty((height, width, 3), np.uint8)
    status = _renderer().decode_into(np.frombuffer(jpeg, np.uint8), np.uint32(height), np.uint32(width), out)
    if status != 0:
        raise ValueError(f"{what}: JPEG decode failed (turbojpeg status {status})")
    return out


class SampleBuffers:
    """Reusable decode scratch for render_samples. Fresh multi-megabyte arrays per call cost more than the
    decoding itself (first-touch page faults, contended across threads: 2.5x slower per view measured on
    2 cores at 224 px), so callers that render chunk after chunk keep one of these."""

    def __init__(self):
        self.temp = np.empty((0, 0), np.uint8)

    def scratch(self, n: int, pixels: int) -> np.ndarray:
        if self.temp.shape[0] < n or self.temp.shape[1] < pixels * 3:
            self.temp = np.empty((max(n, self.temp.shape[0]), max(pixels * 3, self.temp.shape[1])), np.uint8)
        return self.temp


def render_samples(jpegs, heights, widths, params: np.ndarray, size: int, what: str = "sample",
                   out: np.ndarray = None, buffers: SampleBuffers = None) -> np.ndarray:
    """Views of several samples, decoding each once: params (n, V, 5) -> (n, V, size, size, 3) uint8.
    Parallel over samples (numba threads); the pixels equal render_views on each decoded image.
    `out` (that shape) and `buffers` let a caller reuse memory across calls."""
    n = len(jpegs)
    lengths = np.array([len(b) for b in jpegs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    data = np.frombuffer(b"".join(jpegs), np.uint8)
    heights = np.asarray(heights, np.int64)
    widths = np.asarray(widths, np.int64)
    pixels = int((heights * widths).max(initial=1))
    temp = (buffers or SampleBuffers()).scratch(n, pixels)
    params = np.ascontiguousarray(params, dtype=np.float32)
    if out is None:
        out = np.empty((n, params.shape[1], size, size, 3), np.uint8)
    status = np.zeros(n, np.int64)
    _renderer().render_samples(data, offsets, lengths, heights, widths, params, temp, out, status)
    if status.any():
        raise ValueError(f"{what} {int(np.flatnonzero(status)[0])} of this batch: JPEG decode failed")
    return out


def render_views(image: np.ndarray, params: np.ndarray, size: int) -> np.ndarray:
    """All views (rows of params) of one decoded image: (V, size, size, 3) uint8."""
    params = np.ascontiguousarray(params, dtype=np.float32).reshape(-1, 5)
    out = np.empty((len(params), size, size, 3), np.uint8)
    _renderer().render_many(np.ascontiguousarray(image), params, out)
    return out
