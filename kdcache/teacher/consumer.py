"""The teacher's thread of the dump (the consumer): takes the producer's messages in order, runs the teacher
on each chunk's batches, gathers a pass's outputs and hands the finished pass to the unit writer."""

import queue
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from tqdm import tqdm

from kdcache.progress import ProgressLines, rate_eta
from kdcache.teacher.messages import Chunk, Done, PassEnded, PassStarted, ProducerFailed, Waiting
from kdcache.teacher.runner import TeacherRunner, TopkResult
from kdcache.teacher.units import PassResults, UnitWriter


class DumpProgress:
    """The dump's progress: a tqdm bar on a terminal, else a plain line every interval (kdcache.progress)."""

    def __init__(self, enabled: bool, rank: int, views_todo: int):
        self.rank, self.views_todo = rank, views_todo
        self.lines = ProgressLines(enabled)   # not a terminal: a plain line every 10 s instead of the bar
        self.bar = tqdm(total=views_todo, unit="view", desc=f"dump rank {rank}", file=sys.stderr,
                        disable=self.lines.tqdm_disabled(enabled), mininterval=1.0, smoothing=0.05)

    def advanced(self, views: int, views_done: int, samples_done: int, elapsed: float) -> None:
        self.bar.update(views)
        self.bar.set_postfix_str(f"{samples_done / elapsed:.0f} img/s", refresh=False)
        if self.lines.due():
            self.lines.line(f"dump rank {self.rank}: {views_done}/{self.views_todo} views, "
                            f"{samples_done / elapsed:.0f} img/s, "
                            + rate_eta(views_done, self.views_todo, elapsed, "view"))

    def waiting(self, units: int) -> None:
        self.bar.set_postfix_str(f"waiting for {units} units held by other writers", refresh=True)
        if self.lines.due():
            self.lines.line(f"dump rank {self.rank}: waiting for {units} units held by other writers")

    def close(self) -> None:
        self.bar.close()


@dataclass
class _InFlight:
    """A batch launched on the device whose results were not taken yet: samples start..stop-1 of a pass."""
    result: TopkResult
    pass_id: int
    start: int
    stop: int


class Consumer:
    """Runs the teacher on the rendered chunks, one batch queued on the device ahead of the one whose results
    it stores, and counts what it did (views, samples, seconds waiting for the device's forwards)."""

    def __init__(self, runner: TeacherRunner, block_bounds: Callable, columns: Tuple[int, int], labels: np.ndarray,
                 writer: UnitWriter, write_pass: Callable[[PassResults], None], progress: DumpProgress):
        self.runner, self.block_bounds, self.columns, self.labels = runner, block_bounds, columns, labels
        self.writer, self.write_pass, self.progress = writer, write_pass, progress
        self.passes: Dict[int, PassResults] = {}
        self.in_flight: Optional[_InFlight] = None
        self.views_done = self.samples_done = 0
        self.forward_seconds = 0.0
        self.started = time.time()

    def elapsed(self) -> float:
        return time.time() - self.started

    def run(self, messages: queue.Queue) -> None:
        """Handle messages until the producer's Done; raise the producer's error."""
        while True:
            message = messages.get()
            if not isinstance(message, Chunk):
                self._finish_batch()    # a pass's last results are stored before it ends
            match message:
                case Done():
                    return
                case ProducerFailed(error=error):
                    raise error
                case Waiting(units=units):
                    self.progress.waiting(units)
                case PassStarted():
                    self.passes[message.pass_id] = PassResults(message, self.block_bounds(message.block), *self.columns)
                case Chunk():
                    self._forward(message)
                case PassEnded():
                    self.writer.put(partial(self.write_pass, self.passes.pop(message.pass_id)))
                case _:
                    raise TypeError(f"dump: unknown producer message {message!r}")

    def _forward(self, chunk: Chunk) -> None:
        """Launch the chunk's teacher batches, each before storing the results of the one before it (the
        device never waits for the host between batches)."""
        per_batch = chunk.samples_per_batch
        for s0 in range(0, chunk.stop - chunk.start, per_batch):
            batch = chunk.images[s0:s0 + per_batch]
            start = chunk.start + s0
            t = time.perf_counter()
            launched = _InFlight(self.runner.launch(batch.reshape(-1, *batch.shape[2:]),
                                                    *self._views(chunk.pass_id, start, len(batch))),
                                 chunk.pass_id, start, start + len(batch))
            self.forward_seconds += time.perf_counter() - t
            self._finish_batch()
            self.in_flight = launched

    def _views(self, pass_id: int, start: int, count: int):
        """(seeds, samples) of a batch's rows, for the runner's draws: rows are sample-major, the pass's views of
        each sample side by side (PassResults.store); () for top-k targets, which need none."""
        if not self.runner.samples:
            return ()
        seeds = self.passes[pass_id].seeds
        return np.tile(np.asarray(seeds, np.int64), count), np.repeat(np.arange(start, start + count), len(seeds))

    def _finish_batch(self) -> None:
        """Store the results of the batch in flight into its pass's arrays."""
        if self.in_flight is None:
            return
        batch, self.in_flight = self.in_flight, None
        t = time.perf_counter()
        logp, indices, log_tail = batch.result.get()
        self.forward_seconds += time.perf_counter() - t
        self.passes[batch.pass_id].store(batch.start, batch.stop, logp, indices, log_tail, self.labels)
        self.views_done += logp.shape[0]
        self.samples_done += batch.stop - batch.start
        self.progress.advanced(logp.shape[0], self.views_done, self.samples_done, self.elapsed())
