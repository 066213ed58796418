"""The write side of the dump: a pass's teacher outputs gathered (PassResults), then stored as its units, one
Zarr shard per array each, and marked done (write_pass), in a background thread (UnitWriter)."""

import queue
import threading
import time
from typing import Optional

import numpy as np

from kdcache.cache.integrity import unit_records
from kdcache.cache.schema import TeacherCache, encode_logp
from kdcache.teacher.messages import PassStarted


class PassResults:
    """The teacher outputs of one pass (its seeds of one block), stored batch by batch as they arrive."""

    def __init__(self, started: PassStarted, bounds, columns: int, tail_columns: int = 1):
        self.block, self.seeds, self.params = started.block, started.seeds, started.params
        self.first = bounds[0]
        self.t0 = time.time()
        views, n = len(self.seeds), bounds[1] - bounds[0]
        self.logp = np.empty((views, n, columns), np.float32)     # columns: k, or k + m for sampled targets
        self.indices = np.empty((views, n, columns), np.int64)
        # (views, n), or (views, n, 3) for sampled-cv targets (log S, log beta, log A)
        self.log_tail = np.empty((views, n) + ((tail_columns,) if tail_columns > 1 else ()), np.float32)
        self.correct = np.zeros(views, np.int64)   # per seed: views whose top-1 class is the label

    def store(self, c0: int, c1: int, logp, indices, log_tail, labels: np.ndarray) -> None:
        """The outputs of samples c0..c1-1, each with its views of this pass in a row (sample-major)."""
        views = len(self.seeds)
        rows = slice(c0 - self.first, c1 - self.first)
        self.logp[:, rows] = logp.reshape(c1 - c0, views, -1).transpose(1, 0, 2)
        self.indices[:, rows] = indices.reshape(c1 - c0, views, -1).transpose(1, 0, 2)
        self.log_tail[:, rows] = log_tail.reshape(c1 - c0, views, *self.log_tail.shape[2:]).swapaxes(0, 1)
        self.correct += (self.indices[:, rows, 0] == labels[c0:c1][None, :]).sum(1)


def write_unit(cache: TeacherCache, seed: int, block: int, logp, indices, log_tail, params) -> dict:
    """Write one unit's shards (each one whole object: four, or an added teacher's three, whose views are the
    main cache's) and return their records for the marker."""
    a, b = cache.spec.block_bounds(block)
    arrays = cache.arrays(seed)
    arrays["logp"][a:b] = encode_logp(logp, cache.spec.values_dtype)
    arrays["indices"][a:b] = indices.astype(cache.spec.indices_dtype)
    arrays["log_tail"][a:b] = log_tail.astype(np.float32)
    if not cache.views_of:
        arrays["params"][a:b] = params.astype(np.float32)
    return unit_records(cache, seed, block)


def write_pass(cache: TeacherCache, results: PassResults, log: dict, provenance: dict) -> None:
    """Write a rendered pass's units and mark each done (in the UnitWriter's thread); the dump log's "units"
    gets the pass, its "lost" the units another writer took over meanwhile."""
    block = results.block
    a, b = cache.spec.block_bounds(block)
    for j, s in enumerate(results.seeds):
        if not cache.ledger.confirm(s, block):  # taken over while our heartbeat lapsed: theirs to write
            log["lost"].append({"seed": s, "block": block})
            continue
        objects = write_unit(cache, s, block, results.logp[j], results.indices[j], results.log_tail[j],
                             results.params[:, j])
        # device and amp: how precise the unit's logits are (verify --replay picks its thresholds by them)
        cache.ledger.mark_done(s, block, dict(provenance, views=b - a, correct=int(results.correct[j]),
                                              objects=objects))
    log["units"].append({"block": block, "seeds": results.seeds, "samples": b - a,
                         "seconds": round(time.time() - results.t0, 3)})


class UnitWriter:
    """Writes finished passes in a background thread, so that the store's latency (one PUT per shard, a
    read-back and a marker per unit: slow on S3) overlaps the teacher's next forwards. At most
    `depth` passes wait (their claims stay alive: the heartbeat runs); an error is raised in the caller."""

    def __init__(self, depth: int = 2):
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="kdcache-unit-writer")
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as exc:
                    self.error = exc

    def put(self, job) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def close(self, raise_error: bool = True) -> None:
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        if raise_error and self.error is not None:
            raise self.error
