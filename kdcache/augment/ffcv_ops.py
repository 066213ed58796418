"""Student side of the view renderer: an FFCV decoder that replays stored view parameters.

FFCV hands decoders the beton row ids of each batch (`batch_indices`), which are the global sample
indices. The parameters of the current epoch's views live in a float32 (N, P) table owned by the
decoder; compiled code reaches it by address, because numba freezes global and closure arrays at
compile time. Refilling the table in place (set_views) between epochs therefore needs no recompilation.
Fill it before `iter(loader)`: FFCV's epoch thread starts decoding as soon as the iterator exists. The
address is not compiled in: it sits in a slot of a process-wide array (TableSlots) and the code is compiled
with the slot's number, so loaders built one after another (slot 0 each time) share one compiled decoder
(FFCV's compiler is memoised on the closure's values: kdcache.ffcv_fixes, 3.).

The output size may change between epochs (progressive resizing): set `output_size` before `iter(loader)`,
as ffcv-imagenet does. FFCV asks every operation for its memory again at each epoch's start
(Graph.allocate_memory -> declare_state_and_memory), and the compiled code reads the size from its output
buffer, so a new size needs new buffers but no compilation. The stored rows' pixel boxes (erasing, cutmix)
refer to `view_size`; each row is copied to a per-sample buffer and its boxes scaled to the size rendered
(kdcache.augment.rescale).

Mixing happens in the same decode call, after every view of the batch is rendered: the sample order
(kdcache.augment.loader.PairedOrder) puts partners next to each other in one batch, so each image is
decoded once per epoch. A partner missing from its batch is caught by the loader, which raises: a view
is never silently left unmixed.
"""

import numba
import numpy as np
import kdcache.ffcv_fixes  # noqa: F401 (first: corrects FFCV as it is imported)
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.utils import cast_int_to_byte_ptr

from kdcache.augment.params import ParamLayout
from kdcache.augment import render
from kdcache.augment.rescale import scale_view_row


_scale_row = numba.njit(cache=True, **render.STRICT)(scale_view_row)


class TableSlots:
    """(address, rows, columns) of each live decoder's view table, in one process-wide int64 array whose address
    compiled code reads at run time. A decoder takes the lowest free slot and gives it back when it is
    collected (its table with it: the slot never outlives what it points to)."""
    SLOTS = 1024

    def __init__(self):
        import threading
        self.array = np.zeros((self.SLOTS, 3), np.int64)
        self.address, self.nbytes = self.array.ctypes.data, self.array.nbytes
        self._free = list(range(self.SLOTS))
        self._lock = threading.Lock()

    def take(self, owner, table: np.ndarray) -> int:
        import gc
        import weakref
        if 0 not in self._free:   # a finished loader's decoders wait in reference cycles: collect them first,
            gc.collect()          # so that this one gets the slot whose compiled code exists (0 for one at a time)
        with self._lock:
            if not self._free:
                raise RuntimeError(f"more than {self.SLOTS} replay decoders alive in one process")
            slot = min(self._free)
            self._free.remove(slot)
        self.array[slot] = (table.ctypes.data, table.shape[0], table.shape[1])
        weakref.finalize(owner, self._give_back, slot)
        return slot

    def _give_back(self, slot: int) -> None:
        self.array[slot] = 0
        with self._lock:
            self._free.append(slot)


TABLE_SLOTS = TableSlots()


class ReplayViewDecoder(ResizedCropRGBImageDecoder):
    """Decode + crop + resize + flip of view (i, params[i]) for every sample id i of the batch."""

    def __init__(self, num_samples: int, output_size: int, layout: ParamLayout = None, view_size: int = None,
                 table: np.ndarray = None):
        """view_size: the size the rows' pixel boxes refer to (the recipe's; default output_size). table: another
        decoder's table to read (a second rendering of the same views, e.g. at the teacher's size)."""
        super().__init__((output_size, output_size))
        self.layout = layout or ParamLayout()
        self.view_size = int(view_size or output_size)
        self.table = np.full((num_samples, self.layout.width), np.nan, np.float32) if table is None else table
        self.table_slot = TABLE_SLOTS.take(self, self.table)

    def set_views(self, params: np.ndarray) -> None:
        """Copy one epoch's (N, P) view parameters into the table (in place: the compiled decoder reads it at the
        address its slot holds)."""
        params = np.asarray(params, dtype=np.float32)
        if params.shape != self.table.shape:
            raise ValueError(f"view table needs shape {self.table.shape}, got {params.shape}")
        if not np.isfinite(params).all():
            raise ValueError("view parameters contain NaN or inf")
        self.table[...] = params

    def declare_state_and_memory(self, previous_state):
        """The parent's output and decode buffers, plus a view-sized scratch image per sample for RandAugment
        (allocated by FFCV per epoch, not per op) and a row per sample for the boxes scaled to this size."""
        state, (output, decoded) = super().declare_state_and_memory(previous_state)
        return state, (output, decoded, AllocationQuery(output.shape, output.dtype),
                       AllocationQuery((self.layout.width,), np.float32))

    @property
    def get_crop_generator(self):  # abstract in the parent; the crop comes from the table instead
        return None

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        slots_address, slots_nbytes, slot = TABLE_SLOTS.address, TABLE_SLOTS.nbytes, self.table_slot
        layout = self.layout.as_array()
        mix_offset = int(layout[4])
        # the view is rendered through the renderer's C function, so that this pipeline's compilation does not
        # compile the renderer again (kdcache.augment.render)
        render_view = render.render_view.ctypes
        decode_into, mix_pair, clib = render.decode_into, render.mix_pair, render.C_FUNCTIONS
        view_size = self.view_size

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, scratch_storage, row_storage = my_storage
            size = destination.shape[1]        # this epoch's output size (FFCV allocated the buffers for it)
            where = numba.carray(cast_int_to_byte_ptr(slots_address), (slots_nbytes,)).view(np.int64)
            rows, columns = where[3 * slot + 1], where[3 * slot + 2]
            table = numba.carray(cast_int_to_byte_ptr(where[3 * slot]),
                                 (rows * columns * 4,)).view(np.float32).reshape((rows, columns))
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp = temp_storage[dst_ix]
                    decode_into(image_data, height, width, temp, clib)
                    image = temp.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                row = row_storage[dst_ix]
                row[:] = table[source_ix]
                _scale_row(row, layout, view_size, size)
                out = destination[dst_ix]
                render_view(image.ctypes.data, image.shape[0], image.shape[1], row.ctypes.data, row.shape[0],
                            layout.ctypes.data, out.ctypes.data, size, scratch_storage[dst_ix].ctypes.data,
                            clib.ctypes.data)
            if mix_offset >= 0:
                n = len(batch_indices)
                for dst_ix in my_range(n):
                    source_ix = batch_indices[dst_ix]
                    offset = int(table[source_ix, mix_offset + 1])
                    if offset > 0:  # the pair is mixed once, from its lower member
                        partner = source_ix + offset
                        at = -1
                        if dst_ix + 1 < n and batch_indices[dst_ix + 1] == partner:
                            at = dst_ix + 1
                        else:
                            for q in range(n):
                                if batch_indices[q] == partner:
                                    at = q
                        if at >= 0:  # (a partner missing from the batch is caught by ReplayLoader.__iter__)
                            mix_pair(destination[dst_ix], destination[at], row_storage[dst_ix], layout)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
