"""Unit markers that prove their own integrity, and the root identity's hash.

A marker (units/<seed>/<block>.json) is what makes a unit count as done and what carries its shards'
CRC32C, so a reader must be able to tell a damaged or edited marker from a good one. A sealed marker
holds two fields besides its payload:

    "identity"  the root document's identity_sha256: the marker belongs to this cache, not to another
    "checksum"  CRC32C (8 hex digits) of the marker's canonical JSON without the "checksum" field
                (json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True), UTF-8)

The root zarr.json's attributes carry identity_sha256: SHA-256 of the attributes' canonical JSON without
that field. It is checked whenever a cache is opened, so an edited identity (k, recipe, teacher) is refused
instead of being trusted. Caches made before these fields existed (format 3 without identity_sha256) are
read with the older rule: every marker must be readable JSON that records each array's shard object.
"""

import hashlib
import json
from typing import Iterable, Optional

import google_crc32c  # zarr's own dependency (its crc32c codec)

from kdcache.errors import KdcacheError

IDENTITY_HASH = "identity_sha256"


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def identity_hash(attrs: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in attrs.items() if k != IDENTITY_HASH})).hexdigest()


def seal(payload: dict, identity: Optional[str]) -> bytes:
    """A marker's bytes: the payload with the cache's identity hash and its own checksum."""
    doc = {k: v for k, v in payload.items() if k != "checksum"}
    if identity is not None:
        doc["identity"] = identity
    doc["checksum"] = f"{google_crc32c.value(canonical(doc)):08x}"
    return json.dumps(doc).encode()


class DamagedMarker(KdcacheError):
    pass


def parse(data: Optional[bytes], where: str, *, identity: Optional[str], arrays: Iterable[str],
          need_objects: bool) -> dict:
    """A marker's payload, or DamagedMarker naming `where` (the marker's path), what is wrong and what to do.

    identity: the cache's identity hash (None for a cache made before markers were sealed, whose markers
    may lack the seal); need_objects: the cache's format records each array's shard object."""
    fix = (f"; the unit cannot be trusted: delete {where} and run the same dump-teacher (or copy) again "
           "to recompute it")

    def bad(why: str) -> DamagedMarker:
        return DamagedMarker(f"{where}: unit marker {why}{fix}")

    if data is None:
        raise bad("is missing")
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise bad(f"is not a JSON object ({type(doc).__name__})")
    if "checksum" in doc:
        body = {k: v for k, v in doc.items() if k != "checksum"}
        crc = f"{google_crc32c.value(canonical(body)):08x}"
        if crc != doc["checksum"]:
            raise bad(f"does not match its own checksum (content CRC32C {crc}, recorded {doc['checksum']!r}): "
                      "it was damaged or edited")
    elif identity is not None:
        raise bad("has no checksum, but every marker of this cache is sealed: it was damaged, edited, or "
                  "written by a kdcache older than 0.3")
    if identity is not None and doc.get("identity") != identity:
        raise bad(f"belongs to another cache (identity {str(doc.get('identity'))[:16]}, this cache's "
                  f"{identity[:16]})")
    if need_objects:
        objects = doc.get("objects")
        for name in arrays:
            rec = objects.get(name) if isinstance(objects, dict) else None
            if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and isinstance(rec.get("crc32c"), str)):
                raise bad(f"does not record the size and CRC32C of array {name!r}'s shard")
    return doc
