"""The one view renderer: decode the canonical JPEG, crop by the view's parameters, resize, flip, then
RandAugment and random erasing (when the recipe has them); mixing of a pair's two views comes last.

Both stages run this code: the teacher side directly (decode_jpeg, render_views), the student side
inside kdcache's FFCV decoder. Decode is FFCV's libffcv imdecode (turbojpeg with TJFLAG_FASTDCT, so
not PIL's pixels); the resize is renderer 2's separable area resample (kdcache.augment.area_resize), or
for caches made by renderer 1, FFCV's resize_crop (cv::resize INTER_AREA). The version travels in the
layout array (ParamLayout.renderer), so the student's replayed view of (i, s) is the image the teacher
scored, bit for bit, whichever version made the cache (tests/test_views.py, tests/test_golden_views.py).

One compiled renderer per process (per set of steps) serves every FFCV pipeline and the teacher side.
FFCV's decoders reach it through a C function pointer (render_view, a numba cfunc) rather than by calling
its dispatcher: a numba function links the code of every dispatcher it calls into its own module and
optimizes it again, so each FFCV loader would otherwise recompile the whole renderer (2.6 s per loader
with the crop alone, 8.6 s with RandAugment, on the 2-core machine). Sharing needs kdcache.ffcv_fixes:
FFCV 1.0.2 mutates one of numba's shared types when it builds a Loader, which broke every dispatcher
shared between pipelines (KeyError in the loader thread, then a hang). Same source, same flags (fastmath
off) in both stages: the student's view is the teacher's, bit for bit (tests/test_views.py).
"""

import functools
from typing import NamedTuple

import numba
import numpy as np
import kdcache.ffcv_fixes  # noqa: F401 (first: corrects FFCV as it is imported)
from ffcv.libffcv import imdecode, resize_crop

from kdcache.augment import area_resize, erasing, mixing
from kdcache.augment.randaugment import compile_rand_augment

from kdcache.augment.recipe import RENDERER_VERSION, RENDERER_VERSIONS  # noqa: F401 (what callers import from here)


def library_versions() -> dict:
    """The libraries whose code makes a view's pixels, recorded in every cache."""
    import importlib.metadata as md
    import cv2
    out = {name: md.version(name) for name in ("ffcv", "numba", "numpy")}
    out["opencv"] = cv2.__version__
    return out


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
    render_into: object   # (image u8[h, w, 3], params f32[P], layout i64[6], out u8[S, S, 3], scratch like out) -> None
    render_many: object   # (image, params f32[V, P], layout, out u8[V, S, S, 3]) -> None
    render_samples: object  # parallel over samples: decode each once, render all its views (teacher side)
    mix_pair: object      # (view a, view b, params of a (f32[P]), layout) -> None: a pair's mixing, in place
    mix_chunk: object     # (views u8[n, V, S, S, 3], params f32[n, V, P], layout) -> None: every pair of a chunk
    render_view: object   # render_into as a C function (RENDER_VIEW_SIGNATURE), for compiled callers: .ctypes


# Every kernel sets its floating-point flags explicitly: numba (>= 0.54) lets a callee inherit flags it does
# not set from its caller, and FFCV compiles its decoders with fastmath=True and error_model="numpy". Measured:
# with inherited fastmath, AutoContrast of a full-range image turned 132 into 131 (255 / 255 computed as a
# reciprocal) in the student's views only.
STRICT = dict(fastmath=False, error_model="python")

# render_view(image, height, width, params, n_params, layout, out, size, scratch): C-contiguous buffers by
# address (uint8 image h x w x 3, float32 params, int64 layout[6], uint8 out and scratch size x size x 3)
RENDER_VIEW_SIGNATURE = numba.types.void(numba.types.voidptr, numba.types.int64, numba.types.int64,
                                         numba.types.voidptr, numba.types.int64, numba.types.voidptr,
                                         numba.types.voidptr, numba.types.int64, numba.types.voidptr)


def _no_rand_augment(image, ops, scratch):
    return None


def _no_erasing(image, row, mode):
    return None


@functools.lru_cache(maxsize=None)
def make_renderer(rand_augment: bool = True, erasing_boxes: bool = True) -> Renderer:
    """This process's compiled renderer for these steps (compiled on first use, then shared: see the module
    docstring). Without rand_augment / erasing_boxes those steps are no-ops that compile in no time.

    The kernels in pure numba go through numba's on-disk cache (`cached`): a later process loads the
    machine code an earlier one compiled for this CPU instead of compiling it again (RandAugment's
    kernels: 5-8 s per process). What calls FFCV's ctypes functions (decode, resize_crop) and the closures
    below cannot be cached by numba; they compile in a few seconds, once per process."""
    strict = numba.njit(**STRICT)
    cached = numba.njit(cache=True, **STRICT)
    imdecode_c = strict(imdecode)
    resize_crop_c = strict(resize_crop)
    area_taps_c = cached(area_resize.area_taps)
    lines_c = cached(area_resize.weighted_lines)
    resize_area_c = cached(_with_globals(area_resize.resize_area, area_taps=area_taps_c,
                                         weighted_lines=lines_c))
    crop_box_c = cached(crop_box)
    flip_c = cached(flip_horizontal)
    rand_augment_c = compile_rand_augment(with_scratch=True) if rand_augment else strict(_no_rand_augment)
    if erasing_boxes:
        splitmix_c = cached(erasing._splitmix)
        noise_c = cached(_with_globals(erasing.noise_normal, _splitmix=splitmix_c))
        fill_c = cached(erasing.fill_value)
        erase_c = cached(_with_globals(erasing.apply_erasing, noise_normal=noise_c, fill_value=fill_c))
    else:
        erase_c = strict(_no_erasing)
    mix_c = cached(mixing.mix_pair)

    @strict
    def decode_into(jpeg, height, width, out):
        zero, one, no = np.uint32(0), np.uint32(1), np.bool_(False)
        return imdecode_c(jpeg, out, height, width, height, width, zero, zero, one, one, no, no)

    @strict
    def render_into(image, params, layout, out, scratch):
        top, left, h, w = crop_box_c(image.shape[0], image.shape[1], params)
        # renderer 2 keeps OpenCV for crops that grow on both axes: there INTER_AREA is the same area filter
        # on OpenCV's SIMD linear path, twice as fast as the separable resample (kdcache.augment.area_resize)
        if layout[5] == 1 or (h <= out.shape[0] and w <= out.shape[1]):
            resize_crop_c(image, top, top + h, left, left + w, out)
            if params[4] > 0.5:
                flip_c(out)
        else:
            resize_area_c(image, top, left, h, w, out, params[4] > 0.5)
        if layout[1] > 0:
            rand_augment_c(out, params[layout[0]:layout[0] + 2 * layout[1]].reshape((layout[1], 2)), scratch)
        if layout[2] >= 0:
            erase_c(out, params[layout[2]:], layout[3])

    @numba.cfunc(RENDER_VIEW_SIGNATURE, **STRICT)
    def render_view(image, height, width, params, n_params, layout, out, size, scratch):
        render_into(numba.carray(image, (height, width, 3), numba.uint8),
                    numba.carray(params, (n_params,), numba.float32), numba.carray(layout, (6,), numba.int64),
                    numba.carray(out, (size, size, 3), numba.uint8), numba.carray(scratch, (size, size, 3), numba.uint8))

    render_view_c = render_view.ctypes

    @strict
    def render_one(image, params, layout, out, scratch):
        """One view through the C function: the machine code every caller runs."""
        render_view_c(image.ctypes.data, image.shape[0], image.shape[1], params.ctypes.data, params.shape[0],
                      layout.ctypes.data, out.ctypes.data, out.shape[0], scratch.ctypes.data)

    @strict
    def render_many(image, params, layout, out):
        scratch = np.empty_like(out[0])
        for v in range(params.shape[0]):
            render_one(image, params[v], layout, out[v], scratch)

    @strict
    def mix_pair(a, b, params, layout):
        mix_c(a, b, params[layout[4]:])

    @numba.njit(parallel=True, **STRICT)
    def mix_chunk(views, params, layout):
        """Mix every pair whose two members are in this chunk (each pair once, from its lower member)."""
        if layout[4] < 0:
            return
        n, nv = views.shape[0], views.shape[1]
        for t in numba.prange(n * nv):
            j, v = t // nv, t % nv
            offset = int(params[j, v, layout[4] + 1])
            if offset > 0 and j + offset < n:
                mix_pair(views[j, v], views[j + offset, v], params[j, v], layout)

    @numba.njit(parallel=True, **STRICT)
    def render_samples(data, offsets, lengths, heights, widths, params, layout, temp, scratch, out, status):
        """data: concatenated JPEGs; params (n, V, P); temp (n, >= max h*w*3); scratch (n, S, S, 3);
        out (n, V, S, S, 3)."""
        for j in numba.prange(offsets.shape[0]):
            h, w = heights[j], widths[j]
            image = temp[j, :h * w * 3].reshape((h, w, 3))
            status[j] = decode_into(data[offsets[j]:offsets[j] + lengths[j]], np.uint32(h), np.uint32(w), image)
            for v in range(params.shape[1]):
                render_one(image, params[j, v], layout, out[j, v], scratch[j])

    return Renderer(decode_into, render_into, render_many, render_samples, mix_pair, mix_chunk, render_view)


def _with_globals(fn, **names):
    """A copy of fn whose global names point at the given compiled functions (numba resolves globals at
    compile time, so each renderer's copy calls its own compiled helpers)."""
    import types
    g = dict(fn.__globals__)
    g.update(names)
    return types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)


def _renderer(layout: np.ndarray = None) -> Renderer:
    """The renderer for this layout's steps (compiled once per process and kind)."""
    return make_renderer(False, False) if layout is None else make_renderer(bool(layout[1] > 0), bool(layout[2] >= 0))


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
        self.views = np.empty((0, 0, 0, 3), np.uint8)

    def scratch(self, n: int, pixels: int) -> np.ndarray:
        if self.temp.shape[0] < n or self.temp.shape[1] < pixels * 3:
            self.temp = np.empty((max(n, self.temp.shape[0]), max(pixels * 3, self.temp.shape[1])), np.uint8)
        return self.temp

    def view_scratch(self, n: int, size: int) -> np.ndarray:
        """One view-sized scratch image per sample (RandAugment's geometric ops)."""
        if self.views.shape[0] < n or self.views.shape[1] != size:
            self.views = np.empty((max(n, self.views.shape[0]), size, size, 3), np.uint8)
        return self.views

def render_samples(jpegs, heights, widths, params: np.ndarray, size: int, layout: np.ndarray = None, what: str = "sample",
                   out: np.ndarray = None, buffers: SampleBuffers = None, mix: bool = True) -> np.ndarray:
    """Views of several samples, decoding each once: params (n, V, P) -> (n, V, size, size, 3) uint8.
    Parallel over samples (numba threads); the pixels equal render_views on each decoded image, then
    (mix=True) every pair whose two members are both among these samples is mixed: a caller that mixes
    passes whole mixing blocks. `out` (that shape) and `buffers` let a caller reuse memory across calls."""
    n = len(jpegs)
    lengths = np.array([len(b) for b in jpegs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    data = np.frombuffer(b"".join(jpegs), np.uint8)
    heights = np.asarray(heights, np.int64)
    widths = np.asarray(widths, np.int64)
    pixels = int((heights * widths).max(initial=1))
    buffers = buffers or SampleBuffers()
    temp = buffers.scratch(n, pixels)
    views_scratch = buffers.view_scratch(n, size)
    params = np.ascontiguousarray(params, dtype=np.float32)
    if out is None:
        out = np.empty((n, params.shape[1], size, size, 3), np.uint8)
    status = np.zeros(n, np.int64)
    layout = _layout_array(layout, params)
    renderer = _renderer(layout)
    renderer.render_samples(data, offsets, lengths, heights, widths, params, layout, temp, views_scratch, out, status)
    if status.any():
        raise ValueError(f"{what} {int(np.flatnonzero(status)[0])} of this batch: JPEG decode failed")
    if mix and layout[4] >= 0:  # (not called without mixing: its parallel loop takes 0.5 s to compile)
        renderer.mix_chunk(out, params, layout)
    return out


def render_views(image: np.ndarray, params: np.ndarray, size: int, layout: np.ndarray = None) -> np.ndarray:
    """All views (rows of params) of one decoded image, unmixed: (V, size, size, 3) uint8."""
    params = np.ascontiguousarray(params, dtype=np.float32)
    params = params.reshape(-1, params.shape[-1])
    out = np.empty((len(params), size, size, 3), np.uint8)
    layout = _layout_array(layout, params)
    _renderer(layout).render_many(np.ascontiguousarray(image), params, layout, out)
    return out


def _layout_array(layout, params: np.ndarray) -> np.ndarray:
    """The compiled renderer's layout argument; None means the 5 crop columns only."""
    from kdcache.augment.params import CROP_COLUMNS, ParamLayout
    if layout is None:
        if params.shape[-1] != CROP_COLUMNS:
            raise ValueError(f"parameter rows of {params.shape[-1]} columns need their ParamLayout")
        layout = ParamLayout().as_array()
    elif isinstance(layout, ParamLayout):
        layout = layout.as_array()
    return np.asarray(layout, np.int64)


def mix_views(a: np.ndarray, b: np.ndarray, params_a: np.ndarray, layout: np.ndarray) -> None:
    """Mix two rendered views of a pair in place (a is the view whose parameter row is given)."""
    layout = _layout_array(layout, params_a)
    _renderer(layout).mix_pair(a, b, np.ascontiguousarray(params_a, dtype=np.float32), layout)
