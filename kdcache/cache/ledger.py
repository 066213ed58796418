"""Completion markers and writer claims for work units (seed, block), kept beside the arrays.

    units/<seed>/<block>.json                 done: {"views", "correct", "run", "rank", "device", "amp",
                                              "host", "time", "objects": {array: {"key", "bytes", "crc32c"}}}
    claims/<seed>/<block>/<generation>.json   a writer's claim: {"run", "host", "pid", "time"}

Markers and claims are created with an exclusive create (kdcache.cache.location: link(2) locally, a
conditional PUT on S3): exactly one creator wins, and nobody sees a partial object. A marker is created
after its unit's shards are written and durable, and lists their sizes and CRC32C checksums; a unit
without a marker is not done, whatever its arrays hold.

A unit's current claim is its highest generation. Claiming creates generation g + 1 when generation g
is absent, released or stale, so of several processes taking over one stale claim exactly one wins (each
tries to create the same g + 1); a re-list after the create catches a taker that raced from an older
listing. The holder's heartbeat thread rewrites its claim every claim_ttl / 6 seconds; a claim is stale
when its heartbeat is older than claim_ttl (clocks of the hosts must agree to well within claim_ttl), or
at once when it was made on this host by a process that no longer exists. A holder that finds a higher
generation has lost the unit and does not write it.
"""

import json
import os
import socket
import threading
import time
from typing import Callable, Dict, Optional, Set, Tuple

from kdcache.cache.location import Location
from kdcache.cache.marker import parse, seal


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json(data: Optional[bytes]) -> Optional[dict]:
    try:
        return json.loads(data) if data else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


Unit = Tuple[int, int]


class Ledger:
    def __init__(self, location: Location, claim_ttl: float = 300.0, identity: Optional[str] = None,
                 clock: Callable[[], float] = time.time):
        self.loc = location
        self.identity = identity   # the cache's identity hash, sealed into every marker (kdcache.cache.marker)
        self.claim_ttl = claim_ttl
        self.clock = clock   # the time of claims and heartbeats, and the now that staleness is judged by
        self.host = socket.gethostname()
        self._held: Dict[Unit, Tuple[int, dict]] = {}   # unit -> (generation, payload)
        self.lost: Set[Unit] = set()
        self._lock = threading.Lock()
        self._beat: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # ---- keys ----------------------------------------------------------------------------------
    @staticmethod
    def marker_key(seed: int, block: int) -> str:
        return f"units/{seed:06d}/{block:06d}.json"

    @staticmethod
    def _claim_dir(seed: int, block: int) -> str:
        return f"claims/{seed:06d}/{block:06d}"

    # ---- completion ----------------------------------------------------------------------------
    def done_blocks(self, seed: int) -> Set[int]:
        return {int(n[:-5]) for n in self.loc.children(f"units/{seed:06d}") if n.endswith(".json")}

    def done_units(self) -> Dict[int, Set[int]]:
        """Every finished unit of the cache, from one listing: seed -> blocks."""
        out: Dict[int, Set[int]] = {}
        for key in self.loc.list("units"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2].endswith(".json"):
                out.setdefault(int(parts[1]), set()).add(int(parts[2][:-5]))
        return out

    def is_done(self, seed: int, block: int) -> bool:
        return self.loc.exists(self.marker_key(seed, block))

    def marker_bytes(self, seed: int) -> Dict[int, Optional[bytes]]:
        """The raw markers of a seed's finished units (checked by TeacherCache.markers, which knows the format)."""
        keys = {b: self.marker_key(seed, b) for b in sorted(self.done_blocks(seed))}
        got = self.loc.read_many(keys.values())
        return {b: got[k] for b, k in keys.items()}

    def markers(self, seed: int) -> Dict[int, dict]:
        """A seed's markers, each checked against its seal (DamagedMarker names a bad one)."""
        return {b: parse(data, f"{self.loc}/{self.marker_key(seed, b)}", identity=self.identity, arrays=(),
                         need_objects=False) for b, data in self.marker_bytes(seed).items()}

    def mark_done(self, seed: int, block: int, payload: dict) -> bool:
        """Record the unit as finished (its shards must be durable already). False if it already was."""
        payload = dict(payload, host=self.host, time=time.time())
        created = self.loc.create(self.marker_key(seed, block), seal(payload, self.identity))
        with self._lock:
            self._held.pop((seed, block), None)
        for key in self.loc.list(self._claim_dir(seed, block)):  # the marker supersedes every claim
            self.loc.delete(key)
        return created

    # ---- claims --------------------------------------------------------------------------------
    def _generations(self, seed: int, block: int) -> Dict[int, str]:
        out = {}
        for key in self.loc.list(self._claim_dir(seed, block)):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                out[int(name[:-5])] = key
        return out

    def _stale(self, claim: Optional[dict]) -> bool:
        if not claim:  # removed (released or finished) between the listing and the read, or unreadable
            return True
        if claim.get("host") == self.host and not _pid_alive(int(claim.get("pid", -1))):
            return True
        return self.clock() - float(claim.get("time", 0)) > self.claim_ttl

    def claim(self, seed: int, block: int, run: str) -> bool:
        """Take unit (seed, block) for this process. False if it is done or another live writer holds it."""
        if self.is_done(seed, block):
            return False
        gens = self._generations(seed, block)
        current = max(gens) if gens else -1
        if gens:
            held = _json(self.loc.read_many([gens[current]])[gens[current]])
            if held and held.get("run") == run and held.get("pid") == os.getpid():
                return True
            if not self._stale(held):
                return False
        mine = current + 1
        payload = {"run": run, "host": self.host, "pid": os.getpid(), "time": self.clock()}
        key = f"{self._claim_dir(seed, block)}/{mine:06d}.json"
        if not self.loc.create(key, json.dumps(payload).encode()):
            return False  # another taker created this generation first
        if self._superseded(seed, block, mine) or self.is_done(seed, block):
            # a taker working from an older listing got a higher generation, or the unit was finished
            # between our first check and our re-list (its marker removes every claim, ours included,
            # so the listing may be empty): never compute (and rewrite) it
            self.loc.delete(key)
            return False
        with self._lock:
            self._held[(seed, block)] = (mine, payload)
            self.lost.discard((seed, block))
        return True

    def holds(self, seed: int, block: int) -> bool:
        with self._lock:
            return (seed, block) in self._held

    def confirm(self, seed: int, block: int) -> bool:
        """Do we still hold the unit, by the store itself (not only by the heartbeat's last look)?
        Checked right before a unit is written."""
        with self._lock:
            held = self._held.get((seed, block))
        if held is None:
            return False
        if self._superseded(seed, block, held[0]) or self.is_done(seed, block):
            with self._lock:
                self._held.pop((seed, block), None)
                self.lost.add((seed, block))
            # Once popped, our heartbeat leaves the claim alone; an earlier beat may have rewritten it after
            # the unit's marker removed every claim, so remove it (looked up after the pop, not before).
            if self.is_done(seed, block):
                self.loc.delete(f"{self._claim_dir(seed, block)}/{held[0]:06d}.json")
            return False
        return True

    def _superseded(self, seed: int, block: int, gen: int) -> bool:
        """Our claim is gone (the unit was finished by its taker, who deletes the claims) or a higher
        generation exists (taken over)."""
        gens = self._generations(seed, block)
        return gen not in gens or max(gens) > gen

    def release(self, seed: int, block: int) -> None:
        with self._lock:
            held = self._held.pop((seed, block), None)
        if held is not None:  # deleting needs no space: release works on a full disk
            self.loc.delete(f"{self._claim_dir(seed, block)}/{held[0]:06d}.json")

    def release_all(self) -> None:
        with self._lock:
            units = list(self._held)
        for seed, block in units:
            try:
                self.release(seed, block)
            except OSError:
                pass  # best effort while failing: the claim goes stale after claim_ttl anyway

    def live_claims(self) -> Dict[Unit, dict]:
        """Units some writer is working on now (for `kdcache ls`)."""
        units: Dict[Unit, Dict[int, str]] = {}
        for key in self.loc.list("claims"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3].endswith(".json") and parts[3][:-5].isdigit():
                units.setdefault((int(parts[1]), int(parts[2])), {})[int(parts[3][:-5])] = key
        out = {}
        for unit, gens in units.items():
            claim = _json(self.loc.read_many([gens[max(gens)]])[gens[max(gens)]])
            if not self._stale(claim):
                out[unit] = claim
        return out

    # ---- heartbeat -----------------------------------------------------------------------------
    @property
    def heartbeat_interval(self) -> float:
        return max(0.2, min(60.0, self.claim_ttl / 6))

    def start_heartbeat(self) -> None:
        if self._beat is None:
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="kdcache-heartbeat")
            self._beat.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            self.beat()

    def beat(self) -> None:
        """One heartbeat: rewrite every held claim with the clock's time, and drop (into `lost`) the units
        taken over meanwhile. The heartbeat thread calls it every heartbeat_interval; tests call it directly."""
        with self._lock:
            held = dict(self._held)
        for (seed, block), (gen, payload) in held.items():
            try:
                if self._superseded(seed, block, gen):  # taken over (our heartbeat lapsed): not ours to write
                    with self._lock:
                        if self._held.pop((seed, block), None) is not None:  # not finished by us meanwhile
                            self.lost.add((seed, block))
                    continue
                with self._lock:
                    if (seed, block) in self._held:  # not released or finished meanwhile
                        self.loc.write(f"{self._claim_dir(seed, block)}/{gen:06d}.json",
                                       json.dumps(dict(payload, time=self.clock())).encode())
            except OSError:
                pass  # a full disk or a network error: retried at the next beat
