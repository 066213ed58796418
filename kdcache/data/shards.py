"""The teacher's input: webdataset shards in timm's ImageNet layout (members <key>.jpg and <key>.cls).

Writing uses webdataset's TarWriter. Reading by global index uses the byte offsets of each .jpg member,
recorded once after a shard is written, and os.pread: the same idea as wids' ShardListDataset, which is
not a dependency here (it also downloads and caches), and all this needs is local byte ranges.
"""

import os
import tarfile
from pathlib import Path
from typing import List, Tuple

import numpy as np
import webdataset as wds

from kdcache.data.canonical import CanonicalImage
from kdcache.errors import KdcacheError


def shard_name(split: str, n: int) -> str:
    return f"{split}-{n:06d}.tar"


class ShardSink:
    """Appends canonical samples to <split>-NNNNNN.tar files, `maxcount` samples each, in call order."""

    def __init__(self, split_dir: Path, split: str, maxcount: int):
        self.split_dir, self.split, self.maxcount = Path(split_dir), split, maxcount
        self.names: List[str] = []
        self.counts: List[int] = []
        self._writer = None

    def add(self, key: str, label: int, image: CanonicalImage) -> None:
        if self._writer is None or self.counts[-1] == self.maxcount:
            self._close_current()
            self.names.append(shard_name(self.split, len(self.names)))
            self.counts.append(0)
            # mtime fixed so that the same input gives byte-identical shards
            self._writer = wds.TarWriter(str(self.split_dir / self.names[-1]), mtime=0)
        self._writer.write({"__key__": key, "jpg": image.jpeg, "cls": int(label)})
        self.counts[-1] += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> Tuple[List[str], List[int]]:
        self._close_current()
        return self.names, self.counts


def jpeg_locations(split_dir: Path, shard_names: List[str], keys: List[str]) -> np.ndarray:
    """(N, 3) int64 rows (shard number, byte offset, byte size) of each sample's .jpg member, checked
    against the expected key order."""
    rows = []
    for s, name in enumerate(shard_names):
        with tarfile.open(Path(split_dir) / name) as tf:
            for member in tf:
                if member.name.endswith(".jpg"):
                    rows.append((s, member.offset_data, member.size, member.name[:-4]))
    if [r[3] for r in rows] != list(keys):
        raise KdcacheError(f"{split_dir}: shard contents do not match the sample order just written")
    return np.array([r[:3] for r in rows], dtype=np.int64).reshape(-1, 3)


class JpegReader:
    """Canonical JPEG bytes of sample i, read with one pread from its shard. Fork-safe (reopens per pid)."""

    def __init__(self, split_dir: Path, shard_names: List[str], locations: np.ndarray):
        self.paths = [str(Path(split_dir) / n) for n in shard_names]
        self.locations = locations
        self._fds, self._pid = {}, None

    def __len__(self) -> int:
        return len(self.locations)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getitem__(self, i: int) -> bytes:
        shard, offset, size = (int(x) for x in self.locations[i])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise KdcacheError(f"{self.paths[shard]}: truncated (sample {i} needs {size} bytes at {offset})")
        return data

    def read_range(self, a: int, b: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples a..b-1 in one buffer: (uint8 data, int64 offsets into it, int64 lengths). Samples are
        stored in order, so this is one pread per shard the range spans (each member's tar headers come
        along: about 1.5 KB per sample) instead of a read and a copy per sample; the dump renders from it."""
        loc = self.locations[a:b]
        if len(loc) == 0:
            return np.empty(0, np.uint8), np.empty(0, np.int64), np.empty(0, np.int64)
        # runs of samples in one shard, in increasing byte order: each run is one read
        breaks = np.flatnonzero((loc[1:, 0] != loc[:-1, 0]) | (loc[1:, 1] < loc[:-1, 1] + loc[:-1, 2])) + 1
        parts, offsets, base = [], np.empty(len(loc), np.int64), 0
        for r0, r1 in zip([0, *breaks], [*breaks, len(loc)]):
            shard, start = int(loc[r0, 0]), int(loc[r0, 1])
            end = int(loc[r1 - 1, 1] + loc[r1 - 1, 2])
            data = os.pread(self._fd(shard), end - start, start)
            if len(data) != end - start:
                raise KdcacheError(f"{self.paths[shard]}: truncated (samples {a + r0} to {a + r1 - 1} need bytes "
                                   f"{start} to {end})")
            offsets[r0:r1] = loc[r0:r1, 1] - start + base
            parts.append(data)
            base += len(data)
        return np.frombuffer(b"".join(parts), np.uint8), offsets, loc[:, 2].copy()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
