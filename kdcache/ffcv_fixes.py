"""Every change kdcache makes to FFCV 1.0.2's internals, in one place. Every kdcache module that uses FFCV
imports this one before ffcv. Three corrections, applied at import:

1. At import, ffcv.fields.rgb_image builds IMAGE_MODES as a numba typed Dict, which compiles numba's
   dictionary code in every process (2.2 s on the 2-core machine, at the start of every kdcache command that
   reads or writes FFCV files). FFCV reads IMAGE_MODES only from Python (its decoders' generate_code and its
   writer), so it is imported here with a plain dict in its place.
2. `OSCacheManager.state_type` takes numba's interned `uint8[::1]` type and sets `mutable = False` on it
   (meaning to declare the memory-mapped file read-only). That type object is shared by every compiled
   function in the process: its hash changes, so each dispatcher whose overload table holds a signature with
   it raises KeyError at its next compilation (inside FFCV's loader thread, after which the Loader hangs).
   Here the reader is compiled with a read-only array type of its own, the same types FFCV ends up with,
   and numba's shared types stay as they are. The reader's body is FFCV's.
3. FFCV compiles its pipeline afresh for every Loader: each operation's generate_code returns a new closure
   that Compiler.compile hands to numba.njit, so every Loader (and the memory reader of each) pays numba's
   compilation again, seconds per Loader, although the code is the same. A training run builds two (train and
   eval), `kdcache run` and a test suite many. Compiler.compile is memoised here on what numba compiles: the
   function's code, its closure values and defaults (numba freezes those as constants, arrays by their
   content, so they are keyed by value: scalars and tuples by type and repr, arrays by dtype, shape and bytes;
   anything else by identity, kept alive by the memo so its id is never reused), the signature and the
   parallel flag. A closure over the same values compiles to the same machine code, so the dispatcher
   compiled for the first Loader serves the next.
(tests/test_views.py checks all three.)

And three scoped uses of FFCV internals that FFCV has no public API for (functions below, called by
kdcache.data.beton and kdcache.augment.loader): the writer's field type table, the writer's progress bar,
and a Loader's traversal order.
"""

import contextlib
import functools
import sys

import numba as nb
import numba.typed
import numpy as np

_typed_dict = numba.typed.Dict
numba.typed.Dict = dict
try:
    import ffcv.fields.rgb_image  # noqa: F401 (IMAGE_MODES becomes a plain dict)
finally:
    numba.typed.Dict = _typed_dict

from ffcv.memory_managers.os_cache import OSCacheManager  # noqa: E402 (after the import above)
from ffcv.pipeline.compiler import Compiler  # noqa: E402

READ_ONLY_BYTES = nb.types.Array(nb.uint8, 1, "C", readonly=True)


def _os_cache_state_type(self):
    # (data, sample offsets, sample sizes): FFCV's own layout, with a read-only data array not shared with anyone
    return nb.types.Tuple([READ_ONLY_BYTES, nb.uint64[::1], nb.uint64[::1]])


def _os_cache_compile_reader(self):
    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, READ_ONLY_BYTES(nb.uint64, self.state_type))


OSCacheManager.state_type = property(_os_cache_state_type)
OSCacheManager.compile_reader = _os_cache_compile_reader


def _frozen(value, keep: list):
    """A hashable stand-in for a value numba freezes into compiled code (see 3. above)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.generic)):
        return type(value), repr(value)          # repr: -0.0 and 0.0, 1 and True stay apart
    if isinstance(value, tuple):
        return tuple, tuple(_frozen(v, keep) for v in value)
    if isinstance(value, np.ndarray):
        return np.ndarray, value.dtype.str, value.shape, value.tobytes()
    keep.append(value)                           # identity: alive as long as the memo, so the id stays its own
    return "id", id(value)


_compiled: dict = {}
_ffcv_compile = Compiler.compile.__func__


def _memoised_compile(cls, code, signature=None):
    if not cls.is_enabled or not hasattr(code, "__code__"):
        return _ffcv_compile(cls, code, signature)
    keep = [code.__globals__]
    parallel = bool(getattr(code, "is_parallel", False) and cls.num_threads > 1)
    try:
        key = (code.__code__, id(code.__globals__), parallel, str(signature),
               tuple(_frozen(cell.cell_contents, keep) for cell in (code.__closure__ or ())),
               _frozen(code.__defaults__, keep), _frozen(tuple(sorted((code.__kwdefaults__ or {}).items())), keep))
    except ValueError:                           # an empty cell: compile as FFCV does
        return _ffcv_compile(cls, code, signature)
    if key not in _compiled:
        _compiled[key] = (_ffcv_compile(cls, code, signature), keep)
    return _compiled[key][0]


Compiler.compile = classmethod(_memoised_compile)


@contextlib.contextmanager
def writer_field_type(type_id: int, field_class):
    """While writing, FFCV's DatasetWriter looks `field_class` up by exact class: write it under `type_id`.
    (Why: a subclass of RGBImageField must be written with RGBImageField's id so that readers open it as one.)"""
    from ffcv.types import TYPE_ID_HANDLER
    saved = TYPE_ID_HANDLER[type_id]
    TYPE_ID_HANDLER[type_id] = field_class
    try:
        yield
    finally:
        TYPE_ID_HANDLER[type_id] = saved


@contextlib.contextmanager
def writer_bar_on_terminal_only():
    """FFCV's writer always draws a tqdm bar, which in a log is a line of carriage returns: a bar on a
    terminal only while writing (its module-level `tqdm` is the only handle on it)."""
    import ffcv.writer
    from tqdm import tqdm
    saved = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(tqdm, disable=None, file=sys.stderr, mininterval=1.0)
    try:
        yield
    finally:
        ffcv.writer.tqdm = saved


def set_traversal_order(loader, order, first_length: int) -> None:
    """Replace a Loader's sample order with `order` (an object with sample_order(epoch), as FFCV's
    TraversalOrder): FFCV takes only its built-in OrderOptions. FFCV sizes an epoch from its first order,
    so that is set to `first_length` samples (per rank)."""
    loader.traversal_order = order
    loader.first_traversal_order = np.arange(first_length)
