"""Where each epoch's views and teacher logits come from, for the three training modes.

    CachedTeacher   views and soft labels read from a dump-teacher cache: one slab per seed, read whole,
                    the next epoch's slab prefetched in the background; per batch only an index gather
    OnlineTeacher   the teacher runs in the loop on the very views the student sees (the baseline)
    NoTeacher       plain supervised training on the same views

Which stored seed an epoch uses (cache mode, "cycle"): s = seeds[e mod S] with the cache's complete
seeds in ascending order; with "per-sample", every sample draws one of the S seeds at random each epoch
(as apple/ml-dr draws among its stored augmentations), from a generator seeded by (global seed, epoch).
"""

import time
import warnings
from typing import List, Optional

import numpy as np
import torch

from kdcache.augment.params import view_params
from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import SlabPrefetcher, read_slab
from kdcache.cache.targets import dense_logits
from kdcache.errors import KdcacheError
from kdcache.models import Normalize, forward_u8


class EpochViews:
    """The epoch's view parameters (N, 5) and the seed each sample's view came from."""

    def __init__(self, params: np.ndarray, seeds):
        self.params, self.seeds = params, seeds


class NoTeacher:
    uses_teacher = False

    def __init__(self, recipe: ViewRecipe, global_seed: int, view_seeds: List[int], sizes: np.ndarray):
        self.recipe, self.global_seed, self.view_seeds, self.sizes = recipe, global_seed, view_seeds, sizes
        self.teacher_seconds = 0.0

    def seed_for_epoch(self, epoch: int) -> int:
        return self.view_seeds[epoch % len(self.view_seeds)]

    def begin_epoch(self, epoch: int) -> EpochViews:
        s = self.seed_for_epoch(epoch)
        n = len(self.sizes)
        return EpochViews(view_params(self.recipe, self.global_seed, s, np.arange(n), self.sizes[:, 0], self.sizes[:, 1]), s)


class OnlineTeacher(NoTeacher):
    uses_teacher = True

    def __init__(self, model: torch.nn.Module, info: dict, device: torch.device, amp_dtype, **kw):
        super().__init__(**kw)
        self.device, self.amp_dtype = device, amp_dtype
        self.normalize = Normalize(info["mean"], info["std"]).to(device)
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # Time the teacher's own work: CUDA events on the stream (no host sync, so the loop keeps its
        # overlap; read back in teacher_seconds), wall clock on the CPU.
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        out = forward_u8(self.model, self.normalize, images, self.amp_dtype)
        if cuda:
            end.record()
            self._events.append((start, end))
        else:
            self._cpu_seconds += time.perf_counter() - t
        return out

    @property
    def teacher_seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize(self.device)
            self._cpu_seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events = []
        return self._cpu_seconds

    @teacher_seconds.setter
    def teacher_seconds(self, value: float) -> None:
        self._cpu_seconds, self._events = value, []


class CachedTeacher:
    uses_teacher = True

    def __init__(self, cache: TeacherCache, device: torch.device, global_seed: int, seed_choice: str = "cycle",
                 seeds: Optional[List[int]] = None, epochs: Optional[int] = None):
        self.cache, self.device, self.global_seed = cache, device, global_seed
        complete = cache.complete_seeds()
        if seeds is not None:
            missing = sorted(set(seeds) - set(complete))
            if missing:
                raise KdcacheError(f"{cache.path}: seeds {missing} are not complete in this cache (complete: {complete})")
            complete = sorted(seeds)
        if not complete:
            raise KdcacheError(f"{cache.path}: no complete seed; run dump-teacher first")
        if seed_choice not in ("cycle", "per-sample"):
            raise KdcacheError(f"--seed-choice must be cycle or per-sample, got {seed_choice!r}")
        self.seeds, self.seed_choice, self.epochs = complete, seed_choice, epochs
        self.num_classes = cache.spec.num_classes
        if epochs and seed_choice == "cycle" and epochs > len(complete):
            warnings.warn(f"{epochs} epochs over {len(complete)} cached seeds: each view is replayed "
                          f"{epochs / len(complete):.1f} times on average (dump more seeds to see new views)")
        self.prefetcher = SlabPrefetcher(cache)
        self.teacher_seconds = 0.0
        self._labels = None
        self._slab = None   # the slab in use (cycle): kept while the next epoch replays the same seed
        self._all = None    # per-sample: every seed's rows stacked, {name: (S, N, ...)}

    def seed_for_epoch(self, epoch: int) -> int:
        return self.seeds[epoch % len(self.seeds)]

    def _to_device(self, values, indices, lse):
        dev = self.device
        return (torch.from_numpy(np.ascontiguousarray(values)).to(dev),
                torch.from_numpy(np.ascontiguousarray(indices).astype(np.int64)).to(dev),
                torch.from_numpy(np.ascontiguousarray(lse)).to(dev))

    def begin_epoch(self, epoch: int) -> EpochViews:
        if self.seed_choice == "cycle":
            s = self.seed_for_epoch(epoch)
            if self._slab is None or self._slab.seed != s:
                following = self.seed_for_epoch(epoch + 1)
                last = self.epochs is not None and epoch + 1 >= self.epochs
                self._slab = self.prefetcher.get(s, next_seed=None if last or following == s else following)
                self._labels = self._to_device(self._slab.values, self._slab.indices, self._slab.lse)
            return EpochViews(self._slab.params, s)
        if self._all is None:  # every seed's slab in memory, stacked once: S x N rows
            slabs = [read_slab(self.cache, s) for s in self.seeds]
            self._all = {name: np.stack([getattr(sl, name) for sl in slabs])
                         for name in ("values", "indices", "lse", "params")}
        n = self.cache.spec.num_samples
        rng = np.random.default_rng([self.global_seed, epoch, 0x5EED])
        pick = rng.integers(0, len(self.seeds), n)
        rows = np.arange(n)
        picked = {name: stacked[pick, rows] for name, stacked in self._all.items()}
        self._labels = self._to_device(picked["values"], picked["indices"], picked["lse"])
        return EpochViews(picked["params"], np.asarray(self.seeds)[pick])

    @torch.no_grad()
    def logits(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        values, idx, lse = self._labels
        rows = indices.to(self.device, non_blocking=True)
        return dense_logits(values[rows], idx[rows], lse[rows], self.num_classes)
