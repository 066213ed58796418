"""Completion markers and writer claims for work units (seed, block), as files created atomically.

A file is written under a temporary name and hard-linked to its final name: os.link fails if the
name exists, so exactly one creator wins and nobody ever sees a partial file (LocalStore's
set_if_not_exists does the same). Markers are created after a unit's data is written; a unit without
a marker is not done, whatever its arrays hold.

    CACHE/units/<seed>/<block>.json    done: {"views", "correct", "run", "rank", "device", "amp", "host", "time"}
    CACHE/claims/<seed>/<block>.json   in progress: {"run", "host", "pid", "time"}
"""

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Dict, Set


def atomic_create(path: Path, payload: dict) -> bool:
    """Create `path` holding `payload` unless it exists. True if this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger:
    def __init__(self, root: Path, claim_ttl: float = 3600.0):
        self.root = Path(root)
        self.claim_ttl = claim_ttl
        self.host = socket.gethostname()

    def _marker(self, seed: int, block: int) -> Path:
        return self.root / "units" / f"{seed:06d}" / f"{block:06d}.json"

    def _claim(self, seed: int, block: int) -> Path:
        return self.root / "claims" / f"{seed:06d}" / f"{block:06d}.json"

    def done_blocks(self, seed: int) -> Set[int]:
        d = self.root / "units" / f"{seed:06d}"
        return {int(p.stem) for p in d.glob("*.json")} if d.is_dir() else set()

    def is_done(self, seed: int, block: int) -> bool:
        return self._marker(seed, block).exists()

    def markers(self, seed: int) -> Dict[int, dict]:
        d = self.root / "units" / f"{seed:06d}"
        return {int(p.stem): json.loads(p.read_text()) for p in d.glob("*.json")} if d.is_dir() else {}

    def mark_done(self, seed: int, block: int, payload: dict) -> None:
        payload = dict(payload, host=self.host, time=time.time())
        atomic_create(self._marker(seed, block), payload)
        self._claim(seed, block).unlink(missing_ok=True)

    def _stale(self, claim: dict) -> bool:
        if claim.get("host") == self.host and not _pid_alive(int(claim.get("pid", -1))):
            return True
        return time.time() - float(claim.get("time", 0)) > self.claim_ttl

    def claim(self, seed: int, block: int, run: str) -> bool:
        """Take unit (seed, block) for this process. False if it is done or another live writer holds it.
        A stale claim (its process is gone, or older than claim_ttl) is taken over."""
        if not self._acquire(seed, block, run):
            return False
        # The unit may have been finished (marker created, claim removed) between a caller's check and
        # our claim: never compute and rewrite a finished unit.
        if self.is_done(seed, block):
            self.release(seed, block)
            return False
        return True

    def _acquire(self, seed: int, block: int, run: str) -> bool:
        path = self._claim(seed, block)
        payload = {"run": run, "host": self.host, "pid": os.getpid(), "time": time.time()}
        if atomic_create(path, payload):
            return True
        try:
            held = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            held = {}
        if held.get("run") == run and held.get("pid") == os.getpid():
            return True
        if held and not self._stale(held):
            return False
        # Take over: move the stale claim aside (rename is atomic; one taker wins), then create ours.
        try:
            os.rename(path, path.with_name(f".{path.name}.{uuid.uuid4().hex}.stale"))
        except FileNotFoundError:
            pass
        return atomic_create(path, payload)

    def release(self, seed: int, block: int) -> None:
        self._claim(seed, block).unlink(missing_ok=True)
