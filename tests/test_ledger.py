"""The unit ledger of a cache: claims, completion markers, takeover of stale claims."""

import json
import os
import subprocess
import sys

from kdcache.cache.ledger import Ledger


def test_claim_is_exclusive_and_a_finished_unit_is_never_claimed_again(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.claim(0, 3, "run-a")
    assert ledger.claim(0, 3, "run-a"), "the holder may claim its own unit again"
    assert not ledger.is_done(0, 3)
    ledger.mark_done(0, 3, {"views": 10})
    assert ledger.is_done(0, 3) and ledger.done_blocks(0) == {3}
    assert not (tmp_path / "claims" / "000000" / "000003.json").exists(), "marking done removes the claim"
    # The race the dump loop has: a unit checked as not done, then finished elsewhere before our claim.
    assert not ledger.claim(0, 3, "run-b")
    assert not (tmp_path / "claims" / "000000" / "000003.json").exists(), "a refused claim leaves nothing"
    assert ledger.markers(0)[3]["views"] == 10


def test_live_claims_are_respected_and_dead_ones_taken_over(tmp_path):
    ledger = Ledger(tmp_path)
    claim = tmp_path / "claims" / "000001" / "000000.json"
    claim.parent.mkdir(parents=True)
    # Held by a live process of this host (our parent): refused.
    claim.write_text(json.dumps({"run": "other", "host": ledger.host, "pid": os.getppid(), "time": 1e18}))
    assert not ledger.claim(1, 0, "mine")
    # Held by a process that has exited: taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim.write_text(json.dumps({"run": "other", "host": ledger.host, "pid": int(dead.stdout), "time": 1e18}))
    assert ledger.claim(1, 0, "mine")
    assert json.loads(claim.read_text())["run"] == "mine"
    # Held elsewhere but older than the TTL: taken over too.
    claim.write_text(json.dumps({"run": "old", "host": "elsewhere", "pid": 1, "time": 0.0}))
    assert ledger.claim(1, 0, "mine-again")
    ledger.release(1, 0)
    assert not claim.exists()
