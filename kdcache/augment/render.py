"""The one view renderer: decode the canonical JPEG, crop by the view's parameters, resize, flip, then
RandAugment and random erasing (when the recipe has them); mixing of a pair's two views comes last.

Both stages run this code: the teacher side directly (decode_jpeg, render_views), the student side
inside kdcache's FFCV decoder. Decode is FFCV's libffcv imdecode (turbojpeg with TJFLAG_FASTDCT, so
not PIL's pixels); the resize is renderer 2's separable area resample (kdcache.augment.area_resize), or
for caches made by renderer 1, FFCV's resize_crop (cv::resize INTER_AREA). The version travels in the
layout array (ParamLayout.renderer), so the student's replayed view of (i, s) is the image the teacher
scored, bit for bit, whichever version made the cache (tests/test_views.py, tests/test_golden_views.py).

The renderer is compiled once and kept in numba's on-disk cache, so a later process loads it. Two things
make that possible: FFCV's C functions (decode, resize) are called through addresses passed at run time
(C_FUNCTIONS) instead of their ctypes objects, whose addresses numba would compile in; and the kernels are
module-level functions (numba never caches closures). FFCV's decoders call the renderer through a C
function pointer (render_view, a numba cfunc) rather than its dispatcher: a numba function links and
optimizes again the code of every dispatcher it calls, so each FFCV loader would recompile the whole
renderer (2.6 s per loader with the crop alone, 8.6 s with RandAugment, on the 2-core machine). Sharing
compiled code between pipelines needs kdcache.ffcv_fixes (FFCV 1.0.2 mutates one of numba's shared types
when it builds a Loader). Same source, same flags (fastmath off) in both stages: the student's view is the
teacher's, bit for bit (tests/test_views.py).

numba checks only a cached function's own source file; the renderer's code spans several files, so
_invalidate_stale_cache (below) drops the cache entries that span files when any of them changed.
"""

import ctypes
import logging
import os

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

import kdcache.ffcv_fixes  # noqa: F401 (first: corrects FFCV as it is imported)
from ffcv.libffcv import ctypes_imdecode, ctypes_resize

from kdcache.augment import area_resize, erasing, mixing
from kdcache.augment.randaugment import compile_rand_augment
from kdcache.augment.recipe import RENDERER_VERSION, RENDERER_VERSIONS  # noqa: F401 (what callers import from here)
from kdcache.files import atomic_write

log = logging.getLogger(__name__)


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


# Every kernel sets its floating-point flags explicitly: numba (>= 0.54) lets a callee inherit flags it does
# not set from its caller, and FFCV compiles its decoders with fastmath=True and error_model="numpy". Measured:
# with inherited fastmath, AutoContrast of a full-range image turned 132 into 131 (255 / 255 computed as a
# reciprocal) in the student's views only.
STRICT = dict(fastmath=False, error_model="python")

# render_view(image, height, width, params, n_params, layout, out, size, scratch, clib): C-contiguous buffers
# by address (uint8 image h x w x 3, float32 params, int64 layout[6], uint8 out and scratch size x size x 3,
# int64 C_FUNCTIONS[2])
RENDER_VIEW_SIGNATURE = numba.types.void(numba.types.voidptr, numba.types.int64, numba.types.int64,
                                         numba.types.voidptr, numba.types.int64, numba.types.voidptr,
                                         numba.types.voidptr, numba.types.int64, numba.types.voidptr,
                                         numba.types.voidptr)


def _with_globals(fn, **names):
    """A copy of fn whose global names point at the given compiled functions (numba resolves globals at
    compile time, so the copy calls these compiled helpers)."""
    import types
    g = dict(fn.__globals__)
    g.update(names)
    return types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)


# FFCV's C functions are called through addresses passed at run time (C_FUNCTIONS), not through its ctypes
# objects: numba compiles a ctypes function's address into the code, which would go stale in numba's on-disk
# cache (the library loads elsewhere in every process), so it refuses to cache such code.
C_FUNCTIONS = np.array([ctypes.cast(ctypes_imdecode, ctypes.c_void_p).value,
                        ctypes.cast(ctypes_resize, ctypes.c_void_p).value], np.int64)


@intrinsic
def _c_imdecode(typingctx, address, source, size, height, width, dest):
    """libffcv's imdecode at `address`, as FFCV's imdecode(source, dest, h, w, h, w, 0, 0, 1, 1, False, False):
    int imdecode(uchar *src, uint64 size, uint32 h, uint32 w, uchar *dst, uint32 crop_h, uint32 crop_w,
    uint32 offset_x, uint32 offset_y, uint32 scale_num, uint32 scale_denom, bool enable_crop, bool flip)."""
    sig = numba.types.int32(*[numba.types.int64] * 6)

    def codegen(context, builder, signature, args):
        i64, i32, i8 = ir.IntType(64), ir.IntType(32), ir.IntType(8)
        fnty = ir.FunctionType(i32, [i64, i64, i32, i32, i64, i32, i32, i32, i32, i32, i32, i8, i8])
        address, source, size, height, width, dest = args
        h, w = builder.trunc(height, i32), builder.trunc(width, i32)
        zero, one, no = ir.Constant(i32, 0), ir.Constant(i32, 1), ir.Constant(i8, 0)
        fn = builder.inttoptr(address, fnty.as_pointer())
        return builder.call(fn, [source, size, h, w, dest, h, w, zero, zero, one, one, no, no])
    return sig, codegen


@intrinsic
def _c_resize(typingctx, address, source, height, width, row0, row1, col0, col1, dest, out_h, out_w):
    """libffcv's resize at `address`, as FFCV's resize_crop (cv::resize INTER_AREA of the crop):
    void resize(int64 resizer, int64 src, int64 h, int64 w, int64 row0, int64 row1, int64 col0, int64 col1,
    int64 dst, int64 out_h, int64 out_w)."""
    sig = numba.types.void(*[numba.types.int64] * 11)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [i64] * 11).as_pointer())
        builder.call(fn, [ir.Constant(i64, 0)] + list(args[1:]))
        return context.get_dummy_value()
    return sig, codegen


RENDERER_SOURCES = ("render.py", "area_resize.py", "erasing.py", "mixing.py", "randaugment.py", "rescale.py")
# the cached functions that compile in code or constants from another file: render.py's kernels, and
# rescale.scale_view_row (FFCV's decoder's copy, kdcache.augment.ffcv_ops), which reads mixing.MODE_CUTMIX
CROSS_FILE_CACHE_ENTRIES = ("render.*.nbi", "render.*.nbc", "rescale.*.nbi", "rescale.*.nbc")


def _invalidate_stale_cache(here: str) -> None:
    """Drop numba's cache entries of the renderer's kernels when any renderer source changed: numba checks only
    a function's own file, and these kernels compile in code from the other files. (With NUMBA_CACHE_DIR set
    or an unwritable package directory numba caches elsewhere; there installs replace render.py too.)"""
    import glob
    import hashlib
    digest = hashlib.sha256()
    for name in RENDERER_SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    cache_dir = os.path.join(here, "__pycache__")
    stamp = os.path.join(cache_dir, "kdcache-renderer-sources.sha256")
    try:
        with open(stamp) as f:
            if f.read() == digest.hexdigest():
                return
    except OSError:
        pass
    for path in [p for pattern in CROSS_FILE_CACHE_ENTRIES for p in glob.glob(os.path.join(cache_dir, pattern))]:
        try:
            os.remove(path)
        except OSError:
            pass
    try:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write(stamp, digest.hexdigest())
    except OSError:
        pass


def _say_if_compiling(here: str) -> None:
    """A cold cache means a long first compile: say so, rather than sit silent (once per checkout)."""
    import glob
    cache_dir = os.path.join(here, "__pycache__")
    if os.access(cache_dir, os.W_OK) and not glob.glob(os.path.join(cache_dir, "render.render_view-*.nbi")):
        log.info("kdcache: compiling the view renderer for this machine (once; numba keeps it in "
                 f"{cache_dir}): about 10-40 s")


_invalidate_stale_cache(os.path.dirname(os.path.abspath(__file__)))
_say_if_compiling(os.path.dirname(os.path.abspath(__file__)))

# The renderer's kernels, compiled once and kept in numba's on-disk cache (kdcache/augment/__pycache__): a
# later process loads the machine code compiled for this CPU. Same source, same flags in both stages.
_jit = numba.njit(cache=True, **STRICT)
_crop_box = _jit(crop_box)
_flip = _jit(flip_horizontal)
_resize_area = _jit(_with_globals(area_resize.resize_area, area_taps=_jit(area_resize.area_taps),
                                  weighted_lines=_jit(area_resize.weighted_lines)))
_rand_augment = compile_rand_augment(with_scratch=True)
_erase = _jit(_with_globals(erasing.apply_erasing, fill_value=_jit(erasing.fill_value),
                            noise_normal=_jit(_with_globals(erasing.noise_normal, _splitmix=_jit(erasing._splitmix)))))
_mix = _jit(mixing.mix_pair)


@_jit
def decode_into(jpeg, height, width, out, clib):
    return _c_imdecode(clib[0], jpeg.ctypes.data, jpeg.size, height, width, out.ctypes.data)


@_jit
def render_into(image, params, layout, out, scratch, clib):
    top, left, h, w = _crop_box(image.shape[0], image.shape[1], params)
    # renderer 2 keeps OpenCV for crops that grow on both axes: there INTER_AREA is the same area filter
    # on OpenCV's SIMD linear path, twice as fast as the separable resample (kdcache.augment.area_resize)
    if layout[5] == 1 or (h <= out.shape[0] and w <= out.shape[1]):
        _c_resize(clib[1], image.ctypes.data, image.shape[0], image.shape[1], top, top + h, left, left + w,
                  out.ctypes.data, out.shape[0], out.shape[1])
        if params[4] > 0.5:
            _flip(out)
    else:
        _resize_area(image, top, left, h, w, out, params[4] > 0.5)
    if layout[1] > 0:
        _rand_augment(out, params[layout[0]:layout[0] + 2 * layout[1]].reshape((layout[1], 2)), scratch)
    if layout[2] >= 0:
        _erase(out, params[layout[2]:], layout[3])


@numba.cfunc(RENDER_VIEW_SIGNATURE, cache=True, **STRICT)
def render_view(image, height, width, params, n_params, layout, out, size, scratch, clib):
    render_into(numba.carray(image, (height, width, 3), numba.uint8),
                numba.carray(params, (n_params,), numba.float32), numba.carray(layout, (6,), numba.int64),
                numba.carray(out, (size, size, 3), numba.uint8), numba.carray(scratch, (size, size, 3), numba.uint8),
                numba.carray(clib, (2,), numba.int64))


@_jit
def render_many(image, params, layout, out, clib):
    scratch = np.empty_like(out[0])
    for v in range(params.shape[0]):
        render_into(image, params[v], layout, out[v], scratch, clib)


@_jit
def mix_pair(a, b, params, layout):
    _mix(a, b, params[layout[4]:])


@numba.njit(parallel=True, cache=True, **STRICT)
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


@_jit
def balance(cost, n_bins):
    """Samples -> n_bins groups of about equal total cost: the most expensive first, each to the group with
    the least so far. numba's parallel loop hands each thread one equal share of the iterations (statically
    under OpenMP, the layer numba has where TBB is missing), so with a few images of varied size per thread
    a chunk waits for its most expensive share; one group per thread evens that out. Returns the sample
    indices grouped (members) and where each group starts (bounds, n_bins + 1 entries)."""
    n = cost.shape[0]
    load = np.zeros(n_bins)
    group = np.empty(n, np.int64)
    for i in np.argsort(-cost, kind="mergesort"):
        j = np.argmin(load)
        group[i] = j
        load[j] += cost[i]
    members = np.argsort(group, kind="mergesort")
    bounds = np.zeros(n_bins + 1, np.int64)
    bounds[1:] = np.cumsum(np.bincount(group, minlength=n_bins))
    return members, bounds


@numba.njit(parallel=True, cache=True, **STRICT)
def _render_samples(data, offsets, lengths, heights, widths, params, layout, members, bounds, temp, scratch, out,
                    status, clib):
    """data: concatenated JPEGs at offsets; params (n, V, P); members/bounds: one group of samples per
    thread (balance); temp (groups, >= max h*w*3) and scratch (groups, S, S, 3): one decode and one view
    scratch per group; out (n, V, S, S, 3)."""
    for g in numba.prange(bounds.shape[0] - 1):
        for q in range(bounds[g], bounds[g + 1]):
            j = members[q]
            h, w = heights[j], widths[j]
            image = temp[g, :h * w * 3].reshape((h, w, 3))
            status[j] = decode_into(data[offsets[j]:offsets[j] + lengths[j]], h, w, image, clib)
            for v in range(params.shape[1]):
                render_into(image, params[j, v], layout, out[j, v], scratch[g], clib)


def decode_jpeg(jpeg: bytes, height: int, width: int, what: str = "image") -> np.ndarray:
    """Canonical JPEG bytes -> HxWx3 uint8, with FFCV's decoder."""
    out = np.empty((height, width, 3), np.uint8)
    status = decode_into(np.frombuffer(jpeg, np.uint8), np.uint32(height), np.uint32(width), out, C_FUNCTIONS)
    if status != 0:
        raise ValueError(f"{what}: JPEG decode failed (turbojpeg status {status})")
    return out


class SampleBuffers:
    """Reusable decode and view scratch for render_range, one of each per thread. Fresh multi-megabyte
    arrays per call cost more than the decoding itself (first-touch page faults, contended across threads:
    2.5x slower per view measured on 2 cores at 224 px), so callers that render chunk after chunk keep one
    of these."""

    def __init__(self):
        self.temp = np.empty((0, 0), np.uint8)
        self.views = np.empty((0, 0, 0, 3), np.uint8)

    def scratch(self, n: int, pixels: int) -> np.ndarray:
        if self.temp.shape[0] < n or self.temp.shape[1] < pixels * 3:
            self.temp = np.empty((max(n, self.temp.shape[0]), max(pixels * 3, self.temp.shape[1])), np.uint8)
        return self.temp

    def view_scratch(self, n: int, size: int) -> np.ndarray:
        """One view-sized scratch image per thread (RandAugment's geometric ops)."""
        if self.views.shape[0] < n or self.views.shape[1] != size:
            self.views = np.empty((max(n, self.views.shape[0]), size, size, 3), np.uint8)
        return self.views


def render_cost(heights, widths, params: np.ndarray, size: int) -> np.ndarray:
    """Each sample's render time, roughly, in units of one decoded pixel: the decode, the crops' pixels the
    resample reads, the views' pixels it writes. Fitted to one-thread times of 1,024 ImageNet-shaped
    images, 4 views at 224 px (correlation 0.88; tools/render_scaling.py --balance); it only decides
    which thread renders a sample, never its pixels."""
    pixels = (np.asarray(heights, np.float64) * np.asarray(widths, np.float64))
    cropped = (params[:, :, 2].astype(np.float64) * params[:, :, 3]).sum(1) * pixels
    return pixels + 0.27 * cropped + 0.69 * params.shape[1] * size * size


def render_samples(jpegs, heights, widths, params: np.ndarray, size: int, layout: np.ndarray = None, what: str = "sample",
                   out: np.ndarray = None, buffers: SampleBuffers = None, mix: bool = True) -> np.ndarray:
    """Views of several samples (a list of JPEG bytes), decoding each once: see render_range."""
    lengths = np.array([len(b) for b in jpegs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return render_range(np.frombuffer(b"".join(jpegs), np.uint8), offsets, lengths, heights, widths, params, size,
                        layout, what, out, buffers, mix)


def render_range(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, heights, widths, params: np.ndarray,
                 size: int, layout: np.ndarray = None, what: str = "sample", out: np.ndarray = None,
                 buffers: SampleBuffers = None, mix: bool = True) -> np.ndarray:
    """Views of several samples whose JPEGs lie in `data` (uint8) at `offsets`, decoding each once:
    params (n, V, P) -> (n, V, size, size, 3) uint8. Parallel over samples (numba threads, groups of equal
    cost); the pixels equal render_views on each decoded image, then (mix=True) every pair whose two members
    are both among these samples is mixed: a caller that mixes passes whole mixing blocks. `out` (that
    shape) and `buffers` let a caller reuse memory across calls."""
    n = len(offsets)
    heights = np.asarray(heights, np.int64)
    widths = np.asarray(widths, np.int64)
    params = np.ascontiguousarray(params, dtype=np.float32)
    groups = max(1, min(n, numba.get_num_threads()))
    members, bounds = balance(render_cost(heights, widths, params, size), groups)
    buffers = buffers or SampleBuffers()
    temp = buffers.scratch(groups, int((heights * widths).max(initial=1)))
    views_scratch = buffers.view_scratch(groups, size)
    if out is None:
        out = np.empty((n, params.shape[1], size, size, 3), np.uint8)
    status = np.zeros(n, np.int64)
    layout = _layout_array(layout, params)
    _render_samples(data, np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), heights, widths, params,
                    layout, members, bounds, temp, views_scratch, out, status, C_FUNCTIONS)
    if status.any():
        raise ValueError(f"{what} {int(np.flatnonzero(status)[0])} of this batch: JPEG decode failed")
    if mix and layout[4] >= 0:  # (not called without mixing: its parallel loop takes 0.5 s to compile)
        mix_chunk(out, params, layout)
    return out


def render_views(image: np.ndarray, params: np.ndarray, size: int, layout: np.ndarray = None) -> np.ndarray:
    """All views (rows of params) of one decoded image, unmixed: (V, size, size, 3) uint8."""
    params = np.ascontiguousarray(params, dtype=np.float32)
    params = params.reshape(-1, params.shape[-1])
    out = np.empty((len(params), size, size, 3), np.uint8)
    layout = _layout_array(layout, params)
    render_many(np.ascontiguousarray(image), params, layout, out, C_FUNCTIONS)
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
    mix_pair(a, b, np.ascontiguousarray(params_a, dtype=np.float32), layout)
