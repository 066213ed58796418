"""Where a cache lives: a local directory (also NFS), an fsspec URL (s3://bucket/prefix), or a root published
read-only over HTTP(S) (kdcache.cache.http).

Zarr reads and writes the arrays through its own store (LocalStore, FsspecStore); everything else kdcache
keeps beside them (completion markers, claims, logs) goes through a Location: whole-object reads and
writes, an exclusive create, listing and deletion. The exclusive create is the one primitive that makes
shared writing safe, so a store that cannot do it atomically is refused for writing:

- local / NFS: the object is written to a temporary name and hard-linked to its final name
  (kdcache.files.atomic_write(exclusive=True)); link(2) fails
  when the name exists (atomic on local file systems and on NFS v3+, the classic NFS lock-file method);
- S3 (and S3-compatible stores): a conditional PUT with `If-None-Match: *` (s3fs `mode="create"`).

Credentials and endpoints come the standard way: AWS_* environment variables (AWS_ENDPOINT_URL for an
S3-compatible server), ~/.aws, or fsspec's configuration (FSSPEC_S3_* variables, ~/.config/fsspec).
"""

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from kdcache.cache.http import HttpLocation
from kdcache.cache.place import DamagedObject, LocationBase, check_name, hidden as _hidden
from kdcache.errors import KdcacheError
from kdcache.files import atomic_write

__all__ = ["Location", "LocalLocation", "FsspecLocation", "HttpLocation", "DamagedObject", "check_name"]

# fsspec protocols whose PUT can be made conditional (see the module docstring)
EXCLUSIVE_CREATE_PROTOCOLS = ("s3", "s3a")


class Location(LocationBase):
    """A directory-like place addressed by '/'-separated keys relative to it (the interface:
    kdcache.cache.place.LocationBase).

    `Location.of(url)` picks the implementation: LocalLocation for a path (or file://), HttpLocation for an
    http:// or https:// URL (a root published with `kdcache publish`, read-only), FsspecLocation for any
    other URL."""

    @staticmethod
    def of(where: Union[str, Path, "Location"]) -> "Location":
        if isinstance(where, Location):
            return where
        text = str(where)
        if text.startswith(("http://", "https://")):
            return HttpLocation(text)
        if "://" in text and not text.startswith("file://"):
            return FsspecLocation(text)
        return LocalLocation(Path(text[len("file://"):] if text.startswith("file://") else text))


# HttpLocation builds on the same interface without importing this module (which chooses it): declared a
# Location here, so isinstance(), Location.of() and type checks treat it as one
Location.register(HttpLocation)


class LocalLocation(Location):
    is_local = True

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = str(self.path)

    def child(self, name: str) -> "LocalLocation":
        return LocalLocation(self.path / check_name(name))

    def zarr_store(self, read_only: bool):
        from zarr.storage import LocalStore
        return LocalStore(self.path, read_only=read_only)

    def _p(self, key: str) -> Path:
        return self.path.joinpath(*(check_name(k, "key part") for k in key.split("/"))) if key else self.path

    def _inside(self, path: Path) -> Path:
        """`path`, refused when a symbolic link inside the location leads it outside: what is read or written
        here is what belongs here (a published cache with a link to /etc/... is not followed)."""
        base = os.path.realpath(self.path)
        real = os.path.realpath(path)
        if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
            raise KdcacheError(f"{path}: a symbolic link leads it outside {self.path} (to {real}); kdcache reads "
                               "and writes only what is inside a cache")
        return path

    def read(self, key: str) -> bytes:
        return self._inside(self._p(key)).read_bytes()

    def _writable(self, key: str) -> Path:
        path = self._p(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return self._inside(path)

    def write(self, key: str, data: bytes) -> None:
        atomic_write(self._writable(key), data)

    def create(self, key: str, data: bytes) -> bool:
        try:
            atomic_write(self._writable(key), data, exclusive=True)
            return True
        except FileExistsError:
            return False

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def list(self, prefix: str = "") -> List[str]:
        base = self._p(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, self.path)
            for f in filenames:
                if os.path.islink(os.path.join(dirpath, f)):  # one leading outside is refused by name
                    self._inside(Path(dirpath) / f)
                if not _hidden(f):
                    out.append(f if rel == "." else f"{rel}/{f}")
        return sorted(out)

    def children(self, prefix: str = "") -> List[str]:
        base = self._p(prefix)
        return sorted(p.name for p in base.iterdir() if not _hidden(p.name)) if base.is_dir() else []

    def sizes(self, prefix: str = "") -> Dict[str, int]:
        return {k: (self.path / k).stat().st_size for k in self.list(prefix)}

    def stamps(self, prefix: str = "") -> Dict[str, tuple]:
        out = {}
        for k in self.list(prefix):
            st = (self.path / k).stat()
            out[k] = (st.st_size, st.st_mtime_ns)
        return out

    def sync(self, keys: Iterable[str]) -> None:
        # LocalStore renames its temporary file without fsync: a unit's shards must survive a power loss
        # before its marker says they exist
        for key in keys:
            fd = os.open(self._p(key), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class FsspecLocation(Location):
    is_local = False

    def __init__(self, url: str, fs=None):
        import fsspec
        self.url = url.rstrip("/")
        self.protocol, self.root = self.url.split("://", 1)
        try:
            # no listing cache: other processes add markers and claims while we run
            self.fs = fs or fsspec.filesystem(self.protocol, use_listings_cache=False, skip_instance_cache=True)
        except (ImportError, ValueError) as exc:
            raise KdcacheError(f"{url}: no fsspec file system for {self.protocol}:// ({exc})") from exc

    def child(self, name: str) -> "FsspecLocation":
        return FsspecLocation(f"{self.url}/{check_name(name)}", fs=self.fs)

    def zarr_store(self, read_only: bool):
        from zarr.storage import FsspecStore
        return FsspecStore.from_url(self.url, read_only=read_only, storage_options={"use_listings_cache": False})

    def _p(self, key: str) -> str:
        return f"{self.root}/{'/'.join(check_name(k, 'key part') for k in key.split('/'))}" if key else self.root

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._p(key))

    def read_many(self, keys: Iterable[str]) -> Dict[str, Optional[bytes]]:
        keys = list(keys)
        if not keys:
            return {}
        got = self.fs.cat([self._p(k) for k in keys], on_error="return")  # concurrent GETs
        out = {}
        for k in keys:
            v = got.get(self._p(k))
            out[k] = v if isinstance(v, bytes) else None
        return out

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)  # one PUT: the object is replaced whole or not at all

    @property
    def supports_exclusive_create(self) -> bool:
        return self.protocol in EXCLUSIVE_CREATE_PROTOCOLS

    def create(self, key: str, data: bytes) -> bool:
        if not self.supports_exclusive_create:
            raise KdcacheError(f"{self.url}: kdcache writes caches only where an object can be created "
                               f"exclusively (local or NFS paths, s3://); {self.protocol}:// is read-only for kdcache")
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")  # PUT with If-None-Match: *
            return True
        except FileExistsError:
            return False

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            pass

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._p(key))

    def list(self, prefix: str = "") -> List[str]:
        return sorted(self.sizes(prefix))

    def children(self, prefix: str = "") -> List[str]:
        try:
            entries = self.fs.ls(self._p(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if not _hidden(n))

    def sizes(self, prefix: str = "") -> Dict[str, int]:
        return {k: n for k, (n, _) in self.stamps(prefix).items()}

    def stamps(self, prefix: str = "") -> Dict[str, tuple]:
        base = self._p(prefix)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        n = len(self.root) + 1
        return {p[n:]: (int(info.get("size") or 0), _stamp(info)) for p, info in found.items()
                if not _hidden(p.rsplit("/", 1)[-1]) and info.get("type", "file") != "directory"}


def _stamp(info: dict) -> Optional[str]:
    # S3's ETag changes with the content (LastModified only to the second); other file systems: their mtime
    value = info.get("ETag") or info.get("LastModified") or info.get("mtime")
    return None if value is None else str(value)
