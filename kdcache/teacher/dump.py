"""`kdcache dump-teacher`: run the teacher once over views (i, s) of the train split, store top-k.

Work is split into units (seed, block of `unit_size` samples) = one Zarr shard per array. A process
takes whole blocks (block b goes to rank b mod world size) and renders each block in passes of up to
`seeds_per_pass` seeds: each image is decoded once per pass and all its views of the pass are rendered
from it. A pass claims its units when it starts (kdcache.cache.ledger: exclusive claims with a live
heartbeat), writes each unit's four shards whole, then creates its completion marker. Units another live
writer holds are left to it; the process waits for them (taking them over if that writer dies) and ends
when every unit it was asked for is finished, so any number of jobs can dump into one cache at once.
Re-running the same command skips finished units: an interrupted dump resumes, with any world size.
"""

import errno
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from kdcache.augment.params import ParamLayout, view_params
from kdcache.augment.recipe import ViewRecipe
from kdcache.augment.render import SampleBuffers, render_range
from kdcache.cache.integrity import unit_records
from kdcache.cache.location import Location
from kdcache.cache.schema import CacheSpec, TeacherCache, check_compatible, encode_logp
from kdcache.data.dataset import PreparedDataset
from kdcache.dist import init_from_env, resolve_amp, resolve_device
from kdcache.errors import KdcacheError
from kdcache.models import Normalize, build_model, forward_u8
from kdcache.progress import ProgressLines, rate_eta
from kdcache.teacher.config import DumpConfig  # noqa: F401 (re-exported)


DEFAULT_UNIT_SIZE = 32768


class TeacherRunner:
    """uint8 NHWC views -> (top-k log-probabilities, top-k indices, log tail mass), on the chosen device."""

    def __init__(self, model, info: dict, device: torch.device, amp: str, compile_model: bool, topk: int):
        self.device, self.topk = device, topk
        self.amp_dtype, self.amp = resolve_amp(amp, device)
        self.normalize = Normalize(info["mean"], info["std"]).to(device)
        model = model.to(device, memory_format=torch.channels_last).eval()
        self.model = torch.compile(model) if compile_model else model

    @torch.inference_mode()
    def logits(self, views_nhwc: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(views_nhwc).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return forward_u8(self.model, self.normalize, x, self.amp_dtype)

    @torch.inference_mode()
    def launch(self, views_nhwc: np.ndarray) -> "TopkResult":
        """Start the forward of one batch; on CUDA it returns before the GPU is done, so the caller can
        queue the next batch first (the GPU never waits for the host between batches)."""
        logits = self.logits(views_nhwc)
        values, indices = logits.topk(self.topk, dim=1, sorted=True)
        # float64 from the full fp32 logits: the tail mass is summed over its own classes, never taken as
        # 1 - sum(top-k) (at p_top = 0.99 that difference loses most of its digits)
        full = logits.double()
        lse = torch.logsumexp(full, dim=1, keepdim=True)
        logp = values.double() - lse
        if self.topk < logits.shape[1]:
            log_tail = torch.logsumexp(full.scatter(1, indices, -torch.inf), dim=1) - lse[:, 0]
        else:  # no other classes: tail mass 0
            log_tail = torch.full_like(lse[:, 0], -torch.inf)
        outputs = (logp.float(), indices, log_tail.float())
        if self.device.type != "cuda":
            return TopkResult(outputs, None)
        # pinned host copies, asynchronous; the event says when they have landed
        host = tuple(t.to("cpu", non_blocking=True) for t in outputs)
        done = torch.cuda.Event()
        done.record()
        return TopkResult(host, done)

    def topk_outputs(self, views_nhwc: np.ndarray):
        """(top-k log-probabilities, top-k indices, log tail mass) of one batch, as numpy arrays."""
        return self.launch(views_nhwc).get()


class TopkResult:
    """A launched batch's outputs; get() waits for them (a no-op off CUDA)."""

    def __init__(self, tensors, done):
        self.tensors, self.done = tensors, done

    def get(self):
        if self.done is not None:
            self.done.synchronize()
        return tuple(t.numpy() for t in self.tensors)


def default_render_threads(device: torch.device) -> int:
    """Every usable core renders on the CPU (where the teacher's forward takes turns with the render); on a
    GPU two are left to the thread that feeds it and the unit writer. Measured on an H200 with 16 cores
    (BENCHMARKS.md): 14 render threads dumped 12.5 k views/s, 16 threads 11.7 k, 12 threads 10.7 k."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores - 2) if device.type == "cuda" else cores


def _dataset_identity(ds: PreparedDataset, split_name: str) -> dict:
    split = ds.split(split_name)
    return {"fingerprint": ds.fingerprint, "split": split_name, "split_fingerprint": split.fingerprint,
            "num_samples": split.num_samples, "num_classes": ds.num_classes, "view_size": ds.view_size,
            "path": str(ds.root.resolve())}


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


class OutputRing:
    """Rendered-view buffers reused round-robin (pinned memory on CUDA: asynchronous host->device copies)."""

    def __init__(self, slots: int, pinned: bool):
        self.slots, self.pinned = [None] * slots, pinned
        self.i = 0

    def next(self, shape) -> np.ndarray:
        need = int(np.prod(shape))
        j = self.i % len(self.slots)
        self.i += 1
        if self.slots[j] is None or self.slots[j].size < need:
            self.slots[j] = (torch.empty(need, dtype=torch.uint8, pin_memory=True).numpy() if self.pinned
                             else np.empty(need, np.uint8))
        return self.slots[j][:need].reshape(shape)


def _passes(seeds: List[int], per_pass: int) -> List[List[int]]:
    return [seeds[i:i + per_pass] for i in range(0, len(seeds), per_pass)]


def samples_per_batch(batch_size: int, views_per_sample: int, recipe: ViewRecipe) -> int:
    """Samples per teacher batch: whole mixing blocks where the recipe mixes (both partners of every pair
    are rendered together)."""
    n = max(1, batch_size // views_per_sample)
    return max(1, n // recipe.mix_block) * recipe.mix_block if recipe.mixing else n


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


def _produce(cache: TeacherCache, split, recipe: ViewRecipe, cfg: DumpConfig, blocks: List[int], run: str,
             out_q: queue.Queue, stop: threading.Event, workers: int, pinned: bool):
    """Producer thread: claim a pass's units, compute their view parameters, read and render chunks."""
    import numba
    from concurrent.futures import ThreadPoolExecutor
    numba.set_num_threads(workers)
    spec, ledger = cache.spec, cache.ledger
    reader = split.jpeg_reader()
    read_ahead = ThreadPoolExecutor(1, thread_name_prefix="kdcache-read")  # the next chunk's JPEGs, during a render
    scratch = SampleBuffers()
    ring = OutputRing(ring_slots(out_q.maxsize), pinned=pinned)
    pending = [(block, group) for block in blocks for group in _passes(cfg.seeds, cfg.seeds_per_pass)]
    poll = min(5.0, max(0.2, cfg.claim_ttl / 10))
    n_pass = 0
    try:
        while pending:
            elsewhere = []
            for block, group in pending:
                if stop.is_set():
                    return
                todo = [s for s in group if not ledger.is_done(s, block)]
                seeds = [s for s in todo if ledger.claim(s, block, run)]
                if len(seeds) < len(todo):  # held by a live writer: it finishes them, or we take them over
                    elsewhere.append((block, [s for s in todo if s not in seeds]))
                if not seeds:
                    continue
                n_pass += 1
                a, b = spec.block_bounds(block)
                idx = np.arange(a, b)
                heights, widths = split.sizes[a:b, 0], split.sizes[a:b, 1]
                params = np.stack([view_params(recipe, cfg.global_seed, s, idx, heights, widths, spec.num_samples)
                                   for s in seeds], 1)
                out_q.put(("pass", n_pass, block, seeds, params))
                per_batch = samples_per_batch(cfg.batch_size, len(seeds), recipe)
                for c0, c1, images in render_chunks(reader, read_ahead, split, recipe, params, a, b, per_batch,
                                                    workers, ring, scratch):
                    if stop.is_set():
                        return
                    out_q.put(("chunk", n_pass, c0, c1, images, per_batch))
                out_q.put(("end", n_pass))
            pending = elsewhere
            if pending:
                out_q.put(("waiting", sum(len(g) for _, g in pending)))
                stop.wait(poll)
    except BaseException as exc:  # handed to the main thread, which raises it
        out_q.put(("error", exc))
    finally:
        out_q.put(("done",))
        read_ahead.shutdown(wait=True, cancel_futures=True)
        reader.close()


def _write_unit(cache: TeacherCache, seed: int, block: int, logp, indices, log_tail, params) -> dict:
    """Write one unit's four shards (each one whole object) and return their records for the marker."""
    a, b = cache.spec.block_bounds(block)
    arrays = cache.arrays(seed)
    arrays["logp"][a:b] = encode_logp(logp, cache.spec.values_dtype)
    arrays["indices"][a:b] = indices.astype(cache.spec.indices_dtype)
    arrays["log_tail"][a:b] = log_tail.astype(np.float32)
    arrays["params"][a:b] = params.astype(np.float32)
    return unit_records(cache, seed, block)


def _finish_pass(cache: TeacherCache, st: dict, log: dict, provenance: dict) -> None:
    """Write a rendered pass's units and mark each done (in the UnitWriter's thread)."""
    block = st["block"]
    a, b = cache.spec.block_bounds(block)
    for j, s in enumerate(st["seeds"]):
        if not cache.ledger.confirm(s, block):  # taken over while our heartbeat lapsed: theirs to write
            log["lost"].append({"seed": s, "block": block})
            continue
        objects = _write_unit(cache, s, block, st["logp"][j], st["indices"][j], st["log_tail"][j], st["params"][:, j])
        # device and amp: how precise the unit's logits are (verify --replay picks its thresholds by them)
        cache.ledger.mark_done(s, block, dict(provenance, views=b - a, correct=int(st["correct"][j]), objects=objects))
    log["units"].append({"block": block, "seeds": st["seeds"], "samples": b - a,
                         "seconds": round(time.time() - st["t0"], 3)})


class UnitWriter:
    """Writes finished passes in a background thread, so that the store's latency (one PUT per shard, a
    read-back and a marker per unit: ~0.35 s per unit on S3) overlaps the teacher's next forwards. At most
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


def resolve_target(cfg: DumpConfig, spec: CacheSpec) -> str:
    """The cache to write: --out, or under --cache-root the cache of this identity (kdcache.cache.catalog)."""
    if cfg.cache_root is not None:
        from kdcache.cache.catalog import cache_id
        return str(Location.of(cfg.cache_root).child(cache_id(spec)))
    if cfg.out is None:
        raise KdcacheError("dump-teacher needs --out CACHE or --cache-root ROOT")
    return str(cfg.out)


def _existing_unit_size(target: str) -> Optional[int]:
    try:
        return TeacherCache.open(target).spec.unit_size
    except KdcacheError:
        return None


def _disk_full(exc: OSError, where: str) -> KdcacheError:
    return KdcacheError(f"{where}: no space left on the device ({exc.filename or where}); finished units are kept "
                        "and this run's claims were released: free space and run the same command again")


def dump_teacher(cfg: DumpConfig) -> dict:
    t_start = time.time()
    cfg.validate()
    ctx = init_from_env(cfg.device)
    device = resolve_device(cfg.device, ctx)
    ds = PreparedDataset.open(cfg.data)
    split = ds.split(cfg.split)
    recipe = cfg.recipe or ViewRecipe(size=ds.view_size)
    model, tinfo = build_model(cfg.teacher, ds.num_classes, what="teacher")
    tinfo["input_size"] = recipe.size

    def make_spec(unit_size: int) -> CacheSpec:
        # one inner chunk per shard: students read whole slabs (BENCHMARKS.md)
        return CacheSpec(teacher=tinfo, dataset=_dataset_identity(ds, cfg.split), recipe=recipe.to_dict(),
                         global_seed=cfg.global_seed, topk=cfg.topk, values_dtype=cfg.values_dtype,
                         unit_size=unit_size, chunk_rows=unit_size)
    spec = make_spec(cfg.unit_size or DEFAULT_UNIT_SIZE)
    target = resolve_target(cfg, spec)
    if cfg.unit_size is None:  # extending a cache: its unit size, whatever today's default
        spec = make_spec(_existing_unit_size(target) or DEFAULT_UNIT_SIZE)
    # The coordinator of each launch creates the cache and its arrays (idempotent, also against other
    # launches doing the same); the other ranks wait, then check the identity.
    error = None
    if ctx.is_coordinator:
        try:
            TeacherCache.create_or_open(target, spec, cfg.seeds)
        except KdcacheError as exc:
            error = exc
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            error = _disk_full(exc, target)
    ctx.barrier()
    if ctx.all_sum(1.0 if error else 0.0):
        raise error or KdcacheError(f"{target}: the coordinator (rank 0) could not create or open the cache")
    cache = TeacherCache.open(target, mode="r+")
    check_compatible(cache.path, cache.spec, spec)
    cache.ledger.claim_ttl = cfg.claim_ttl

    run = os.environ.get("TORCHELASTIC_RUN_ID", "") + f"-{uuid.uuid4().hex[:8]}"
    blocks = [b for b in range(spec.num_blocks) if b % ctx.world_size == ctx.rank]
    done = cache.ledger.done_units()
    views_todo = sum(len(range(*spec.block_bounds(b))) for b in blocks for s in cfg.seeds if b not in done.get(s, ()))
    runner = TeacherRunner(model, tinfo, device, cfg.amp, cfg.compile, cfg.topk)
    labels = split.labels
    workers = cfg.workers or default_render_threads(device)

    # sized by the first pass's chunks (later passes with fewer seeds have larger batches, so fewer per chunk)
    views = min(len(cfg.seeds), cfg.seeds_per_pass)
    per_batch = samples_per_batch(cfg.batch_size, views, recipe)
    out_q: queue.Queue = queue.Queue(maxsize=queue_depth(batches_per_render(per_batch, views, workers)))
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(cache, split, recipe, cfg, blocks, run, out_q, stop, workers, device.type == "cuda"),
                                daemon=True, name="kdcache-render")
    lines = ProgressLines(cfg.progress)   # not a terminal: a plain line every 10 s instead of the bar
    bar = tqdm(total=views_todo, unit="view", desc=f"dump rank {ctx.rank}", file=sys.stderr,
               disable=lines.tqdm_disabled(cfg.progress), mininterval=1.0, smoothing=0.05)
    log = {"run": run, "rank": ctx.rank, "world_size": ctx.world_size, "device": str(device), "amp": runner.amp,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "teacher"},
           "teacher": tinfo, "units": [], "lost": []}
    state = {}
    views_done = samples_done = 0
    t_forward = 0.0
    t_loop = time.time()
    writer = UnitWriter()
    in_flight = None    # (TopkResult, pass id, c0, c1): one batch queued on the device ahead of its results

    def finish_batch():
        """Store the results of the batch in flight into its pass's arrays."""
        nonlocal in_flight, t_forward, views_done, samples_done
        if in_flight is None:
            return
        result, pid, c0, c1 = in_flight
        in_flight = None
        t = time.perf_counter()
        logp, indices, log_tail = result.get()
        t_forward += time.perf_counter() - t
        st = state[pid]
        a = spec.block_bounds(st["block"])[0]
        nv = len(st["seeds"])
        rows = slice(c0 - a, c1 - a)
        st["logp"][:, rows] = logp.reshape(c1 - c0, nv, -1).transpose(1, 0, 2)
        st["indices"][:, rows] = indices.reshape(c1 - c0, nv, -1).transpose(1, 0, 2)
        st["log_tail"][:, rows] = log_tail.reshape(c1 - c0, nv).T
        st["correct"] += (st["indices"][:, rows, 0] == labels[c0:c1][None, :]).sum(1)
        views_done += logp.shape[0]
        samples_done += c1 - c0
        bar.update(logp.shape[0])
        elapsed = time.time() - t_loop
        bar.set_postfix_str(f"{samples_done / elapsed:.0f} img/s", refresh=False)
        if lines.due():
            lines.line(f"dump rank {ctx.rank}: {views_done}/{views_todo} views, {samples_done / elapsed:.0f} img/s, "
                       + rate_eta(views_done, views_todo, elapsed, "view"))

    cache.ledger.start_heartbeat()
    producer.start()
    try:
        while True:
            item = out_q.get()
            kind = item[0]
            if kind != "chunk":
                finish_batch()
            if kind == "done":
                break
            if kind == "error":
                raise item[1]
            if kind == "waiting":
                bar.set_postfix_str(f"waiting for {item[1]} units held by other writers", refresh=True)
                if lines.due():
                    lines.line(f"dump rank {ctx.rank}: waiting for {item[1]} units held by other writers")
            elif kind == "pass":
                _, pid, block, seeds, params = item
                a, b = spec.block_bounds(block)
                n, k = b - a, cfg.topk
                state[pid] = {"block": block, "seeds": seeds, "params": params, "t0": time.time(),
                              "logp": np.empty((len(seeds), n, k), np.float32),
                              "indices": np.empty((len(seeds), n, k), np.int64),
                              "log_tail": np.empty((len(seeds), n), np.float32),
                              "correct": np.zeros(len(seeds), np.int64)}
            elif kind == "chunk":      # one or more teacher batches of per_batch samples
                _, pid, c0, c1, images, per_batch = item
                for s0 in range(0, c1 - c0, per_batch):
                    batch = images[s0:s0 + per_batch]
                    t = time.perf_counter()
                    launched = (runner.launch(batch.reshape(-1, *batch.shape[2:])), pid, c0 + s0, c0 + s0 + len(batch))
                    t_forward += time.perf_counter() - t
                    finish_batch()      # the previous batch's results, while this one runs on the device
                    in_flight = launched
                continue
            elif kind == "end":
                st = state.pop(item[1])
                writer.put(lambda st=st: _finish_pass(cache, st, log, {"run": run, "rank": ctx.rank,
                                                                       "device": device.type, "amp": runner.amp}))
        writer.close()
    except BaseException as exc:
        stop.set()
        writer.close(raise_error=False)
        cache.ledger.stop_heartbeat()
        cache.ledger.release_all()  # give unfinished units back at once (no waiting for a TTL)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(exc, cache.path) from None
        raise
    finally:
        bar.close()
    cache.ledger.stop_heartbeat()
    producer.join()
    elapsed = time.time() - t_loop
    total_views = ctx.all_sum(float(views_done))
    total_samples = ctx.all_sum(float(samples_done))
    ctx.barrier()
    summary = {"cache": cache.path, "seeds_requested": cfg.seeds, "seeds_complete": cache.complete_seeds(),
               "views_written": int(total_views), "views_written_this_rank": views_done,
               "seconds": round(time.time() - t_start, 2), "loop_seconds": round(elapsed, 2),
               # all ranks together (each rank's loop time is about the same: they end at one barrier)
               "views_per_s": total_views / elapsed if elapsed > 0 and total_views else None,
               "img_per_s": total_samples / elapsed if elapsed > 0 and total_samples else None,
               "forward_seconds": round(t_forward, 2), "world_size": ctx.world_size,
               "bytes_on_disk": cache.bytes_on_disk()}
    log["summary"] = summary
    name = f"logs/dump-{time.strftime('%Y%m%dT%H%M%S')}-{run.strip('-')}-rank{ctx.rank}.json"
    try:
        cache.location.write(name, json.dumps(log, indent=1).encode())
    except OSError as exc:  # the units are written and marked: a log that does not fit is not worth failing for
        print(f"kdcache: warning: could not write the dump log {name}: {exc}", file=sys.stderr)
    ctx.close()
    return summary
