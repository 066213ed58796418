"""The interface of a place where a cache lives (kdcache.cache.location.Location), and what every kind shares.

Its implementations: LocalLocation and FsspecLocation (kdcache.cache.location), HttpLocation (kdcache.cache.http,
a root published read-only over HTTP). They live in two modules that both build on this one, so that
`Location.of` (in kdcache.cache.location) can choose any of them without an import circle.

Also here: the check that a key part stays inside its place, the error of an object that fails its
recorded checksum, and a read-only zarr store over any place (`ReadOnlyStore`), for the places zarr has no
store of its own for.
"""

import abc
import asyncio
from typing import Dict, Iterable, List, Optional

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest

from kdcache.errors import KdcacheError


class LocationBase(abc.ABC):
    """A directory-like place addressed by '/'-separated keys relative to it. A subclass implements the
    abstract methods below; `sync` and `read_many` have defaults."""

    url: str
    is_local: bool

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def supports_exclusive_create(self) -> bool:
        """Whether `create` is atomic here; where it is not, kdcache refuses to write a cache."""
        return True

    @abc.abstractmethod
    def child(self, name: str) -> "LocationBase":
        """The location `name` directly under this one (a plain name: see check_name)."""

    @abc.abstractmethod
    def zarr_store(self, read_only: bool):
        """A zarr Store on the same place, for the arrays."""

    @abc.abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object; FileNotFoundError if absent."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Replace the whole object atomically: a reader sees the old one or the new one."""

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Create the object only if absent, atomically; True if this call created it."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; an absent one is fine."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> List[str]:
        """Keys under prefix, recursively, sorted; temporaries left out."""

    @abc.abstractmethod
    def children(self, prefix: str = "") -> List[str]:
        """Names directly under prefix, sorted; temporaries left out."""

    @abc.abstractmethod
    def sizes(self, prefix: str = "") -> Dict[str, int]:
        """Key -> bytes, recursively under prefix."""

    def stamps(self, prefix: str = "") -> Dict[str, tuple]:
        """Key -> (bytes, stamp) recursively under prefix, the stamp something that changes when the object is
        rewritten (a modification time, an ETag), or None where the place cannot say: `kdcache publish`
        reuses the checksum of an object whose (bytes, stamp) it has seen before."""
        return {k: (n, None) for k, n in self.sizes(prefix).items()}

    def sync(self, keys: Iterable[str]) -> None:
        """Make objects written by another writer (Zarr) durable. An object store's PUT already is."""

    def read_many(self, keys: Iterable[str]) -> Dict[str, Optional[bytes]]:
        """Several objects at once (concurrently where the store is remote); None for an absent one."""
        out = {}
        for key in keys:
            try:
                out[key] = self.read(key)
            except FileNotFoundError:
                out[key] = None
        return out


def check_name(name: str, what: str = "name") -> str:
    """One path component of a key or a cache id: never empty, '.', '..', or holding a separator, so that
    a key or an id read from someone's metadata cannot reach outside the location it is used in."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise KdcacheError(f"{what} {name!r} is not a plain file name (it would lead outside its directory)")
    return name


def hidden(name: str) -> bool:
    # our temporary files start with '.', LocalStore's end in '.partial'
    return name.startswith(".") or name.endswith(".partial")


class DamagedObject(KdcacheError):
    """Objects that fail the size and CRC32C recorded for them where they were published (kdcache.cache.http):
    never returned. `why`: key -> what is wrong, for every such object of one read_many; `got`: what that
    read_many read for the other keys (None for absent ones), so that a checker can name each unit."""

    def __init__(self, message: str, why: Optional[Dict[str, str]] = None,
                 got: Optional[Dict[str, Optional[bytes]]] = None):
        super().__init__(message)
        self.why = why or {}
        self.got = got or {}


class ReadOnlyStore(Store):
    """zarr's read-only view of a Location: every get goes through the location's own read (so through
    whatever it checks: a published root checks each object against its index). Byte ranges are cut from
    the whole object: kdcache reads whole shard objects anyway (kdcache.cache.integrity.read_units), and
    zarr reads little else (metadata documents)."""

    supports_writes = False
    supports_deletes = False
    supports_listing = True

    def __init__(self, location: LocationBase):
        super().__init__(read_only=True)
        self.location = location

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReadOnlyStore) and other.location.url == self.location.url

    def __repr__(self) -> str:
        return f"ReadOnlyStore({self.location.url!r})"

    async def get(self, key, prototype, byte_range=None):
        try:
            data = await asyncio.to_thread(self.location.read, key)   # a blocking read: off zarr's event loop
        except FileNotFoundError:
            return None
        if isinstance(byte_range, RangeByteRequest):
            data = data[byte_range.start:byte_range.end]
        elif isinstance(byte_range, OffsetByteRequest):
            data = data[byte_range.offset:]
        elif isinstance(byte_range, SuffixByteRequest):
            data = data[-byte_range.suffix:] if byte_range.suffix else b""
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.location.exists, key)

    def _refuse(self):
        raise KdcacheError(f"{self.location.url}: opened read-only; nothing is written here")

    async def set(self, key, value) -> None:
        self._refuse()

    async def set_if_not_exists(self, key, value) -> None:
        self._refuse()

    async def delete(self, key) -> None:
        self._refuse()

    async def list(self):
        for key in self.location.list(""):
            yield key

    async def list_prefix(self, prefix: str):
        for key in self.location.list(""):
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str):
        for name in self.location.children(prefix.rstrip("/")):
            yield name

    async def getsize(self, key: str) -> int:
        size = self.location.sizes("").get(key)
        if size is None:
            raise FileNotFoundError(key)
        return size
