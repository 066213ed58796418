"""`kdcache dump-teacher`: run the teacher once over views (i, s) of the train split, store its top-k (with
--targets sampled also draws from the tail, kdcache.teacher.runner). With --add-teacher the views are an
existing cache's and the targets go into that cache's teachers/<label>/ (kdcache.teacher.target).

Work is split into units (seed, block of `unit_size` samples) = one Zarr shard per array. A process
takes whole blocks (block b goes to rank b mod world size) and renders each block in passes of up to
`seeds_per_pass` seeds: each image is decoded once per pass and all its views of the pass are rendered
from it. A pass claims its units when it starts (kdcache.cache.ledger: exclusive claims with a live
heartbeat), writes each unit's four shards whole, then creates its completion marker. Units another live
writer holds are left to it; the process waits for them (taking them over if that writer dies) and ends
when every unit it was asked for is finished, so any number of jobs can dump into one cache at once.
Re-running the same command skips finished units: an interrupted dump resumes, with any world size.

Two threads share the work. The producer (a render thread, here) claims passes and renders their views in
chunks; the consumer (kdcache.teacher.consumer, in the caller's thread) runs the teacher on them and hands
finished passes to the unit writer (kdcache.teacher.units). They talk through a bounded queue of typed
messages (kdcache.teacher.messages). The sizes of that pipeline (render calls, queue, ring) are set here.
"""

import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from kdcache.augment.params import ParamLayout, view_params
from kdcache.augment.recipe import ViewRecipe
from kdcache.augment.render import SampleBuffers, render_range
from kdcache.cache.schema import CacheSpec, TeacherCache
from kdcache.data.dataset import PreparedDataset
from kdcache.dist import init_from_env, resolve_device
from kdcache.errors import KdcacheError
from kdcache.models import build_model
from kdcache.teacher.config import DumpConfig  # noqa: F401 (re-exported)
from kdcache.teacher.consumer import Consumer, DumpProgress
from kdcache.teacher.messages import Chunk, Done, PassEnded, PassStarted, ProducerFailed, Waiting
from kdcache.teacher.runner import OutputRing, TeacherRunner, TopkResult  # noqa: F401 (re-exported)
from kdcache.teacher.target import DEFAULT_UNIT_SIZE, resolve_target  # noqa: F401 (re-exported)
from kdcache.teacher.target import MainViews, disk_full, is_disk_full, main_cache, open_target
from kdcache.teacher.units import UnitWriter, write_pass
from kdcache.teacher.units import write_unit as _write_unit  # noqa: F401 (tests/test_cache_format.py)

logger = logging.getLogger(__name__)


def default_render_threads(device: torch.device) -> int:
    """Every usable core renders on the CPU (where the teacher's forward takes turns with the render); on a
    GPU two are left to the thread that feeds it and the unit writer (the fastest count measured on a
    16-core H200, BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores - 2) if device.type == "cuda" else cores


# Rendered chunks waiting for the teacher: about QUEUED_BATCHES batches (at least 2 chunks).
QUEUED_BATCHES = 4
# Each render call gets at least this many samples per render thread: with one batch of 64 images over 14
# threads, each thread rendered 4 or 5 and all waited for the slowest. Projected on 14 threads from
# one-thread costs (tools/render_scaling.py --balance): 85 % busy then, 96 % with 256-sample calls.
SAMPLES_PER_RENDER_THREAD = 16
# ...and at most this many views (or one batch), which bounds the output ring: 154 MB per call at 224 px.
# With many views per image (S = 32: 32 samples per call) a call has fewer samples than that target.
VIEWS_PER_RENDER = 1024


def batches_per_render(samples_per_batch: int, views_per_sample: int, workers: int) -> int:
    """How many teacher batches one render call makes (the consumer splits them again)."""
    wanted = -(-SAMPLES_PER_RENDER_THREAD * workers // samples_per_batch)
    return max(1, min(wanted, VIEWS_PER_RENDER // (samples_per_batch * views_per_sample)))


def queue_depth(batches_per_chunk: int) -> int:
    return max(2, -(-QUEUED_BATCHES // batches_per_chunk))


def ring_slots(depth: int) -> int:
    """A slot is rewritten only after ring_slots - 1 later chunks were rendered: `depth` of them wait in the
    queue, one is being rendered, and the consumer has finished with the slot (it waits for a batch's
    results, which come after its host->device copy, before it takes the batch after next). On a GPU with
    14 render threads at 224 px: 6 slots of 1,024 views, 0.9 GB of pinned memory."""
    return depth + 4


def _passes(seeds: List[int], per_pass: int) -> List[List[int]]:
    return [seeds[i:i + per_pass] for i in range(0, len(seeds), per_pass)]


def samples_per_batch(batch_size: int, views_per_sample: int, recipe: ViewRecipe) -> int:
    """Samples per teacher batch: whole mixing blocks where the recipe mixes (both partners of every pair
    are rendered together)."""
    n = max(1, batch_size // views_per_sample)
    return max(1, n // recipe.mix_block) * recipe.mix_block if recipe.mixing else n


def pass_params(recipe: ViewRecipe, global_seed: int, split, spec: CacheSpec, block: int,
                seeds: List[int]) -> np.ndarray:
    """(samples, seeds, P) view parameters of a pass: `seeds` over the samples of `block`."""
    a, b = spec.block_bounds(block)
    idx = np.arange(a, b)
    heights, widths = split.sizes[a:b, 0], split.sizes[a:b, 1]
    return np.stack([view_params(recipe, global_seed, s, idx, heights, widths, spec.num_samples) for s in seeds], 1)


def render_chunks(reader, read_ahead, split, recipe: ViewRecipe, params: np.ndarray, a: int, b: int, per_batch: int,
                  workers: int, ring: OutputRing, buffers: SampleBuffers):
    """The views of samples a..b-1 (params: their rows, (b - a, V, P)) in chunks of whole teacher batches,
    one render call each: yields (c0, c1, views). The next chunk's JPEGs are read (read_ahead: a
    one-thread executor) while this one renders."""
    layout = ParamLayout.of(recipe)
    heights, widths = split.sizes[a:b, 0], split.sizes[a:b, 1]
    per_render = per_batch * batches_per_render(per_batch, params.shape[1], workers)
    chunks = [(c0, min(c0 + per_render, b)) for c0 in range(a, b, per_render)]
    reading = read_ahead.submit(reader.read_range, *chunks[0])
    for k, (c0, c1) in enumerate(chunks):
        data, offsets, lengths = reading.result()
        if k + 1 < len(chunks):
            reading = read_ahead.submit(reader.read_range, *chunks[k + 1])
        out = ring.next((c1 - c0, params.shape[1], recipe.size, recipe.size, 3))
        rows = slice(c0 - a, c1 - a)
        yield c0, c1, render_range(data, offsets, lengths, heights[rows], widths[rows], params[rows], recipe.size,
                                   layout, what=f"{split.name} sample {c0} +", out=out, buffers=buffers)


class Producer:
    """The render thread: claims a pass's units, computes their view parameters, reads and renders their
    chunks, and sends each step to the consumer as a message; `stop` ends it early (set by the consumer's
    thread on an error). Its last message is always Done, after a ProducerFailed if it raised. `views`
    (--add-teacher): each pass's parameters are checked against the main cache's before it is rendered."""

    def __init__(self, cache: TeacherCache, split, recipe: ViewRecipe, cfg: DumpConfig, blocks: List[int],
                 run: str, messages: queue.Queue, workers: int, pinned: bool, views: Optional[MainViews] = None):
        self.cache, self.split, self.recipe, self.cfg, self.views = cache, split, recipe, cfg, views
        self.blocks, self.run_id, self.messages = blocks, run, messages
        self.workers, self.pinned = workers, pinned
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True, name="kdcache-render")

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join()

    def _main(self) -> None:
        import numba
        from concurrent.futures import ThreadPoolExecutor
        reader = read_ahead = None
        try:  # the set-up too: a reader that cannot open must end the dump, not leave the consumer waiting
            numba.set_num_threads(self.workers)
            reader = self.split.jpeg_reader()
            read_ahead = ThreadPoolExecutor(1, thread_name_prefix="kdcache-read")  # the next chunk's JPEGs
            render = partial(render_chunks, reader, read_ahead, self.split, self.recipe, workers=self.workers,
                             ring=OutputRing(ring_slots(self.messages.maxsize), pinned=self.pinned),
                             buffers=SampleBuffers())
            self._claim_and_render(render)
        except BaseException as exc:  # handed to the main thread, which raises it
            self.messages.put(ProducerFailed(exc))
        finally:
            self.messages.put(Done())
            if read_ahead is not None:
                read_ahead.shutdown(wait=True, cancel_futures=True)
            if reader is not None:
                reader.close()

    def _claim_and_render(self, render) -> None:
        """Rounds over the passes left: render those this process claims; the units other live writers hold
        wait for the next round (they finish them, or their claims lapse and this process takes them over)."""
        cfg = self.cfg
        pending = [(block, group) for block in self.blocks for group in _passes(cfg.seeds, cfg.seeds_per_pass)]
        poll = min(5.0, max(0.2, cfg.claim_ttl / 10))
        pass_id = 0
        while pending:
            elsewhere = []
            for block, group in pending:
                if self.stop.is_set():
                    return
                seeds, held = self._claim(block, group)
                if held:  # held by a live writer: it finishes them, or we take them over
                    elsewhere.append((block, held))
                if not seeds:
                    continue
                pass_id += 1
                if not self._render_pass(render, pass_id, block, seeds):
                    return
            pending = elsewhere
            if pending:
                self.messages.put(Waiting(sum(len(g) for _, g in pending)))
                self.stop.wait(poll)

    def _claim(self, block: int, group: List[int]):
        """(the seeds of `group` claimed now, those another writer holds) among the unfinished ones."""
        ledger = self.cache.ledger
        todo = [s for s in group if not ledger.is_done(s, block)]
        seeds = [s for s in todo if ledger.claim(s, block, self.run_id)]
        return seeds, [s for s in todo if s not in seeds]

    def _render_pass(self, render, pass_id: int, block: int, seeds: List[int]) -> bool:
        """Send one pass: its start, its rendered chunks, its end. False: stopped midway."""
        spec, recipe, cfg = self.cache.spec, self.recipe, self.cfg
        a, b = spec.block_bounds(block)
        params = pass_params(recipe, cfg.global_seed, self.split, spec, block, seeds)
        if self.views is not None:
            self.views.check(block, seeds, params)
        self.messages.put(PassStarted(pass_id, block, seeds, params))
        per_batch = samples_per_batch(cfg.batch_size, len(seeds), recipe)
        for c0, c1, images in render(params, a, b, per_batch):
            if self.stop.is_set():
                return False
            self.messages.put(Chunk(pass_id, c0, c1, images, per_batch))
        self.messages.put(PassEnded(pass_id))
        return True


def _message_queue(cfg: DumpConfig, recipe: ViewRecipe, workers: int) -> queue.Queue:
    # sized by the first pass's chunks (later passes with fewer seeds have larger batches, so fewer per chunk)
    views = min(len(cfg.seeds), cfg.seeds_per_pass)
    per_batch = samples_per_batch(cfg.batch_size, views, recipe)
    return queue.Queue(maxsize=queue_depth(batches_per_render(per_batch, views, workers)))


def _views_todo(cache: TeacherCache, spec: CacheSpec, blocks: List[int], seeds: List[int]) -> int:
    done = cache.ledger.done_units()
    return sum(len(range(*spec.block_bounds(b))) for b in blocks for s in seeds if b not in done.get(s, ()))


def _views_of(cfg: DumpConfig, ds: PreparedDataset, split):
    """(cfg, the main cache's MainViews or None): with --add-teacher the views are the main cache's (its recipe
    and global seed replace the run's), checked on the first unit before anything is created."""
    if not cfg.add_teacher:
        if cfg.teacher_label is not None:
            raise KdcacheError("--teacher-label names a teacher added with --add-teacher")
        return cfg, None
    main = main_cache(cfg, ds)
    cfg = replace(cfg, recipe=ViewRecipe.from_dict(main.spec.recipe), global_seed=main.spec.global_seed)
    views = MainViews(main, cfg.seeds)
    first = cfg.seeds[:1]   # another renderer shows on the first unit: refused with nothing written
    views.check(0, first, pass_params(cfg.recipe, cfg.global_seed, split, main.spec, 0, first))
    return cfg, views


def dump_teacher(cfg: DumpConfig) -> dict:
    """Dump the teacher's answers (top-k, or top-k plus draws from the tail) for views (i, s) of cfg.split,
    s in cfg.seeds, into the cache, or with cfg.add_teacher into the cache of a teacher added over an existing
    cache's views (see the module's docstring); under torchrun each rank takes its blocks. Returns the
    summary (totals over the ranks)."""
    t_start = time.time()
    cfg.validate()
    ctx = init_from_env(cfg.device)
    device = resolve_device(cfg.device, ctx)
    ds = PreparedDataset.open(cfg.data)
    split = ds.split(cfg.split)
    cfg, views = _views_of(cfg, ds, split)
    recipe = cfg.recipe or ViewRecipe(size=ds.view_size)
    model, tinfo = build_model(cfg.teacher, ds.num_classes, what="teacher")
    tinfo["input_size"] = recipe.size
    cache, spec = open_target(cfg, ctx, ds, recipe, tinfo, main=views.main if views else None)

    run = os.environ.get("TORCHELASTIC_RUN_ID", "") + f"-{uuid.uuid4().hex[:8]}"
    blocks = [b for b in range(spec.num_blocks) if b % ctx.world_size == ctx.rank]
    views_todo = _views_todo(cache, spec, blocks, cfg.seeds)
    runner = TeacherRunner(model, tinfo, device, cfg.amp, cfg.compile, cfg.topk, samples=spec.samples,
                           sample_temperature=spec.sample_temperature, global_seed=spec.global_seed,
                           control_variate=spec.targets == "sampled-cv", values_dtype=spec.values_dtype)
    workers = cfg.workers or default_render_threads(device)
    producer = Producer(cache, split, recipe, cfg, blocks, run, _message_queue(cfg, recipe, workers), workers,
                        pinned=device.type == "cuda", views=views)
    progress = DumpProgress(cfg.progress, ctx.rank, views_todo)
    log = {"run": run, "rank": ctx.rank, "world_size": ctx.world_size, "device": str(device), "amp": runner.amp,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "teacher"},
           "teacher": tinfo, "units": [], "lost": []}
    provenance = {"run": run, "rank": ctx.rank, "device": device.type, "amp": runner.amp}
    consumer = Consumer(runner, spec.block_bounds, (spec.stored_columns, spec.tail_columns), split.labels, UnitWriter(),
                        partial(write_pass, cache, log=log, provenance=provenance), progress)
    _produce_and_consume(cache, producer, consumer)

    log["summary"] = summary = _summary(cfg, ctx, cache, consumer, t_start)
    _write_log(cache, log, run, ctx.rank)
    ctx.close()
    return summary


def _produce_and_consume(cache: TeacherCache, producer: Producer, consumer: Consumer) -> None:
    """The producer's thread against the consumer in this one, the claims' heartbeat alive meanwhile. On any
    error: stop the producer, give this run's unfinished units back at once (no waiting for a TTL), raise."""
    cache.ledger.start_heartbeat()
    producer.start()
    try:
        consumer.run(producer.messages)
        consumer.writer.close()
    except BaseException as exc:
        producer.stop.set()
        consumer.writer.close(raise_error=False)
        cache.ledger.stop_heartbeat()
        cache.ledger.release_all()
        if is_disk_full(exc):
            raise disk_full(exc, cache.path) from None
        raise
    finally:
        consumer.progress.close()
    cache.ledger.stop_heartbeat()
    producer.join()


def _summary(cfg: DumpConfig, ctx, cache: TeacherCache, consumer: Consumer, t_start: float) -> dict:
    """The dump's summary, the same on every rank (all ranks' views and images together)."""
    elapsed = consumer.elapsed()
    total_views = ctx.all_sum(float(consumer.views_done))
    total_samples = ctx.all_sum(float(consumer.samples_done))
    ctx.barrier()
    return {"cache": cache.path, "seeds_requested": cfg.seeds, "seeds_complete": cache.complete_seeds(),
            "views_written": int(total_views), "views_written_this_rank": consumer.views_done,
            "seconds": round(time.time() - t_start, 2), "loop_seconds": round(elapsed, 2),
            # all ranks together (each rank's loop time is about the same: they end at one barrier)
            "views_per_s": total_views / elapsed if elapsed > 0 and total_views else None,
            "img_per_s": total_samples / elapsed if elapsed > 0 and total_samples else None,
            "forward_seconds": round(consumer.forward_seconds, 2), "world_size": ctx.world_size,
            "bytes_on_disk": cache.bytes_on_disk(),
            "teacher_label": cache.label if cache.views_of else None, "targets": cache.spec.targets}


def _write_log(cache: TeacherCache, log: dict, run: str, rank: int) -> None:
    """The run's log (config, teacher, units written and lost, summary) into the cache's logs/."""
    name = f"logs/dump-{time.strftime('%Y%m%dT%H%M%S')}-{run.strip('-')}-rank{rank}.json"
    try:
        cache.location.write(name, json.dumps(log, indent=1).encode())
    except OSError as exc:  # the units are written and marked: a log that does not fit is not worth failing for
        logger.warning("could not write the dump log %s: %s", name, exc)
