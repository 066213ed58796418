"""Cache roots published read-only over HTTP(S): any static web server or public bucket serves them.

Plain HTTP cannot list a directory, so a published root carries an index, ROOT/kdcache-index.json, written
by `kdcache publish` (kdcache.cache.publish):

    {"format": "kdcache-published-root", "version": 1, "generation": G, "published": "2026-...+00:00",
     "caches": ["<id>", ...], "objects": {"<id>/zarr.json": [bytes, "crc32c", stamp], ...}}

An HttpLocation answers exists / list / children / sizes from that index, and reads an object with a GET of
ROOT/<key>, refusing it unless its size and CRC32C are those the index records: a damaged object is named
(DamagedObject), never returned. Only what the index lists exists for a reader, so a root still being
dumped into reads as the snapshot that was published (finished units only).

- Finding the root: the index is looked for at the URL itself, then at each parent, so the URL of a cache
  (ROOT/<id>, or an added teacher's ROOT/<id>/teachers/<label>) works as well as the root's.
- One generation per reader: the index is read once, when the location is made (child locations share it).
  When an object no longer matches, the index is read again: a newer generation means the root was
  republished under the reader, and a RootChanged error says so, instead of mixing two versions.
- Interrupted downloads resume: a dropped connection is retried (RETRIES) from the byte it stopped at,
  with `Range: bytes=N-`; a server that ignores Range (200 instead of 206) sends the whole object again.
- The read-through copy: with KDCACHE_HTTP_CACHE=DIR, verified objects are kept under DIR/<host>/<path>;
  a later reader (another student) takes them from there, checked against its index again, without a GET.
  A download in progress is kept as DIR/<host>/<path>.partial and resumed by the next reader (also one in
  another process: the .partial is locked while it is written).
- Never writes: write, create and delete raise KdcacheError (a published root is read-only).
"""

import bisect
import functools
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import google_crc32c  # zarr's own dependency (its crc32c codec)

from kdcache.cache.place import DamagedObject, LocationBase, ReadOnlyStore, check_name
from kdcache.errors import KdcacheError

INDEX = "kdcache-index.json"
INDEX_FORMAT = "kdcache-published-root"
INDEX_VERSION = 1
CACHE_ENV = "KDCACHE_HTTP_CACHE"   # the read-through copy's folder
RETRIES = 3                        # tries per object before a download is given up (it resumes next time)
TIMEOUT_S = 60.0                   # per connection attempt and per read from the socket
THREADS = 16                       # GETs at once in read_many (a slab's shard objects)
CHUNK = 1 << 20


class RootChanged(KdcacheError):
    """The published root was republished (another generation) while this reader used it."""


class PublishedIndex:
    """One generation of a root's index, as read."""

    def __init__(self, url: str, generation: int, published: str, objects: Dict[str, Tuple[int, str]]):
        self.url = url                  # where it was read
        self.generation = generation
        self.published = published      # when (ISO 8601, as the publisher wrote it)
        self.objects = objects          # key under the root -> (bytes, CRC32C as 8 hex digits)
        self.keys = sorted(objects)     # for prefix queries

    def names_in(self, folder: str) -> Set[str]:
        """The names directly in folder ('' = the root): objects and folders. A folder's keys are contiguous in
        sorted order, so each sub-folder costs one bisection to skip (a root of 1,000 seeds: 1,000 steps)."""
        start = folder + "/" if folder else ""
        i = bisect.bisect_left(self.keys, start)
        out: Set[str] = set()
        while i < len(self.keys) and self.keys[i].startswith(start):
            name, sep, _ = self.keys[i][len(start):].partition("/")
            out.add(name)
            # past every key of the sub-folder: '0' follows '/' in code-point order
            i = bisect.bisect_left(self.keys, start + name + "0", i + 1) if sep else i + 1
        return out

    def under(self, folder: str) -> List[str]:
        """Keys inside folder ('' = all), sorted."""
        if not folder:
            return list(self.keys)
        i = bisect.bisect_left(self.keys, folder + "/")
        j = bisect.bisect_left(self.keys, folder + "0")   # '0' follows '/' in code-point order
        return self.keys[i:j]

    def describe(self) -> str:
        return f"generation {self.generation}, published {self.published}"


# a key: '/'-separated parts, none empty, '.' or '..', none holding a backslash or NUL (check_name, as a pattern: an
# index lists one key per object, 200,000 for a root of 1,000 ImageNet seeds)
_PART = r"(?!\.\.?(?:/|$))[^/\\\x00]+"
_PLAIN_KEY = re.compile(f"{_PART}(?:/{_PART})*")
_CRC = re.compile("[0-9a-f]{8}")


def parse_index(data: bytes, where: str) -> PublishedIndex:
    """The index's content checked: it comes from a server, so it is untrusted input (a key that would lead
    outside the root, a record that is not a size and a checksum, a format this kdcache does not read)."""
    def bad(why: str) -> KdcacheError:
        return KdcacheError(f"{where}: {why}; the published index cannot be used (its publisher can write it "
                            "again with kdcache publish)")
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise bad(f"is not a {INDEX_FORMAT} index")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"has no valid version ({version!r})")
    if version > INDEX_VERSION:
        raise bad(f"is version {version}, newer than this kdcache reads ({INDEX_VERSION}): use a newer kdcache")
    generation, objects = doc.get("generation"), doc.get("objects")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise bad(f"has no valid generation ({generation!r})")
    if not isinstance(objects, dict):
        raise bad("has no objects table")
    out = {}
    for key, rec in objects.items():
        if not (type(key) is str and _PLAIN_KEY.fullmatch(key)):
            raise bad(f"lists the key {str(key)[:100]!r}, which is not a plain path inside the root")
        if not (type(rec) is list and len(rec) >= 2 and type(rec[0]) is int and rec[0] >= 0 and type(rec[1]) is str
                and _CRC.fullmatch(rec[1])):
            raise bad(f"records {key!r} as {str(rec)[:60]}, not [bytes, crc32c]")
        out[key] = (rec[0], rec[1])
    return PublishedIndex(where, generation, str(doc.get("published", "?")), out)


def record_of(data: bytes) -> Tuple[int, str]:
    return len(data), f"{google_crc32c.value(data):08x}"


def mismatch(data: bytes, rec: Tuple[int, str]) -> Optional[str]:
    """Why `data` is not the object the index records, or None."""
    if len(data) != rec[0]:
        return f"{len(data)} bytes, the published index records {rec[0]}"
    crc = f"{google_crc32c.value(data):08x}"
    return None if crc == rec[1] else f"CRC32C {crc}, the published index records {rec[1]}"


class _Interrupted(Exception):
    """A download that stopped early (a dropped connection, a timeout, a 5xx): retried from where it stopped."""


def _urlopen(url: str, headers: Dict[str, str]):
    import urllib.request   # (loads ssl, http.client: only where a published root is read)
    from kdcache import __version__
    request = urllib.request.Request(url, headers={"User-Agent": f"kdcache/{__version__}", **headers})
    return urllib.request.urlopen(request, timeout=TIMEOUT_S)


def _get_small(url: str, headers: Dict[str, str]) -> Optional[bytes]:
    """A whole small document (the index), or None where the server has none (404, 410; 403 as a public
    bucket answers for a missing key)."""
    import urllib.error
    for attempt in range(RETRIES):
        try:
            with _urlopen(url, headers) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404, 410):
                return None
            if exc.code < 500 and exc.code != 429 or attempt == RETRIES - 1:
                raise KdcacheError(f"{url}: the server answers HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            if attempt == RETRIES - 1:
                raise KdcacheError(f"{url}: cannot read it ({getattr(exc, 'reason', exc)})") from None
        time.sleep(0.25 * 2 ** attempt)   # a transient failure (5xx, 429, a dropped connection): try again
    return None


def find_root(url: str) -> Tuple[str, str, PublishedIndex]:
    """(the root's URL, the path of `url` under it, its index): the index is looked for at `url`, then at each
    parent (a cache's URL is ROOT/<id>, an added teacher's ROOT/<id>/teachers/<label>)."""
    scheme, netloc, path, query, fragment = urlsplit(url)
    if query or fragment:
        raise KdcacheError(f"{url}: a published root's URL has no query string or fragment")
    parts = [p for p in path.split("/") if p]
    if any(unquote(p) in (".", "..") for p in parts):
        raise KdcacheError(f"{url}: '.' and '..' are not allowed in a published root's URL")
    looked = []
    for n in range(len(parts), -1, -1):
        base = urlunsplit((scheme, netloc, "/" + "/".join(parts[:n]), "", "")).rstrip("/")
        looked.append(f"{base}/{INDEX}")
        data = _get_small(looked[-1], {"Cache-Control": "no-cache"})   # never a stale copy from a proxy
        if data is not None:
            prefix = "/".join(check_name(unquote(p), "URL part") for p in parts[n:])
            return base, prefix, parse_index(data, looked[-1])
    raise KdcacheError(f"{url}: no {INDEX} here or above it (looked at {', '.join(looked)}): an http(s) cache root "
                       "is read through the index that `kdcache publish ROOT` writes; publish the root first")


class PublishedRoot:
    """A published root as one reader sees it: the one index generation it opened, its GETs, and the
    read-through copy (shared by an HttpLocation and its children)."""

    def __init__(self, url: str, index: PublishedIndex, copy_dir: Optional[Path]):
        self.url = url
        self.index = index
        self.copy_dir = copy_dir
        self._key_locks: Dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def object_url(self, key: str) -> str:
        return f"{self.url}/{quote(key)}"

    def fetch(self, key: str) -> bytes:
        """The object `key` (under the root), checked against the index; FileNotFoundError where the index does
        not list it (then it is not part of what was published, whatever the server holds)."""
        rec = self.index.objects.get(key)
        if rec is None:
            raise FileNotFoundError(f"{self.url}/{key}")
        if self.copy_dir is None:
            return self._download(key, rec, None)
        with self._key_lock(key):   # this process's threads; other processes: the .partial's lock
            return self._through_copy(key, rec)

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def copy_path(self, key: str) -> Path:
        parts = urlsplit(self.url)
        host = check_name(parts.netloc.rsplit("@", 1)[-1].replace(":", "_"), "host")
        folders = [check_name(unquote(p), "URL part") for p in parts.path.split("/") if p]
        return self.copy_dir.joinpath(host, *folders, *key.split("/"))

    def _through_copy(self, key: str, rec: Tuple[int, str]) -> bytes:
        import fcntl
        path = self.copy_path(key)
        while True:
            data = _read_if_valid(path, rec)
            if data is not None:
                return data
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)   # another process downloading the same object: wait for it
                if not _same_file(partial, fd):
                    continue   # it finished meanwhile (its .partial is now the object): check that one
                data = self._download(key, rec, fd, partial)
                os.replace(partial, path)        # under the lock: a waiter then finds the object
                return data
            finally:
                os.close(fd)

    def _download(self, key: str, rec: Tuple[int, str], fd: Optional[int], partial: Optional[Path] = None) -> bytes:
        sink = _Sink(fd)
        for attempt in (0, 1):
            resumed = sink.size() > 0
            self._get_all(key, rec[0], sink, partial)
            data = sink.value()
            why = mismatch(data, rec)
            if why is None:
                return data
            if not (resumed and attempt == 0):
                break
            sink.reset()   # resumed from a .partial that may hold another version's bytes: once more, whole
        raise self.refusal(key, why)

    def _get_all(self, key: str, size: int, sink: "_Sink", partial: Optional[Path]) -> None:
        """GETs until the sink holds `size` bytes (an empty object needs none): each interrupted GET is retried
        from where it stopped, up to RETRIES times."""
        url = self.object_url(key)
        if sink.size() > size:
            sink.reset()
        tries = 0
        while sink.size() < size:
            try:
                _get_range(url, sink, size)
            except FileNotFoundError:
                raise self.refusal(key, "missing on the server (HTTP 404), though the published index lists it") from None
            except _Interrupted as exc:
                tries += 1
                if tries >= RETRIES:
                    kept = (f"; the {sink.size()} bytes so far are kept in {partial}: the same command resumes from "
                            "there" if partial else "")
                    raise KdcacheError(f"{url}: the download stopped after {sink.size()} of {size} bytes, {tries} "
                                       f"times ({exc}){kept}") from None
                time.sleep(0.25 * 2 ** (tries - 1))   # a dropped connection or a busy server: resume shortly

    def refusal(self, key: str, why: str) -> KdcacheError:
        """The error for an object that does not match the index: RootChanged when the root was republished
        since this reader opened it (the index's generation differs), else DamagedObject."""
        url = self.object_url(key)
        now = find_root(self.url)[2]
        if now.generation != self.index.generation:
            return RootChanged(f"{self.url}: the published root changed while this reader used it: published "
                               f"{now.describe()}, this reader opened generation {self.index.generation} (published "
                               f"{self.index.published}); {url} is now {why}. Nothing of the two versions is mixed: "
                               f"run the command again to read generation {now.generation}")
        return DamagedObject(f"{url}: {why} ({self.index.url}, {self.index.describe()}): the object on the server is "
                             "damaged and is not used; its publisher can restore it from the source and run kdcache "
                             "publish again", why={key: f"{url}: {why}"})


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_if_valid(path: Path, rec: Tuple[int, str]) -> Optional[bytes]:
    """The read-through copy's object when it is the one the index records (else None: fetch it again)."""
    try:
        if path.stat().st_size != rec[0]:
            return None
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data if mismatch(data, rec) is None else None


class _Sink:
    """Where a download goes: memory, or the read-through copy's .partial file (kept when interrupted)."""

    def __init__(self, fd: Optional[int]):
        self.fd = fd
        self.buf = bytearray()

    def size(self) -> int:
        return len(self.buf) if self.fd is None else os.fstat(self.fd).st_size

    def reset(self) -> None:
        self.buf.clear()
        if self.fd is not None:
            os.ftruncate(self.fd, 0)

    def append(self, data: bytes) -> None:
        if self.fd is None:
            self.buf += data
            return
        os.lseek(self.fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def value(self) -> bytes:
        if self.fd is None:
            return bytes(self.buf)
        os.lseek(self.fd, 0, os.SEEK_SET)
        out = bytearray()
        while chunk := os.read(self.fd, CHUNK * 8):
            out += chunk
        return bytes(out)


def _get_range(url: str, sink: _Sink, size: int) -> None:
    """One GET of the rest of the object into `sink`: `Range: bytes=N-` when N bytes are there already. A
    server that ignores Range (200) sends the whole object: the sink starts over. Raises _Interrupted when
    the body stops early, FileNotFoundError on 404/410 (403: a public bucket's answer for a missing key)."""
    import http.client
    import urllib.error
    start = sink.size()
    try:
        response = _urlopen(url, {"Range": f"bytes={start}-"} if start else {})
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404, 410):
            raise FileNotFoundError(url) from None
        if exc.code == 416:          # the server's object is shorter than the bytes kept: start over
            sink.reset()
            raise _Interrupted("HTTP 416: the kept bytes are not a prefix of the object") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Interrupted(f"HTTP {exc.code} {exc.reason}") from None
        raise KdcacheError(f"{url}: the server answers HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Interrupted(str(getattr(exc, "reason", exc))) from None
    with response:
        if start and (response.status != 206 or not _range_starts_at(response, start)):
            sink.reset()             # Range ignored (200): the whole object follows
        try:
            while sink.size() <= size and (chunk := response.read(CHUNK)):
                sink.append(chunk)
        except (http.client.HTTPException, OSError) as exc:
            raise _Interrupted(f"{type(exc).__name__}: {exc}") from None
    if sink.size() < size:           # http.client returns a short body without an error when the peer closes
        raise _Interrupted(f"the connection closed after {sink.size()} of {size} bytes")


def _range_starts_at(response, start: int) -> bool:
    content_range = response.headers.get("Content-Range", "")   # "bytes 100-199/200"
    return content_range.startswith(f"bytes {start}-")


def _copy_dir(given) -> Optional[Path]:
    where = given if given is not None else os.environ.get(CACHE_ENV)
    return Path(where).expanduser() if where else None


class HttpLocation(LocationBase):
    """A place under a root published over HTTP(S), read-only (the module docstring). Made by
    kdcache.cache.location.Location.of for http:// and https:// URLs; `copy_dir`: the read-through copy's
    folder (default: $KDCACHE_HTTP_CACHE, none when unset)."""

    is_local = False

    def __init__(self, url: str, copy_dir=None, _root: Optional[PublishedRoot] = None, _prefix: str = ""):
        self.url = url.rstrip("/")
        if _root is None:
            base, _prefix, index = find_root(self.url)
            _root = PublishedRoot(base, index, _copy_dir(copy_dir))
        self.root, self.prefix = _root, _prefix

    @property
    def generation(self) -> int:
        return self.root.index.generation

    @property
    def supports_exclusive_create(self) -> bool:
        return False

    def _full(self, key: str) -> str:
        if key:
            for part in key.split("/"):
                check_name(part, "key part")
        return "/".join(p for p in (self.prefix, key) if p)

    def child(self, name: str) -> "HttpLocation":
        return HttpLocation(f"{self.url}/{quote(check_name(name))}", _root=self.root, _prefix=self._full(name))

    def zarr_store(self, read_only: bool):
        if not read_only:
            self._read_only("zarr.json")
        return ReadOnlyStore(self)

    def read(self, key: str) -> bytes:
        return self.root.fetch(self._full(key))

    def read_many(self, keys: Iterable[str]) -> Dict[str, Optional[bytes]]:
        """Concurrent GETs; None for a key the index does not list. Damaged objects are all read, then raised
        together (DamagedObject: .why names each, .got holds the rest), so a checker can name every unit."""
        keys = list(dict.fromkeys(keys))
        out: Dict[str, Optional[bytes]] = {}
        damaged: Dict[str, str] = {}
        messages: List[str] = []

        def one(key):
            try:
                out[key] = self.read(key)
            except FileNotFoundError:
                out[key] = None
            except DamagedObject as exc:
                damaged[key] = next(iter(exc.why.values()), str(exc))
                messages.append(str(exc))
        if len(keys) <= 1:
            for key in keys:
                one(key)
        else:
            with ThreadPoolExecutor(min(THREADS, len(keys))) as pool:
                list(pool.map(one, keys))   # (a RootChanged or another error is raised here)
        if damaged:
            more = f" (and {len(damaged) - 1} more damaged objects)" if len(damaged) > 1 else ""
            raise DamagedObject(sorted(messages)[0] + more, why=damaged, got=out)
        return out

    def _read_only(self, key: str):
        raise KdcacheError(f"{self.url}/{key}: a published root is read-only (readers over HTTP never write; "
                           "its publisher writes the root where it is stored and runs kdcache publish again)")

    def write(self, key: str, data: bytes) -> None:
        self._read_only(key)

    def create(self, key: str, data: bytes) -> bool:
        self._read_only(key)

    def delete(self, key: str) -> None:
        self._read_only(key)

    def exists(self, key: str) -> bool:
        full = self._full(key)
        if full in self.root.index.objects:
            return True
        folder, _, name = full.rpartition("/")
        return not full or name in self.root.index.names_in(folder)

    def list(self, prefix: str = "") -> List[str]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        return [k[cut:] for k in self.root.index.under(self._full(prefix))]

    def children(self, prefix: str = "") -> List[str]:
        return sorted(self.root.index.names_in(self._full(prefix)))

    def sizes(self, prefix: str = "") -> Dict[str, int]:
        return {k: n for k, (n, _) in self.stamps(prefix).items()}

    def stamps(self, prefix: str = "") -> Dict[str, tuple]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        objects = self.root.index.objects
        return {k[cut:]: objects[k] for k in self.root.index.under(self._full(prefix))}
