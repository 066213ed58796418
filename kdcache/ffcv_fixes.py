"""Every change kdcache makes to FFCV 1.0.2's internals, in one place. Every kdcache module that uses FFCV
imports this one before ffcv. Two corrections, applied at import:

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
(tests/test_views.py checks both.)

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
