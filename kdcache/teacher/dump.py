"""`kdcache dump-teacher`: run the teacher once over views (i, s) of the train split, store top-k.

Work is split into units (seed, block of `unit_size` samples) = one Zarr shard per array. A process
takes whole blocks (block b goes to rank b mod world size) and, for each block, every seed of the run
that is not done yet: each image is decoded once and all its missing views are rendered from it. A
unit's four shards are written whole, then its completion marker is created; re-running the same
command skips finished units, so an interrupted dump resumes, with any world size.
"""

import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from kdcache.augment.params import ParamLayout, view_params
from kdcache.augment.recipe import ViewRecipe
from kdcache.augment.render import SampleBuffers, render_samples
from kdcache.cache.schema import MAX_SEED, CacheSpec, TeacherCache, check_compatible, encode_logp
from kdcache.data.dataset import PreparedDataset
from kdcache.dist import init_from_env, resolve_amp, resolve_device
from kdcache.errors import KdcacheError
from kdcache.models import ModelSpec, Normalize, build_model, forward_u8


@dataclass
class DumpConfig:
    data: Path
    out: Path
    seeds: List[int]
    topk: int
    teacher: ModelSpec
    recipe: Optional[ViewRecipe] = None     # None: the dataset's view size with default settings
    global_seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    amp: str = "auto"                       # bf16 | fp16 | off | auto (bf16 on CUDA, off on CPU)
    compile: bool = False
    workers: Optional[int] = None           # render threads (default: usable cores)
    values_dtype: str = "uint16"            # top-k log-probabilities: uint16 fixed point or float32
    unit_size: int = 32768
    claim_ttl: float = 3600.0
    progress: bool = True
    split: str = "train"

    def validate(self) -> None:
        """Settings checked before anything is opened or created."""
        if not self.seeds:
            raise KdcacheError("--seeds: no seeds to dump")
        bad = [s for s in self.seeds if not 0 <= s <= MAX_SEED]
        if bad:
            raise KdcacheError(f"--seeds: seeds are integers from 0 to {MAX_SEED}, got {bad[0]}")
        if self.batch_size < 1:
            raise KdcacheError(f"--batch-size must be positive, got {self.batch_size}")


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
    def topk_outputs(self, views_nhwc: np.ndarray):
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
        return logp.float().cpu().numpy(), indices.cpu().numpy(), log_tail.float().cpu().numpy()


def _dataset_identity(ds: PreparedDataset, split_name: str) -> dict:
    split = ds.split(split_name)
    return {"fingerprint": ds.fingerprint, "split": split_name, "split_fingerprint": split.fingerprint,
            "num_samples": split.num_samples, "num_classes": ds.num_classes, "view_size": ds.view_size,
            "path": str(ds.root.resolve())}


QUEUE_DEPTH = 4
# A slot is rewritten only after RING_SLOTS - 1 later chunks were rendered; the queue holds at most
# QUEUE_DEPTH of them, so the consumer has finished with the slot (its forward ends in a device->host sync).
RING_SLOTS = QUEUE_DEPTH + 4


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


def _produce(cache: TeacherCache, split, recipe: ViewRecipe, cfg: DumpConfig, blocks: List[int], run: str,
             out_q: queue.Queue, stop: threading.Event, workers: int, pinned: bool):
    """Producer thread: claim units, compute view parameters, read and render chunks of samples."""
    import numba
    numba.set_num_threads(workers)
    spec = cache.spec
    reader = split.jpeg_reader()
    scratch = SampleBuffers()
    layout = ParamLayout.of(recipe)
    ring = OutputRing(RING_SLOTS, pinned=pinned)
    try:
        for block in blocks:
            todo = [s for s in cfg.seeds if not cache.ledger.is_done(s, block)]
            seeds = [s for s in todo if cache.ledger.claim(s, block, run)]
            skipped = [s for s in todo if s not in seeds]
            if skipped:
                out_q.put(("held", block, skipped))
            if not seeds:
                continue
            a, b = spec.block_bounds(block)
            idx = np.arange(a, b)
            heights, widths = split.sizes[a:b, 0], split.sizes[a:b, 1]
            params = np.stack([view_params(recipe, cfg.global_seed, s, idx, heights, widths, spec.num_samples)
                               for s in seeds], 1)
            out_q.put(("block", block, seeds, params))
            per_chunk = max(1, cfg.batch_size // len(seeds))
            if recipe.mixing:  # whole mixing blocks per chunk: both partners of every pair are rendered together
                per_chunk = max(1, per_chunk // recipe.mix_block) * recipe.mix_block
            for c0 in range(a, b, per_chunk):
                if stop.is_set():
                    return
                c1 = min(c0 + per_chunk, b)
                jpegs = [reader[i] for i in range(c0, c1)]
                out = ring.next((c1 - c0, len(seeds), recipe.size, recipe.size, 3))
                images = render_samples(jpegs, heights[c0 - a:c1 - a], widths[c0 - a:c1 - a], params[c0 - a:c1 - a],
                                        recipe.size, layout, what=f"{split.name} sample {c0} +", out=out, buffers=scratch)
                out_q.put(("chunk", block, c0, c1, images))
            out_q.put(("end", block))
    except BaseException as exc:  # handed to the main thread, which raises it
        out_q.put(("error", exc))
    finally:
        out_q.put(("done",))
        reader.close()


def _write_unit(cache: TeacherCache, seed: int, block: int, logp, indices, log_tail, params) -> None:
    a, b = cache.spec.block_bounds(block)
    arrays = cache.arrays(seed)
    arrays["logp"][a:b] = encode_logp(logp, cache.spec.values_dtype)
    arrays["indices"][a:b] = indices.astype(cache.spec.indices_dtype)
    arrays["log_tail"][a:b] = log_tail.astype(np.float32)
    arrays["params"][a:b] = params.astype(np.float32)


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
    spec = CacheSpec(teacher=tinfo, dataset=_dataset_identity(ds, cfg.split), recipe=recipe.to_dict(),
                     global_seed=cfg.global_seed, topk=cfg.topk, values_dtype=cfg.values_dtype,
                     # one inner chunk per shard: students read whole slabs (BENCHMARKS.md)
                     unit_size=cfg.unit_size, chunk_rows=cfg.unit_size)
    # The coordinator alone creates arrays and writes metadata; the others wait, then check the identity.
    error = None
    if ctx.is_coordinator:
        try:
            TeacherCache.create_or_open(cfg.out, spec, cfg.seeds)
        except KdcacheError as exc:
            error = exc
    ctx.barrier()
    if ctx.all_sum(1.0 if error else 0.0):
        raise error or KdcacheError(f"{cfg.out}: the coordinator (rank 0) could not create or open the cache")
    cache = TeacherCache.open(cfg.out, mode="r+")
    check_compatible(cache.path, cache.spec, spec)
    cache.ledger.claim_ttl = cfg.claim_ttl

    run = os.environ.get("TORCHELASTIC_RUN_ID", "") + f"-{uuid.uuid4().hex[:8]}"
    blocks = [b for b in range(spec.num_blocks) if b % ctx.world_size == ctx.rank]
    done = {s: cache.ledger.done_blocks(s) for s in cfg.seeds}
    views_todo = sum(len(range(*spec.block_bounds(b))) for b in blocks for s in cfg.seeds if b not in done[s])
    runner = TeacherRunner(model, tinfo, device, cfg.amp, cfg.compile, cfg.topk)
    labels = split.labels
    workers = cfg.workers or len(os.sched_getaffinity(0))

    out_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(cache, split, recipe, cfg, blocks, run, out_q, stop, workers, device.type == "cuda"),
                                daemon=True, name="kdcache-render")
    bar = tqdm(total=views_todo, unit="view", desc=f"dump rank {ctx.rank}", file=sys.stderr,
               disable=not cfg.progress or None, mininterval=1.0, smoothing=0.05)
    log = {"run": run, "rank": ctx.rank, "world_size": ctx.world_size, "device": str(device), "amp": runner.amp,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "teacher"},
           "teacher": tinfo, "units": [], "held_elsewhere": []}
    state = {}
    views_done = samples_done = 0
    t_forward = 0.0
    t_loop = time.time()
    producer.start()
    try:
        while True:
            item = out_q.get()
            kind = item[0]
            if kind == "done":
                break
            if kind == "error":
                raise item[1]
            if kind == "held":
                log["held_elsewhere"].append({"block": item[1], "seeds": item[2]})
            elif kind == "block":
                _, block, seeds, params = item
                a, b = spec.block_bounds(block)
                n, k = b - a, cfg.topk
                state[block] = {"seeds": seeds, "params": params, "t0": time.time(),
                                "logp": np.empty((len(seeds), n, k), np.float32),
                                "indices": np.empty((len(seeds), n, k), np.int64),
                                "log_tail": np.empty((len(seeds), n), np.float32),
                                "correct": np.zeros(len(seeds), np.int64)}
            elif kind == "chunk":
                _, block, c0, c1, images = item
                st = state[block]
                a = spec.block_bounds(block)[0]
                nv = len(st["seeds"])
                t = time.perf_counter()
                logp, indices, log_tail = runner.topk_outputs(images.reshape(-1, *images.shape[2:]))
                t_forward += time.perf_counter() - t
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
            elif kind == "end":
                block = item[1]
                st = state.pop(block)
                a, b = spec.block_bounds(block)
                for j, s in enumerate(st["seeds"]):
                    _write_unit(cache, s, block, st["logp"][j], st["indices"][j], st["log_tail"][j], st["params"][:, j])
                    # device and amp: how precise the unit's logits are (verify --replay picks its thresholds by them)
                    cache.ledger.mark_done(s, block, {"views": b - a, "correct": int(st["correct"][j]),
                                                      "run": run, "rank": ctx.rank,
                                                      "device": device.type, "amp": runner.amp})
                log["units"].append({"block": block, "seeds": st["seeds"], "samples": b - a,
                                     "seconds": round(time.time() - st["t0"], 3)})
    except BaseException:
        stop.set()
        for block, st in state.items():  # give unfinished units back at once (no waiting for a TTL)
            for s in st["seeds"]:
                cache.ledger.release(s, block)
        raise
    finally:
        bar.close()
    producer.join()
    elapsed = time.time() - t_loop
    total_views = ctx.all_sum(float(views_done))
    total_samples = ctx.all_sum(float(samples_done))
    ctx.barrier()
    if ctx.is_coordinator:
        cache.refresh_summary()
    ctx.barrier()
    summary = {"cache": str(cache.path), "seeds_requested": cfg.seeds, "seeds_complete": cache.complete_seeds(),
               "views_written": int(total_views), "views_written_this_rank": views_done,
               "seconds": round(time.time() - t_start, 2), "loop_seconds": round(elapsed, 2),
               # all ranks together (each rank's loop time is about the same: they end at one barrier)
               "views_per_s": total_views / elapsed if elapsed > 0 and total_views else None,
               "img_per_s": total_samples / elapsed if elapsed > 0 and total_samples else None,
               "forward_seconds": round(t_forward, 2), "world_size": ctx.world_size,
               "bytes_on_disk": cache.bytes_on_disk()}
    log["summary"] = summary
    log_dir = cache.path / "logs"
    log_dir.mkdir(exist_ok=True)
    (log_dir / f"dump-{time.strftime('%Y%m%dT%H%M%S')}-{run.strip('-')}-rank{ctx.rank}.json").write_text(json.dumps(log, indent=1))
    ctx.close()
    return summary
