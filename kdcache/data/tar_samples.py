"""The samples of a webdataset tar, read strictly: a truncated or damaged shard names the sample where it broke.

Python's tarfile, and webdataset through it, takes a tar cut at a member boundary or inside a header for
the end of the archive: the rest of the shard was lost without a word. Here a tar must end with its
end-of-archive marker (a zero block). Where it does not, or where a member's data ends early, the sample
being read is the damaged one: with the marker missing, the last sample read may itself be incomplete.
Keys and extensions follow webdataset's rules (its `base_plus_ext`; extensions lower-cased; members
that are not regular files, or are named `__...__`, are skipped).
"""

import re
import tarfile
from typing import Dict, Iterator, Optional, Tuple

from webdataset.tariterators import base_plus_ext

_WDS_META = re.compile(r"__[^/]*__($|/)")


class DamagedShard(Exception):
    """The tar breaks at sample `key` (None: before any sample); the rest of the shard is unreadable."""

    def __init__(self, key: Optional[str], reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped reading headers: a zero block is the archive's end, anything else
    (no bytes, half a header, a bad checksum) is a cut or damage that tarfile ends on silently."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf.kdcache_end_marker = isinstance(exc, tarfile.EOFHeaderError)
            raise


def iter_tar_samples(path) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order. Raises tarfile.ReadError when the file is no tar
    at all, DamagedShard where a readable tar breaks."""
    with open(path, "rb") as stream:
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo)
        key, members = None, {}
        try:
            for info in tf:
                if not info.isreg() or _WDS_META.match(info.name):
                    continue
                prefix, ext = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        yield key, members   # complete: the next sample's header was read
                    key, members = prefix, {}
                if ext.lower() in members:
                    raise DamagedShard(key, f"member {info.name} appears twice")
                members[ext.lower()] = tf.extractfile(info).read()
                tf.members = []              # stream mode: keep no list of every member read
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DamagedShard(key, f"truncated or damaged tar: {type(exc).__name__}: {exc}; "
                                    "the rest of the shard is lost") from None
        if not getattr(tf, "kdcache_end_marker", False):
            raise DamagedShard(key, "truncated or damaged tar: it ends without its end-of-archive marker after this "
                                    "sample, which may be incomplete; the rest of the shard is lost")
        if key is not None:
            yield key, members
