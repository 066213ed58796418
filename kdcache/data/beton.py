"""The student's input: an FFCV .beton with fields image (the canonical JPEG bytes), label and index.

FFCV's RGBImageField re-encodes every image with cv2 (and in 'proportion' mode picks JPEG or raw with
an unseeded random draw), so the student would not see the bytes the teacher saw. CanonicalJPEGField
stores the given JPEG bytes unchanged in the RGBImageField layout (mode, width, height, data_ptr):
the stock decoders and kdcache's replay decoder read it as any RGBImageField.
"""

from pathlib import Path

import numpy as np
from kdcache.ffcv_fixes import writer_bar_on_terminal_only, writer_field_type  # first: corrects FFCV as it is imported
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.writer import DatasetWriter

from kdcache.data.shards import JpegReader

_RGB_TYPE_ID = 2


class CanonicalJPEGField(RGBImageField):
    """Writes (jpeg_bytes, height, width) as a JPEG-mode RGBImageField entry, byte for byte."""

    def encode(self, destination, value, malloc):
        jpeg, height, width = value
        data = np.frombuffer(jpeg, dtype=np.uint8)
        destination["mode"] = IMAGE_MODES["jpg"]
        destination["height"], destination["width"] = height, width
        destination["data_ptr"], storage = malloc(data.nbytes)
        storage[:] = data


class _SplitRows:
    """Indexable view of a split for DatasetWriter.from_indexed_dataset: row i = sample i."""

    def __init__(self, reader: JpegReader, labels: np.ndarray, sizes: np.ndarray):
        self.reader, self.labels, self.sizes = reader, labels, sizes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.reader[i], int(self.sizes[i, 0]), int(self.sizes[i, 1])), int(self.labels[i]), int(i)


def write_beton(path: Path, reader: JpegReader, labels: np.ndarray, sizes: np.ndarray, workers: int) -> None:
    largest = max(int(reader.locations[:, 2].max(initial=0)), 1)
    page_size = 1 << max(21, int(np.ceil(np.log2(largest * 2))))  # every sample must fit one page
    fields = {"image": CanonicalJPEGField(write_mode="jpg"), "label": IntField(), "index": IntField()}
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=max(1, workers))
    # written under RGBImageField's type id (2), so that any FFCV reader opens the beton as a plain RGBImageField
    with writer_field_type(_RGB_TYPE_ID, CanonicalJPEGField), writer_bar_on_terminal_only():
        writer.from_indexed_dataset(_SplitRows(reader, labels, sizes), chunksize=256)

