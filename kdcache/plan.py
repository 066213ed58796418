"""`kdcache plan`: what a cache will cost before it is made, and after how many students it pays for itself
(docs/planning.md writes out every formula and assumption).

Measured on this machine in seconds, each replaced by a rate given for another machine (--render-rate,
--forward-rate, --student-rate):
- the renderer's views/s at the recipe, through the dump's own render path (kdcache.teacher.dump.render_chunks:
  one read per shard run, the dump's chunks, its thread count and views per decode) over real samples of the
  prepared dataset, or over synthetic JPEGs when the dataset is not prepared yet;
- the teacher's forward, views/s at the dump's batch (kdcache.teacher.runner.TeacherRunner: the dump's amp,
  channels_last, top-k and host copy) on those rendered views;
- with a student named: its train step (forward, loss, backward, SGD step) at the student's batch, the
  teacher's forward at that batch (online KD), and the renderer at one view per decode (the student's loader).
The bytes of a view come from real rows: the teacher's answers to the rendered views and their view
parameters, written through the cache's own Zarr layout and codecs (kdcache.cache.schema) into a temporary
directory, whose files are then counted. The rest is arithmetic (estimate), kept apart so that it can be
checked by hand.
"""

import argparse
import dataclasses
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from kdcache import options
from kdcache.augment.recipe import ViewRecipe, recipe_from_given
from kdcache.errors import KdcacheError
from kdcache.models import ModelSpec

MIN_SECONDS = 2.0       # each timing runs at least this long after its warm-up call (and at least MIN_CALLS calls):
MIN_CALLS = 2           # on a shared machine a longer window averages more of its load's swings
ROW_VIEWS = 2048        # views whose rows are encoded for the bytes on disk (2,048 rows of the demo's cache: 26.7
                        # bytes a row, the whole 10,000-row seed 26.6; docs/planning.md)
ROW_SECONDS = 10.0      # with --forward-rate given, the teacher answers views for the rows this long at most
ROW_BATCH = 16          # ... in batches of this many views (a big teacher on a CPU stays within the time)
KEPT_BYTES = 256 << 20  # rendered views kept for the teacher at most (2,048 views at 224 px would be 308 MB)
SYNTHETIC_IMAGES = 64   # distinct synthetic JPEGs rendered without --data (then reused)


@dataclass
class PlanConfig:
    """What `kdcache plan` plans: a dump of `seeds` over the train split of `data` (or of a dataset not
    prepared yet: samples_count images of image_size pixels a side, num_classes classes) with `teacher`, and
    a student trained `epochs` epochs at `student_batch_size` from it or with the teacher online."""
    seeds: List[int]
    teacher: ModelSpec
    topk: int = 10
    data: Optional[Path] = None
    samples_count: Optional[int] = None
    num_classes: Optional[int] = None
    image_size: Optional[int] = None
    recipe: Optional[ViewRecipe] = None     # None: the dataset's view size (or image_size) with default settings
    targets: str = "topk"
    samples: int = 0
    values_dtype: str = "uint16"
    student: Optional[str] = None           # timm model name
    student_batch_size: int = 64
    epochs: int = 3
    devices: int = 1
    batch_size: int = 256
    device: str = "auto"
    amp: str = "auto"
    workers: Optional[int] = None           # render threads (default: the dump's)
    seeds_per_pass: int = 32
    forward_rate: Optional[float] = None    # views/s, one device, at batch_size: replaces the measurement
    render_rate: Optional[float] = None     # views/s of the renderer feeding one device
    student_rate: Optional[float] = None    # img/s of the student's train step on one device

    @classmethod
    def from_options(cls, ns: argparse.Namespace) -> "PlanConfig":
        """The PlanConfig of `kdcache plan` options. The recipe's size, unless given, is the dataset's view size
        (the one file read here), or without --data the --image-size."""
        from kdcache.teacher.config import DEFAULT_SAMPLES, view_size
        options.check_needed("plan", ns)
        values = options.config_values("plan", ns)
        teacher = values.pop("teacher")
        teacher["seed"] = teacher["seed"] if teacher["seed"] is not None else 0
        values["teacher"] = ModelSpec(**teacher)
        if values["targets"] != "topk" and not values["samples"]:
            values["samples"] = DEFAULT_SAMPLES
        given = values.pop("recipe")
        cfg = options.make_config(cls, values)
        cfg.validate()   # (--data, or the split described: before a file is read)
        size = given.get("size") or (view_size(ns.data) if ns.data else values["image_size"])
        if not size:
            raise KdcacheError("plan without --data needs --image-size (or the view size, --size)")
        cfg.recipe = recipe_from_given(given, size)
        return cfg

    def validate(self) -> None:
        """Settings checked before anything is measured (the class count, from --data, is checked later)."""
        if not self.seeds:
            raise KdcacheError("--seeds: no seeds to plan for")
        loose = [f for f, v in (("--samples-count", self.samples_count), ("--num-classes", self.num_classes),
                                ("--image-size", self.image_size)) if v is not None]
        if self.data is not None and loose:
            raise KdcacheError(f"{' and '.join(loose)}: the prepared dataset --data {self.data} says these; "
                               "give them only for a dataset not prepared yet")
        if self.data is None and (self.samples_count is None or self.num_classes is None):
            raise KdcacheError("plan needs --data (a prepared dataset) or, for one not prepared yet, "
                               "--samples-count and --num-classes (and --image-size)")
        if self.student_rate is not None and not self.student:
            raise KdcacheError("--student-rate is the rate of a student: name it with --student")
        if self.recipe is not None:
            self.recipe.validate()


# ---- the dataset or its stand-in -------------------------------------------------------------------
class _SyntheticReader:
    """JPEG bytes of a dataset not prepared yet: SYNTHETIC_IMAGES square images (smooth patterns with noise,
    as tools/make_synthetic_imagefolder.py), encoded once by the dataset's own encoder, reused in turn."""

    def __init__(self, side: int):
        from kdcache.data.canonical import CanonicalSettings, canonicalize
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        self.jpegs = []
        for _ in range(SYNTHETIC_IMAGES):
            chans = [127 + 110 * np.sin(rng.uniform(0.005, 0.08) * yy + rng.uniform(0.005, 0.08) * xx
                                        + rng.uniform(0, 6.3)) for _ in range(3)]
            rgb = (np.stack(chans, -1) + rng.normal(0, 12, (side, side, 3))).clip(0, 255).astype(np.uint8)
            self.jpegs.append(canonicalize(rgb, CanonicalSettings(max_side=None)).jpeg)

    def read_range(self, a: int, b: int):
        parts = [self.jpegs[i % len(self.jpegs)] for i in range(a, b)]
        lengths = np.array([len(p) for p in parts], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return np.frombuffer(b"".join(parts), np.uint8), offsets, lengths

    def close(self) -> None:
        pass


@dataclass
class _Sample:
    """The split being planned for, and the first samples of it that are rendered here."""
    num_samples: int
    num_classes: int
    recipe: ViewRecipe
    sizes: np.ndarray                       # (n, 2) heights and widths of the rendered samples
    reader: object                          # read_range(a, b) -> (data, offsets, lengths); close()
    source: str                             # what the rendered samples are, in words
    name: str = "train"


def open_sample(cfg: PlanConfig, count: int) -> _Sample:
    """The train split of --data (its first `count` samples are rendered), or a stand-in of synthetic images."""
    if cfg.data is not None:
        from kdcache.data.dataset import PreparedDataset
        ds = PreparedDataset.open(cfg.data)
        split = ds.split("train")
        n = min(count, split.num_samples)
        return _Sample(split.num_samples, ds.num_classes, cfg.recipe, split.sizes[:n], split.jpeg_reader(),
                       f"the first {n:,} samples of {cfg.data}")
    side = cfg.image_size or cfg.recipe.size
    n = min(count, cfg.samples_count)
    return _Sample(cfg.samples_count, cfg.num_classes, cfg.recipe, np.full((n, 2), side, np.int64),
                   _SyntheticReader(side), f"{n:,} samples, {SYNTHETIC_IMAGES} synthetic {side}x{side} JPEGs in turn")


def planned_spec(cfg: PlanConfig, num_samples: int, *, num_classes: int, recipe: ViewRecipe):
    """The CacheSpec the dump would write (its validation names a --topk above the class count, a --targets
    sampled without a tail, ...); num_samples smaller for the rows encoded here."""
    from kdcache.cache.schema import CacheSpec
    from kdcache.teacher.target import DEFAULT_UNIT_SIZE
    spec = CacheSpec(teacher={"name": cfg.teacher.name, "num_classes": num_classes},
                     dataset={"num_samples": num_samples, "num_classes": num_classes}, recipe=recipe.to_dict(),
                     global_seed=0, topk=cfg.topk, values_dtype=cfg.values_dtype, unit_size=DEFAULT_UNIT_SIZE,
                     chunk_rows=DEFAULT_UNIT_SIZE, targets=cfg.targets, samples=cfg.samples)
    spec.validate()
    return spec


# ---- timing ------------------------------------------------------------------------------------------
@contextmanager
def torch_threads(n: int):
    """Torch's CPU threads set to n for the block. The real commands differ here, and it matters: dump-teacher's
    process imports FFCV (kdcache.augment.render), whose compiler sets torch to one thread at import
    (ffcv/pipeline/compiler.py, Compiler.set_num_threads(1)), and builds no FFCV Loader, so its teacher runs on
    one thread; train-student's FFCV Loader sets them to its --workers (all usable cores). On the shared 2-core
    machine a test_resnet step took 0.08 s on one thread and 2.2 s on two (BENCHMARKS.md, issue 21)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


DUMP_TORCH_THREADS = 1      # dump-teacher's, on the CPU (torch_threads)


def _sync(device) -> None:
    if device is not None and device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def timed(call, device=None) -> float:
    """Seconds per call of `call()`: one warm-up call (compilation, caches, cudnn's choice), then calls until
    MIN_SECONDS have passed and at least MIN_CALLS were made; the mean, as a run of many calls would see it."""
    call()
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while calls < MIN_CALLS or time.perf_counter() - t0 < MIN_SECONDS:
        call()
        calls += 1
        _sync(device)
    return (time.perf_counter() - t0) / calls


# ---- the renderer ----------------------------------------------------------------------------------
def _params(sample: _Sample, seeds: List[int]) -> np.ndarray:
    """(n, V, P) view parameters of the rendered samples for the first pass's seeds, as the dump makes them."""
    from kdcache.augment.params import view_params
    idx = np.arange(len(sample.sizes))
    return np.stack([view_params(sample.recipe, 0, s, idx, sample.sizes[:, 0], sample.sizes[:, 1], sample.num_samples)
                     for s in seeds], 1)


class Renderer:
    """The dump's render path (kdcache.teacher.dump.render_chunks: its chunks of whole teacher batches, the next
    chunk's JPEGs read meanwhile, its output ring and reused buffers) on `workers` numba threads, kept across
    passes as the dump keeps them."""

    def __init__(self, sample: _Sample, batch_size: int, workers: int, queued: int = 2):
        from concurrent.futures import ThreadPoolExecutor
        from kdcache.augment.render import SampleBuffers
        from kdcache.teacher.dump import ring_slots
        from kdcache.teacher.runner import OutputRing
        self.sample, self.batch_size, self.workers = sample, batch_size, workers
        self.read_ahead = ThreadPoolExecutor(1, thread_name_prefix="kdcache-plan-read")
        self.ring, self.buffers = OutputRing(ring_slots(queued), pinned=False), SampleBuffers()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.read_ahead.shutdown(wait=True)

    def per_batch(self, params: np.ndarray) -> int:
        from kdcache.teacher.dump import samples_per_batch
        return samples_per_batch(self.batch_size, params.shape[1], self.sample.recipe)

    def chunks(self, params: np.ndarray, start: int = 0):
        """The views of samples start.. (params: their rows, (n, V, P)), chunk by chunk: (c0, c1, views) with
        c0, c1 counted from start; a chunk's views stay valid until the ring comes round to its slot again."""
        import numba
        from kdcache.teacher.dump import render_chunks
        before = numba.get_num_threads()
        numba.set_num_threads(self.workers)   # (per calling thread, as the dump's producer sets it)
        try:
            for c0, c1, views in render_chunks(self.sample.reader, self.read_ahead, self.sample, self.sample.recipe,
                                               params, start, start + len(params), self.per_batch(params),
                                               self.workers, self.ring, self.buffers):
                yield c0 - start, c1 - start, views
        finally:
            numba.set_num_threads(before)

    def render(self, params: np.ndarray, keep=None, start: int = 0) -> int:
        """Render the views once; `keep` (m, V, size, size, 3): a copy of the first m samples' views goes there.
        Returns the views rendered."""
        for c0, c1, views in self.chunks(params, start):
            if keep is not None and c0 < len(keep):   # the first samples' views, for the teacher
                keep[c0:min(c1, len(keep))] = views[:len(keep) - c0]
        return params.shape[0] * params.shape[1]


def measure_render(sample: _Sample, params: np.ndarray, batch_size: int, workers: int) -> float:
    """Views/s of the dump's renderer over the sample (the first pass also compiles or loads the kernels)."""
    with Renderer(sample, batch_size, workers) as renderer:
        return params.shape[0] * params.shape[1] / timed(lambda: renderer.render(params))


def measure_together(sample: _Sample, params: np.ndarray, runner, cfg: PlanConfig, workers: int) -> float:
    """Views/s of the render and the teacher's forward running together as in the dump on a CPU, where they share
    the cores: a render thread (the dump's producer) hands chunks through a bounded queue to this thread's
    forward in the dump's batches (its consumer). On the shared 2-core machine this was 0.85-0.9 of what the
    two rates measured apart add up to (docs/planning.md)."""
    import queue
    import threading
    from kdcache.teacher.dump import QUEUED_BATCHES
    done = object()
    with Renderer(sample, cfg.batch_size, workers, queued=QUEUED_BATCHES) as renderer:
        per_batch = renderer.per_batch(params)

        def one_pass() -> None:
            chunks: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
            failed = []

            def produce():
                try:
                    for _, _, views in renderer.chunks(params):
                        chunks.put(views)
                except BaseException as exc:   # raised in this thread below
                    failed.append(exc)
                finally:
                    chunks.put(done)
            producer = threading.Thread(target=produce, name="kdcache-plan-render")
            producer.start()
            while (views := chunks.get()) is not done:
                for s0 in range(0, len(views), per_batch):
                    batch = views[s0:s0 + per_batch]
                    target_rows(runner, batch.reshape(-1, *batch.shape[2:]), cfg)
            producer.join()
            if failed:
                raise failed[0]
        return params.shape[0] * params.shape[1] / timed(one_pass)


# ---- the teacher -----------------------------------------------------------------------------------
def target_rows(runner, views: np.ndarray, cfg: PlanConfig):
    """(logp, indices, log_tail) numpy rows of a batch of views, as the dump stores them: the runner's
    top-k; for sampled targets the top-k and cfg.samples draws from the tail (kdcache.cache.targets.draw_tail)."""
    if cfg.targets == "topk":
        return runner.topk_outputs(views)
    import torch
    from kdcache.cache.targets import draw_tail
    logits = runner.logits(views).double()
    logp = logits - torch.logsumexp(logits, 1, keepdim=True)
    top_logp, top = logp.topk(cfg.topk, 1)
    uniforms = torch.rand(len(views), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    classes, draw_logp, log_s = draw_tail(logits, top, cfg.samples, 1.0, uniforms, cfg.targets == "sampled-cv",
                                          cfg.values_dtype)
    return (torch.cat([top_logp, draw_logp], 1).float().cpu().numpy(), torch.cat([top, classes], 1).cpu().numpy(),
            log_s.float().cpu().numpy())


def _batches(views: np.ndarray, size: int):
    """Batches of `size` views taken in turn from `views`, every view once per round (a batch across the end
    continues at the start: the only one copied)."""
    n, i = len(views), 0
    while True:
        if i + size <= n:
            yield views[i:i + size]
        else:
            yield np.concatenate([views[i:]] + [views] * ((i + size - n) // n) + [views[:(i + size - n) % n]])
        i = (i + size) % n


def measure_forward(runner, views: np.ndarray, batch_views: int, cfg: PlanConfig, device):
    """(views/s of the teacher at the dump's batch, the rows of every kept view). The timed calls cycle over the
    kept views; the rows are the answers to each of them once (the first calls' own answers)."""
    rows: List[tuple] = []
    batches = _batches(views, batch_views)
    need = math.ceil(len(views) / batch_views)

    def call():
        out = target_rows(runner, next(batches), cfg)
        if len(rows) < need:
            rows.append(out)
    seconds = timed(call, device)
    while len(rows) < need:
        call()
    return batch_views / seconds, _concat_rows(rows, len(views))


def rows_within(runner, sample: _Sample, params: np.ndarray, cfg: PlanConfig, workers: int):
    """With the forward rate given: the rows of the views of the first samples, rendered a sample at a time and
    answered ROW_BATCH views at a time, for ROW_SECONDS after the first batch (which may compile the renderer),
    ROW_VIEWS at most."""
    v, size = params.shape[1], sample.recipe.size
    rows, t0, a = [], None, 0
    with Renderer(sample, cfg.batch_size, workers) as renderer:
        while a < len(params) and a * v < ROW_VIEWS:
            views = np.empty((1, v, size, size, 3), np.uint8)
            renderer.render(params[a:a + 1], views, start=a)
            for i in range(0, v, ROW_BATCH):
                if t0 is not None and time.perf_counter() - t0 > ROW_SECONDS:
                    return _concat_rows(rows, a * v + i)
                rows.append(target_rows(runner, views.reshape(-1, size, size, 3)[i:i + ROW_BATCH], cfg))
                t0 = t0 or time.perf_counter()
            a += 1
    return _concat_rows(rows, a * v)


def _concat_rows(rows, n: int):
    return tuple(np.concatenate([r[i] for r in rows])[:n] for i in range(3))


# ---- the student -----------------------------------------------------------------------------------
def measure_student(cfg: PlanConfig, num_classes: int, size: int, device, amp: str) -> float:
    """Img/s of the student's train step at its batch and the view size: uint8 views normalised on the device,
    channels_last, forward under autocast, cross-entropy plus KL to soft targets (train-student's KD loss), backward,
    SGD step. The inputs are random: the step's time does not depend on the pixels."""
    import torch
    import torch.nn.functional as F
    from kdcache.dist import resolve_amp
    from kdcache.models import IMAGENET_MEAN, IMAGENET_STD, Normalize, create_timm_model
    amp_dtype, _ = resolve_amp(amp, device)
    model = create_timm_model(cfg.student, num_classes, what="student").to(device, memory_format=torch.channels_last)
    model.train()
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    b = cfg.student_batch_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (b,), generator=gen).to(device)
    soft = torch.softmax(torch.randn(b, num_classes, generator=gen), 1).to(device)

    def step():
        x = normalize(images).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        loss = F.cross_entropy(logits, labels) + F.kl_div(F.log_softmax(logits, 1), soft, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return b / timed(step, device)


def measure_online_teacher(runner, views: np.ndarray, batch: int, device) -> float:
    """Img/s of the teacher's forward at the student's batch (online KD runs it on every batch: the same
    forward_u8 path, amp and channels_last)."""
    batches = _batches(views, batch)
    return batch / timed(lambda: runner.logits(next(batches)), device)


# ---- the bytes ---------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Arrays written through the cache's own layout and codecs: their bytes, the time to write and read them."""
    chunk_bytes: Dict[str, int]     # by array: its chunk files (with their shard index)
    metadata_bytes: int             # the zarr.json documents of the group and its arrays (a fixed cost per seed)
    write_seconds: float
    read_seconds: float


def stored_form(spec, logp, indices, log_tail, params) -> Dict[str, np.ndarray]:
    """The arrays of a seed as the cache stores them (kdcache.cache.schema): uint16 or float32 log-probabilities,
    int16 or int32 indices, float32 log tail mass and view parameters."""
    from kdcache.cache.schema import encode_logp
    return {"logp": encode_logp(logp, spec.values_dtype), "indices": indices.astype(spec.indices_dtype),
            "log_tail": log_tail.astype(np.float32), "params": params.astype(np.float32)}


def encode_rows(make_spec, data: Dict[str, np.ndarray]) -> Encoded:
    """Write the arrays of `data` (each of its own length n: the layout of make_spec(n), kdcache.cache.schema's:
    one chunk per unit, the cache's Blosc/zstd codecs, the params transposed) as one seed's group into a
    temporary directory; count its files; read them back (the fastest of READS: the page cache, as a slab read
    right after the dump)."""
    import zarr
    from kdcache.cache.schema import _array_layout, _codecs
    with tempfile.TemporaryDirectory(prefix="kdcache-plan-") as tmp:
        group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w")
        arrays = {}
        for name, values in data.items():   # created ahead, as the dump creates a seed's arrays once
            kw = _array_layout(make_spec(len(values)))[name]
            arrays[name] = group.create_array(name, compressors=_codecs(kw["dtype"]), **kw)
        t0 = time.perf_counter()
        for name, array in arrays.items():
            array[:] = data[name]
        write = time.perf_counter() - t0
        read = min(_read_all(tmp, data) for _ in range(READS))
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
    chunks = {a: sum(v for k, v in files.items() if k.startswith(a + "/") and not k.endswith("zarr.json"))
              for a in data}
    return Encoded(chunks, sum(v for k, v in files.items() if k.endswith("zarr.json")), write, read)


READS = 3


def _read_all(where: str, names) -> float:
    import zarr
    t0 = time.perf_counter()
    for name in names:
        zarr.open_array(zarr.storage.LocalStore(where), path=name, mode="r")[:]
    return time.perf_counter() - t0


@dataclass
class DiskCost:
    """A seed's bytes on disk and its write and read times: a part per row and a fixed part."""
    rows: Dict[str, int]        # rows encoded, by array (the view parameters need no teacher: more of them)
    per_row: float              # bytes
    per_shard: float            # bytes: codec headers, the shard index, the fill rows of a partial chunk
    per_seed: int               # bytes: the seed's zarr.json documents
    per_array: Dict[str, float]     # bytes per row, by array
    write_per_row: float        # seconds, encoding and writing (a full chunk's time / its rows)
    read_per_row: float         # seconds, reading back and decoding (the same)


def disk_cost(make_spec, data: Dict[str, np.ndarray], views_per_decode: int, chunk_rows: int) -> DiskCost:
    """The bytes: each array's rows (in the dump's order, V views of each sample in turn; stored here seed by
    seed, as each seed's arrays hold them) encoded twice, all of them and their first half (make_spec(n): the
    CacheSpec of n rows). The difference is the cost of a row: it leaves out what every chunk pays once (codec
    headers, the shard index), which a few rows would otherwise spread over themselves (docs/planning.md: 32
    rows of the demo's cache give 31.1 bytes a row this way against 52.7 whole; 10,000 rows 26.6). The times:
    one chunk of `chunk_rows` rows (the rows repeated to fill it) written and read, as a slab is."""
    data = {a: v[np.argsort(np.arange(len(v)) % views_per_decode, kind="stable")] for a, v in data.items()}
    whole = encode_rows(make_spec, data)
    part = encode_rows(make_spec, {a: v[:len(v) // 2] for a, v in data.items() if len(v) > 1})
    per_array, fixed = {}, 0.0
    for a, v in data.items():
        n, half = len(v), len(v) // 2
        per_array[a] = max(0.0, (whole.chunk_bytes[a] - part.chunk_bytes.get(a, 0)) / (n - half))
        fixed += max(0.0, whole.chunk_bytes[a] - n * per_array[a])
    full = encode_rows(make_spec, {a: v[np.resize(np.arange(len(v)), chunk_rows)] for a, v in data.items()})
    return DiskCost({a: len(v) for a, v in data.items()}, sum(per_array.values()), fixed, whole.metadata_bytes,
                    per_array, full.write_seconds / chunk_rows, full.read_seconds / chunk_rows)


def raw_bytes(spec) -> Dict[str, int]:
    """Uncompressed bytes of one view's row, per array of the cache's layout."""
    from kdcache.cache.schema import _array_layout
    return {name: int(np.prod(kw["shape"][1:], dtype=np.int64)) * np.dtype(kw["dtype"]).itemsize
            for name, kw in _array_layout(spec).items()}


# ---- measuring ---------------------------------------------------------------------------------------
@dataclass
class Rates:
    """Per one device, each measured here or given (sources: name -> 'measured' or the flag that gave it)."""
    render: float                       # views/s of the dump's renderer (its views per decode, its threads)
    forward: float                      # views/s of the teacher's forward at the dump's batch
    loader: Optional[float] = None      # views/s of the renderer at one view per decode (the student's loader)
    student: Optional[float] = None     # img/s of the student's train step at its batch
    online_teacher: Optional[float] = None  # img/s of the teacher's forward at the student's batch
    together: Optional[float] = None    # CPU: views/s of render and forward running together, as in the dump
    sources: Dict[str, str] = field(default_factory=dict)


def _devices(cfg: PlanConfig):
    """(the device measured on, whether the planned one is a separate accelerator). A CUDA device named but not
    here is fine when every rate that needs it is given: the teacher's rows for the bytes then run on the CPU."""
    import torch
    from kdcache.dist import DistContext, resolve_device
    planned = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = torch.device(planned).type != "cpu"
    if accelerator and not torch.cuda.is_available():
        missing = [f for f, v in (("--forward-rate", cfg.forward_rate),
                                  ("--student-rate", cfg.student_rate if cfg.student else 0)) if v is None]
        if missing:
            raise KdcacheError(f"--device {cfg.device}: no CUDA device on this machine to measure on; give "
                               f"{' and '.join(missing)} as measured there")
        return torch.device("cpu"), True
    return resolve_device(planned, DistContext()), accelerator


def views_per_decode(cfg: PlanConfig) -> int:
    """Views rendered from one decoded image in the dump: the seeds of one pass."""
    return min(len(cfg.seeds), cfg.seeds_per_pass)


def sample_counts(cfg: PlanConfig, num_samples: int):
    """(samples opened, rendered, whose views are kept for the teacher): ROW_VIEWS views' worth opened (their
    view parameters are encoded) and kept, within KEPT_BYTES; a mixing recipe renders whole mixing blocks, so
    that its pairs are mixed as in the dump."""
    v, size, recipe = views_per_decode(cfg), cfg.recipe.size, cfg.recipe
    opened = min(math.ceil(ROW_VIEWS / v), num_samples)
    keep = max(1, min(opened, KEPT_BYTES // (v * size * size * 3)))
    render = min(num_samples, math.ceil(keep / recipe.mix_block) * recipe.mix_block) if recipe.mixing else keep
    return max(opened, render), render, keep


def measure(cfg: PlanConfig, sample: _Sample, device, overlap: bool, render_samples: int, keep_samples: int):
    """(Rates, DiskCost): every rate not given, measured here (see the module's docstring), and the teacher's
    rows of the first views encoded through the cache's codecs. `overlap`: the planned device is an
    accelerator (on this machine's CPU, when it is not here: every rate that needs it is given)."""
    from kdcache.option import usable_cores
    from kdcache.teacher.dump import default_render_threads, samples_per_batch
    from kdcache.teacher.target import DEFAULT_UNIT_SIZE
    v, size, sources = views_per_decode(cfg), sample.recipe.size, {}
    workers = cfg.workers or default_render_threads(device)
    params = _params(sample, cfg.seeds[:v])
    runner = _runner(cfg, sample.num_classes, device, stand_in=overlap and device.type == "cpu")
    views = None
    if cfg.forward_rate is None:
        keep = np.empty((keep_samples, v, size, size, 3), np.uint8)
        with Renderer(sample, cfg.batch_size, workers) as renderer:   # (also compiles or loads the renderer)
            renderer.render(params[:render_samples], keep)
        views = keep.reshape(-1, size, size, 3)
        batch_views = samples_per_batch(cfg.batch_size, v, sample.recipe) * v
        with torch_threads(DUMP_TORCH_THREADS):
            forward, rows = measure_forward(runner, views, batch_views, cfg, device)
        sources["forward"] = "measured"
    else:
        forward, rows = cfg.forward_rate, rows_within(runner, sample, params, cfg, workers)
        sources["forward"] = "--forward-rate"
    render = _rate(cfg.render_rate, "render", sources, lambda: measure_render(sample, params[:render_samples],
                                                                              cfg.batch_size, workers))
    make_spec = partial(planned_spec, cfg, num_classes=sample.num_classes, recipe=sample.recipe)
    disk = disk_cost(make_spec, stored_form(make_spec(1), *rows, params.reshape(-1, params.shape[-1])[:ROW_VIEWS]),
                     v, min(sample.num_samples, DEFAULT_UNIT_SIZE))
    rates = Rates(render, forward, sources=sources)
    if not overlap and sources["render"] == sources["forward"] == "measured":
        with torch_threads(DUMP_TORCH_THREADS):
            rates.together = measure_together(sample, params[:render_samples], runner, cfg, workers)
        sources["together"] = "measured"
    if cfg.student:
        rates.loader = _rate(cfg.render_rate, "loader", sources, lambda: measure_render(
            sample, params[:render_samples, :1], cfg.student_batch_size, usable_cores()))
        with torch_threads(usable_cores()):   # as train-student's FFCV Loader sets them
            rates.student = _rate(cfg.student_rate, "student", sources, lambda: measure_student(
                cfg, sample.num_classes, size, device, cfg.amp))
            rates.online_teacher = _rate(cfg.forward_rate, "online_teacher", sources, lambda: measure_online_teacher(
                runner, views, cfg.student_batch_size, device))
    return rates, disk


def _runner(cfg: PlanConfig, num_classes: int, device, stand_in: bool):
    """The dump's TeacherRunner of the teacher. Standing in for an accelerator, the CPU runs it in float32
    (bf16 on a CPU without bf16 units took 336 s for 16 views of a BEiT-B): the rows' bytes hardly differ."""
    from kdcache.models import build_model
    from kdcache.teacher.runner import TeacherRunner
    model, info = build_model(cfg.teacher, num_classes, what="teacher")
    return TeacherRunner(model, info, device, "off" if stand_in else cfg.amp, False, cfg.topk)


RATE_FLAGS = {"render": "--render-rate", "loader": "--render-rate", "forward": "--forward-rate",
              "online_teacher": "--forward-rate", "student": "--student-rate"}


def _rate(given: Optional[float], name: str, sources: Dict[str, str], measure_it) -> float:
    """The rate given on the command line, else measured; its source recorded."""
    sources[name] = RATE_FLAGS[name] if given is not None else "measured"
    return given if given is not None else measure_it()


# ---- the arithmetic (docs/planning.md) ----------------------------------------------------------------
def dump_estimate(views: int, devices: int, overlap: bool, rates: Rates, disk: DiskCost) -> dict:
    """The dump's time. On an accelerator the render (CPU threads) and the forward (the device) overlap: a view
    costs 1 / min(render, forward) device-seconds, and the slower side limits. On the CPU both take turns on the
    same cores, and the unit writer's encoding too: the costs add up. D devices share the views."""
    costs = {"render": 1 / rates.render, "forward": 1 / rates.forward}
    if overlap:
        per_view = max(costs.values())
        busy = {k: v / per_view for k, v in costs.items()}   # the fraction of the dump each side works
    else:
        costs["write"] = disk.write_per_row
        # timed together when both were measured here (their sharing of the cores included), else added up
        per_view = (1 / rates.together + disk.write_per_row) if rates.together else sum(costs.values())
        busy = {k: v / sum(costs.values()) for k, v in costs.items()}   # each side's share of the time
    return {"seconds": views * per_view / devices, "device_hours": views * per_view / 3600, "per_view_s": per_view,
            "limited_by": max(costs, key=costs.get), "overlap": overlap, "busy": busy}


def bytes_estimate(num_samples: int, seeds: int, shards: int, raw: Dict[str, int], disk: DiskCost) -> dict:
    """Raw: the row's arrays. On disk, per seed: the rows, each shard's fixed part, the seed's metadata."""
    per_seed = num_samples * disk.per_row + shards * disk.per_shard + disk.per_seed
    return {"raw_per_view": sum(raw.values()), "raw_per_array": raw, "raw_total": sum(raw.values()) * num_samples * seeds,
            "on_disk_per_view": per_seed / num_samples, "on_disk_per_seed": per_seed, "on_disk_total": per_seed * seeds,
            "on_disk_per_array": disk.per_array, "shard_bytes": disk.per_shard, "metadata_per_seed": disk.per_seed,
            "rows_encoded": disk.rows}


def student_estimate(num_samples: int, batch: int, epochs: int, overlap: bool, rates: Rates, disk: DiskCost,
                     dump_device_s: float) -> dict:
    """One student's epoch, online KD against cached KD, on one device: the epoch's images (whole batches) go
    through the loader (the renderer at one view per decode), the train step and, online, the teacher's forward
    at the student's batch; cached KD reads one seed's slab instead. On an accelerator the loader (CPU threads)
    overlaps the device's work; on the CPU all of it takes turns. The cache has paid for itself once the
    students' savings exceed the dump: ceil(dump device-seconds / (epochs x (online - cached)))."""
    images = num_samples // batch * batch
    loader, step, teacher = images / rates.loader, images / rates.student, images / rates.online_teacher
    slab = num_samples * disk.read_per_row
    if overlap:
        cached, online = max(loader, step) + slab, max(loader, step + teacher)
    else:
        cached, online = loader + step + slab, loader + step + teacher
    saving = epochs * (online - cached)
    return {"epochs": epochs, "batch_size": batch, "images_per_epoch": images, "loader_s": loader, "step_s": step,
            "teacher_s": teacher, "slab_read_s": slab, "cached_epoch_s": cached, "online_epoch_s": online,
            "online_over_cached": online / cached, "saving_per_student_s": saving,
            "saving_per_student_device_hours": saving / 3600,
            "break_even_students": math.ceil(dump_device_s / saving) if saving > 0 else None}


def estimate(num_samples: int, seeds: int, devices: int, overlap: bool, rates: Rates, raw: Dict[str, int],
             disk: DiskCost, shards: int = 1, student_batch: int = 64, epochs: int = 3) -> dict:
    """The plan's numbers from the rates and the encoded rows: pure arithmetic (docs/planning.md)."""
    views = num_samples * seeds
    dump = dump_estimate(views, devices, overlap, rates, disk)
    out = {"views": views, "dump": dump, "bytes": bytes_estimate(num_samples, seeds, shards, raw, disk),
           "rates": {"render": rates.render, "forward": rates.forward, "together": rates.together,
                     "write": 1 / disk.write_per_row,
                     "slab_read": 1 / disk.read_per_row if disk.read_per_row else None, "loader": rates.loader,
                     "student": rates.student, "online_teacher": rates.online_teacher},
           "sources": dict(rates.sources, write="measured", slab_read="measured"), "student": None}
    if rates.student is not None:
        out["student"] = student_estimate(num_samples, student_batch, epochs, overlap, rates, disk,
                                          dump["device_hours"] * 3600)
    return out


# ---- the command ---------------------------------------------------------------------------------------
def plan_cache(cfg: PlanConfig) -> dict:
    """Measure what is not given and estimate the dump's time, the cache's bytes and a student's epochs (see the
    module's docstring and docs/planning.md). Returns the plan as a dict (render_text prints it)."""
    t0 = time.time()
    cfg.validate()
    device, overlap = _devices(cfg)
    n_data = _split_size(cfg)
    if cfg.recipe is None:   # (a config made field by field): the dataset's view size, or the images' side
        cfg = dataclasses.replace(cfg, recipe=ViewRecipe(size=_view_size(cfg)))
    opened, rendered, kept = sample_counts(cfg, n_data)
    sample = open_sample(cfg, opened)
    try:
        spec = planned_spec(cfg, sample.num_samples, num_classes=sample.num_classes, recipe=sample.recipe)
        rates, disk = measure(cfg, sample, device, overlap, rendered, kept)
    finally:
        sample.reader.close()
    out = estimate(sample.num_samples, len(cfg.seeds), cfg.devices, overlap, rates, raw_bytes(spec), disk,
                   spec.num_blocks, cfg.student_batch_size, cfg.epochs)
    out["inputs"] = _inputs(cfg, sample, spec, device)
    out["measured_in_s"] = time.time() - t0
    return out


def _view_size(cfg: PlanConfig) -> int:
    if cfg.data is not None:
        from kdcache.teacher.config import view_size
        return view_size(cfg.data)
    if not cfg.image_size:
        raise KdcacheError("plan without --data needs --image-size (or the view size, --size)")
    return cfg.image_size


def _split_size(cfg: PlanConfig) -> int:
    if cfg.data is None:
        return cfg.samples_count
    from kdcache.data.dataset import PreparedDataset
    return PreparedDataset.open(cfg.data).split("train").num_samples


def _inputs(cfg: PlanConfig, sample: _Sample, spec, device) -> dict:
    from kdcache.teacher.dump import default_render_threads
    import torch
    planned = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return {"teacher": cfg.teacher.name or cfg.teacher.module or cfg.teacher.checkpoint,
            "teacher_weights": "random" if cfg.teacher.random_init else (cfg.teacher.checkpoint or cfg.teacher.module),
            "num_samples": sample.num_samples, "num_classes": sample.num_classes, "seeds": len(cfg.seeds),
            "topk": cfg.topk, "targets": cfg.targets, "stored_columns": spec.stored_columns,
            "values_dtype": cfg.values_dtype, "recipe": sample.recipe.summary(), "view_size": sample.recipe.size,
            "views_per_decode": views_per_decode(cfg), "batch_size": cfg.batch_size,
            "render_threads": cfg.workers or default_render_threads(device), "devices": cfg.devices,
            "device": planned, "measured_on": str(device), "rendered": sample.source, "student": cfg.student,
            "student_batch_size": cfg.student_batch_size, "epochs": cfg.epochs}


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} days"


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _rate_lines(p: dict) -> List[str]:
    i, r, src = p["inputs"], p["rates"], p["sources"]
    rows = [("render", f"renderer, {i['views_per_decode']} views per decode, {i['render_threads']} threads", "views/s"),
            ("forward", f"teacher forward, batch {i['batch_size']}", "views/s"),
            ("together", "render and forward together, as in the dump", "views/s"),
            ("write", "unit writer (encode + write)", "views/s"), ("slab_read", "slab read (cached KD)", "rows/s"),
            ("loader", "student's loader, 1 view per decode", "views/s"),
            ("student", f"student train step, batch {i['student_batch_size']}", "img/s"),
            ("online_teacher", f"teacher forward, batch {i['student_batch_size']} (online KD)", "img/s")]
    return [f"  {label:<44} {_n(r[k]):>12} {unit:<8} {src.get(k, '')}" for k, label, unit in rows if r.get(k)]


def render_text(p: dict) -> str:
    """The plan as the command prints it."""
    i, d, b, st = p["inputs"], p["dump"], p["bytes"], p["student"]
    lines = [f"kdcache plan: teacher {i['teacher']} over {_n(i['num_samples'])} samples x {i['seeds']} seeds = "
             f"{_n(p['views'])} views ({i['targets']}, {i['stored_columns']} of {_n(i['num_classes'])} classes; "
             f"{i['recipe']}), {i['devices']} x {i['device']}",
             f"rates per device (measured here on {i['measured_on']} in {p['measured_in_s']:.1f} s, or given; "
             f"rendered: {i['rendered']}):", *_rate_lines(p)]
    side = ("render and forward overlap" if d["overlap"] else "render, forward and writes share the CPU"
            + (" (the first two timed together)" if p["rates"].get("together") else " (their times added up)"))
    busy = ", ".join(f"{k} {v:.0%}" for k, v in d["busy"].items())
    lines.append(f"dump: {_duration(d['seconds'])} on {i['devices']} device(s), {d['device_hours']:.3g} device-hours; "
                 f"{side}; limited by the {d['limited_by']} (busy: {busy})")
    parts = ", ".join(f"{a} {v}" for a, v in b["raw_per_array"].items())
    lines.append(f"bytes per view: {b['raw_per_view']} raw ({parts}); {b['on_disk_per_view']:.1f} on disk "
                 f"({_n(b['rows_encoded']['logp'])} teacher rows, {_n(b['rows_encoded']['params'])} parameter rows "
                 f"through the cache's codecs) -> {_size(b['on_disk_total'])} on "
                 f"disk, {_size(b['raw_total'])} raw")
    if st:
        lines.append(f"student {i['student']}, batch {st['batch_size']}, {st['epochs']} epochs: online-KD epoch "
                     f"{_duration(st['online_epoch_s'])}, cached-KD epoch {_duration(st['cached_epoch_s'])} "
                     f"(online / cached {st['online_over_cached']:.2f}; loader {st['loader_s']:.1f} s, step "
                     f"{st['step_s']:.1f} s, teacher {st['teacher_s']:.1f} s, slab {st['slab_read_s']:.2f} s)")
        n = st["break_even_students"]
        lines.append(f"the cache pays for itself after {n} student{'s' if n != 1 else ''} (the dump's "
                     f"{d['device_hours']:.3g} device-hours against {st['saving_per_student_device_hours']:.3g} saved "
                     f"per student)" if n else "the cache never pays for itself here: online KD is not slower")
    return "\n".join(lines)
