"""The unit ledger of a cache: claims, completion markers, takeover of stale claims, heartbeats."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

from kdcache.cache.ledger import Ledger
from kdcache.cache.location import Location


def _ledger(path, ttl=300.0) -> Ledger:
    return Ledger(Location.of(path), claim_ttl=ttl)


def _claims(path, seed, block):
    d = path / "claims" / f"{seed:06d}" / f"{block:06d}"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_claim_is_exclusive_and_a_finished_unit_is_never_claimed_again(tmp_path):
    ledger = _ledger(tmp_path)
    assert ledger.claim(0, 3, "run-a")
    assert ledger.claim(0, 3, "run-a"), "the holder may claim its own unit again"
    assert not _ledger(tmp_path).claim(0, 3, "run-b"), "a live claim of this host's live process is respected"
    assert not ledger.is_done(0, 3)
    assert ledger.mark_done(0, 3, {"views": 10})
    assert ledger.is_done(0, 3) and ledger.done_blocks(0) == {3} and ledger.done_units() == {0: {3}}
    assert _claims(tmp_path, 0, 3) == [], "marking done removes the claims"
    # The race the dump loop has: a unit checked as not done, then finished elsewhere before our claim.
    assert not ledger.claim(0, 3, "run-b")
    assert _claims(tmp_path, 0, 3) == [], "a refused claim leaves nothing"
    assert ledger.markers(0)[3]["views"] == 10
    assert not ledger.mark_done(0, 3, {"views": 99}), "a marker is created once"
    assert ledger.markers(0)[3]["views"] == 10


def _write_claim(path, seed, block, gen, payload):
    p = path / "claims" / f"{seed:06d}" / f"{block:06d}" / f"{gen:06d}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload))


def test_live_claims_are_respected_and_dead_or_stale_ones_taken_over(tmp_path):
    ledger = _ledger(tmp_path)
    # Held by a live process of this host (our parent): refused.
    _write_claim(tmp_path, 1, 0, 0, {"run": "other", "host": ledger.host, "pid": os.getppid(), "time": time.time()})
    assert not ledger.claim(1, 0, "mine")
    # Held by a process that has exited: taken over with the next generation.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_claim(tmp_path, 1, 0, 0, {"run": "other", "host": ledger.host, "pid": int(dead.stdout), "time": time.time()})
    assert ledger.claim(1, 0, "mine") and ledger.holds(1, 0)
    assert _claims(tmp_path, 1, 0) == ["000000.json", "000001.json"]
    ledger.release(1, 0)
    assert not ledger.holds(1, 0) and _claims(tmp_path, 1, 0) == ["000000.json"]
    # Held on another host, heartbeat older than the TTL: taken over too; a fresh heartbeat is respected.
    _write_claim(tmp_path, 2, 0, 4, {"run": "old", "host": "elsewhere", "pid": 1, "time": time.time() - 301})
    assert ledger.claim(2, 0, "mine") and "000005.json" in _claims(tmp_path, 2, 0)
    _write_claim(tmp_path, 3, 0, 0, {"run": "busy", "host": "elsewhere", "pid": 1, "time": time.time() - 10})
    assert not ledger.claim(3, 0, "mine")


def _race_takeover(path, barrier, results):
    ledger = _ledger(path)
    barrier.wait()                         # all six look at the stale claim together
    results.put(ledger.claim(7, 0, f"taker-{os.getpid()}"))
    barrier.wait()                         # the winner's pid stays alive until every taker has looked: a
                                           # winner that exited would be a dead holder, rightly taken over


def test_exactly_one_of_many_takers_wins_a_stale_claim(tmp_path):
    """The defect: a takeover that moved the stale claim aside let two takers both win."""
    ctx = mp.get_context("fork")
    for trial in range(5):
        path = tmp_path / f"t{trial}"
        _write_claim(path, 7, 0, 0, {"run": "dead", "host": "elsewhere", "pid": 1, "time": 0.0})
        barrier, results = ctx.Barrier(6, timeout=60), ctx.Queue()
        procs = [ctx.Process(target=_race_takeover, args=(path, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        wins = sum(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * 6, "a taker failed or timed out at a barrier"
        assert wins == 1, f"trial {trial}: {wins} takers won"
        assert _claims(path, 7, 0) == ["000000.json", "000001.json"], "one generation above the stale one"


class _Clock:
    """Time that moves only when the test says so."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_a_heartbeat_keeps_a_long_unit_and_its_loss_is_noticed(tmp_path):
    """The defect: without a heartbeat, a live writer whose unit takes longer than the TTL was taken over.
    The clock is the test's and each beat is one call, so staleness is decided here, not by the scheduler."""
    clock = _Clock()
    holder = Ledger(Location.of(tmp_path), claim_ttl=10.0, clock=clock)
    other = Ledger(Location.of(tmp_path), claim_ttl=10.0, clock=clock)
    other.host = "another-host"  # so only the heartbeat, not a pid check, says the holder is alive
    assert holder.claim(0, 0, "holder")
    for _ in range(3):  # 3 x 6 s: the unit takes longer than the TTL, each beat within it
        clock.now += 6.0
        holder.beat()
    clock.now += 6.0
    assert not other.claim(0, 0, "other"), "a claim with a live heartbeat is not stale"
    assert other.live_claims().keys() == {(0, 0)}
    assert holder.holds(0, 0) and not holder.lost
    clock.now += 4.1  # the heartbeat stopped: 10.1 s after the last beat the claim is stale
    assert other.live_claims() == {}
    assert other.claim(0, 0, "other")
    assert _claims(tmp_path, 0, 0) == ["000000.json", "000001.json"]
    holder.beat()  # the old holder's next beat finds the higher generation
    assert not holder.holds(0, 0) and (0, 0) in holder.lost, "the old holder notices it lost the unit"
    assert json.loads((tmp_path / "claims/000000/000000/000000.json").read_text())["time"] == 1_000_018.0, \
        "the lost claim is not rewritten"


def test_the_heartbeat_thread_beats_until_stopped(tmp_path, monkeypatch):
    ledger = _ledger(tmp_path, ttl=1.0)   # a beat every 0.2 s (the shortest interval)
    beaten = threading.Event()
    monkeypatch.setattr(ledger, "beat", beaten.set)
    ledger.start_heartbeat()
    thread = ledger._beat
    try:
        assert beaten.wait(timeout=30), "the heartbeat thread did not beat"
    finally:
        ledger.stop_heartbeat()
    assert not thread.is_alive() and ledger._beat is None, "stopping the heartbeat ends its thread"


def test_a_unit_finished_by_a_taker_right_after_our_claim_is_refused_not_a_crash(tmp_path):
    """The defect (CI, test_a_stopped_writer_is_taken_over_once_its_heartbeat_stops): a writer stopped
    between creating its claim and re-listing the claims resumed after a taker had finished the unit,
    which deletes every claim; the re-list was empty and max() raised, killing the dump."""
    ledger, taker = _ledger(tmp_path), _ledger(tmp_path)
    create = ledger.loc.create

    def create_then_finished_elsewhere(key, data):
        made = create(key, data)
        if key.startswith("claims/"):
            taker.mark_done(0, 5, {"views": 10})  # the taker finishes the unit and removes every claim
        return made

    ledger.loc.create = create_then_finished_elsewhere
    assert not ledger.claim(0, 5, "stopped-writer")
    assert not ledger.holds(0, 5) and (0, 5) not in ledger._held
    assert _claims(tmp_path, 0, 5) == [], "nothing of the refused claim is left"
    assert ledger.markers(0)[5]["views"] == 10


def test_a_claim_rewritten_by_a_late_heartbeat_after_the_unit_was_finished_is_removed(tmp_path):
    """Found reading the code beside the defect above: a heartbeat that checked its claim just before a
    taker finished the unit (removing every claim) rewrites the claim afterwards. The holder's check before
    writing notices the marker and must remove that claim too, or `kdcache ls` shows a live writer on a
    finished unit and the claim outlives the run."""
    holder, taker = _ledger(tmp_path), _ledger(tmp_path)
    assert holder.claim(0, 6, "holder")
    gen, payload = holder._held[(0, 6)]
    assert taker.mark_done(0, 6, {"views": 10}) and _claims(tmp_path, 0, 6) == []
    _write_claim(tmp_path, 0, 6, gen, dict(payload, time=time.time()))  # the late heartbeat's rewrite
    assert not holder.confirm(0, 6) and (0, 6) in holder.lost
    assert _claims(tmp_path, 0, 6) == []
