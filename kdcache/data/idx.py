"""Reader for the IDX format of (Fashion-)MNIST (LeCun et al.), plain or gzipped."""

import gzip
import struct
from pathlib import Path

import numpy as np

from kdcache.errors import KdcacheError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KdcacheError(f"{path}: cannot read IDX file: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise KdcacheError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise KdcacheError(f"{path}: IDX payload has {len(body)} bytes, header says {expected} for shape {shape}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)
