"""Where each pass's views and teacher targets come from, for the three training modes.

    CachedTeacher   views and soft labels read from a dump-teacher cache: one slab per seed, read whole,
                    the next pass's slab prefetched in the background; per batch only an index gather.
                    With several teachers (--teachers), one slab per chosen teacher and seed, combined per
                    batch (kdcache.student.ensemble)
    OnlineTeacher   the teacher runs in the loop on the very views the student sees (the baseline)
    NoTeacher       plain supervised training on the same views

An epoch is R passes (R = the recipe's aug_repeats, at least 1); pass r of epoch e has the pass index
t = e·R + r. Which stored seed a pass uses (cache mode, "cycle"): s = seeds[t mod S] with the cache's
complete seeds in ascending order; with "per-sample", every sample draws one of the S seeds at random
each pass (as apple/ml-dr draws among its stored augmentations), from a generator seeded by
(order seed, t). none/online: s = view_seeds[t mod len(view_seeds)].

With repeated augmentation (R > 1) a pass shows 1/R of the samples, the same subset in the R passes of an
epoch (timm's RepeatAugSampler shows N/R samples R times each per epoch): the subset is whole mixing
blocks (or single samples without mixing) chosen by (order seed, e), so the R appearances of a sample
are R different views.

Mixing: a cache made with mixing holds the teacher's answer to the mixed view (function matching), so
the target is the cached row. `--mix-labels` takes an RRC-only cache and a mixing recipe: the loader
mixes the views, and the target is lambda·p_i + (1 - lambda)·p_j of the cached distributions (FKD/ReLabel).
"""

import dataclasses
import time
import warnings
from typing import Iterator, List, NamedTuple, Optional

import numpy as np
import torch

from kdcache.augment.mixing import MIX_COLUMNS, draw_mixing
from kdcache.augment.params import ParamLayout, partner_indices, view_params
from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.schema import TeacherCache
from kdcache.cache.integrity import check_sizes
from kdcache.cache.slabs import SlabPrefetcher, read_slab
from kdcache.cache.targets import SparseTargets, teacher_choice
from kdcache.errors import KdcacheError
from kdcache.models import Normalize, forward_u8
from kdcache.student.ensemble import LambdaMix, choose_teachers, combine, ensemble_weights, shared_seeds
from kdcache.student.losses import mixed_one_hot


@dataclasses.dataclass
class PassViews:
    """One pass: view parameters (N, P), the seed(s) they came from, the samples shown (None: all)."""
    params: np.ndarray
    seeds: object
    active: Optional[np.ndarray] = None


def repeat_subset(num_samples: int, repeats: int, block: int, order_seed: int, epoch: int) -> Optional[np.ndarray]:
    """Samples shown by the R passes of epoch e: whole blocks, at least N / R samples."""
    if repeats <= 1:
        return None
    rng = np.random.default_rng([order_seed, epoch, 0x4E9E])
    starts = rng.permutation(np.arange(0, num_samples, block))
    sizes = np.minimum(starts + block, num_samples) - starts
    take = int(np.searchsorted(np.cumsum(sizes), num_samples // repeats)) + 1
    chosen = starts[:take]
    return np.sort(np.concatenate([np.arange(a, min(a + block, num_samples)) for a in chosen]))


class MixTargets:
    """Partner index and own weight lambda of every sample in a pass (from the parameter rows), on the device."""

    def __init__(self, params: np.ndarray, layout: ParamLayout, device: torch.device):
        o = layout.mix_offset
        n = len(params)
        self.partner = torch.from_numpy(np.arange(n) + params[:, o + 1].astype(np.int64)).to(device)
        self.lam = torch.from_numpy(params[:, o + 2].astype(np.float32)).to(device)

    def hard_target(self, labels_all: torch.Tensor, rows: torch.Tensor, num_classes: int, smoothing: float):
        """timm's mixup_target for each sample with its own partner: lambda·y_i + (1 - lambda)·y_j, smoothed."""
        return mixed_one_hot(labels_all[rows], labels_all[self.partner[rows]], num_classes, smoothing, self.lam[rows])

    def in_batch(self, indices: torch.Tensor):
        """(partner, lam) of a batch's samples: each partner as a row of the batch (kdcache.student.losses.
        hard_label_target's form); a view that is not mixed (lambda = 1) is its own partner (its pair partner
        has weight 0; the loader refuses a mixed view whose partner is not in the batch)."""
        lam = self.lam[indices]
        wanted = self.partner[indices]
        order = torch.argsort(indices)
        ordered = indices[order]
        at = torch.searchsorted(ordered, wanted).clamp_max(len(indices) - 1)
        rows = torch.arange(len(indices), device=indices.device)
        return torch.where((ordered[at] == wanted) & (lam < 1), order[at], rows), lam


class NoTeacher:
    uses_teacher = False

    def __init__(self, recipe: ViewRecipe, global_seed: int, view_seeds: List[int], sizes: np.ndarray,
                 order_seed: int = 0):
        self.recipe, self.global_seed, self.view_seeds, self.sizes = recipe, global_seed, view_seeds, sizes
        self.order_seed = order_seed
        self.layout = ParamLayout.of(recipe)
        self.teacher_seconds = 0.0

    def seed_for_pass(self, t: int) -> int:
        return self.view_seeds[t % len(self.view_seeds)]

    def begin_pass(self, epoch: int, r: int) -> PassViews:
        s = self.seed_for_pass(epoch * self.recipe.repeats + r)
        n = len(self.sizes)
        params = view_params(self.recipe, self.global_seed, s, np.arange(n), self.sizes[:, 0], self.sizes[:, 1], n)
        return PassViews(params, s, repeat_subset(n, self.recipe.repeats, self.recipe.mix_block if self.recipe.mixing else 1,
                                                  self.order_seed, epoch))


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


def mix_labels_recipe(cache_recipe: ViewRecipe, mix: dict) -> ViewRecipe:
    """The recipe a --mix-labels student trains on: the cache's views plus the given mixing settings."""
    if cache_recipe.mixing:
        raise KdcacheError("--mix-labels needs a cache dumped without mixing; this cache's views are mixed "
                           "already (train from it without --mix-labels: that is function matching)")
    recipe = dataclasses.replace(cache_recipe, **mix)
    if not recipe.mixing:
        raise KdcacheError("--mix-labels needs a mixing recipe: give --mixup and/or --cutmix")
    return recipe


class CachedTeacher:
    """Views and soft labels from a cache: the main cache's view rows, and the targets of its chosen teachers
    (`teachers`: labels, default the cache's own; several are combined by `ensemble`, kdcache.student.ensemble)."""
    uses_teacher = True

    def __init__(self, cache: TeacherCache, device: torch.device, order_seed: int, seed_choice: str = "cycle",
                 seeds: Optional[List[int]] = None, epochs: Optional[int] = None,
                 mix_recipe: Optional[ViewRecipe] = None, teachers: Optional[List[str]] = None,
                 ensemble: str = "mean", teacher_weights: Optional[List[float]] = None,
                 ensemble_draw: str = "sample"):
        self.cache, self.device, self.order_seed = cache, device, order_seed
        self.cache_recipe = ViewRecipe.from_dict(cache.spec.recipe)
        self.recipe = mix_recipe or self.cache_recipe        # the views the student sees
        self.mix_labels = mix_recipe is not None
        self.layout = ParamLayout.of(self.recipe)
        self.members = choose_teachers(cache, teachers)      # label -> TeacherCache, in the order given
        self.weights = ensemble_weights(len(self.members), ensemble, teacher_weights, ensemble_draw)
        self.per_step = ensemble_draw == "step"
        complete = shared_seeds(cache, self.members, seeds)
        if not complete:
            raise KdcacheError(f"{cache.path}: no complete seed; run dump-teacher first")
        if seed_choice not in ("cycle", "per-sample"):
            raise KdcacheError(f"--seed-choice must be cycle or per-sample, got {seed_choice!r}")
        if seed_choice == "per-sample" and self.recipe.mixing:
            raise KdcacheError("--seed-choice per-sample cannot be used with a mixing recipe: partners are drawn per "
                               "seed, so a pair must come from one seed (use cycle)")
        # the views' cache first: its slab holds the view rows (and its teacher's targets when chosen)
        self._caches = {cache.label: cache, **self.members}
        for c in self._caches.values():
            check_sizes(c, complete)  # a deleted or truncated shard stops training before it starts
        self.seeds, self.seed_choice, self.epochs = complete, seed_choice, epochs
        self.num_classes = cache.spec.num_classes
        self._rules = {label: c.spec.target_rule() for label, c in self.members.items()}
        passes = (epochs or 0) * self.recipe.repeats
        # a pass shows 1/R of the samples, so a stored view is shown epochs / S times on average
        if epochs and seed_choice == "cycle" and epochs > len(complete):
            warnings.warn(f"{passes} passes over {len(complete)} cached seeds: each stored view is shown "
                          f"{epochs / len(complete):.1f} times on average (dump more seeds to see new views)")
        self.prefetchers = {label: SlabPrefetcher(c) for label, c in self._caches.items()}
        self.prefetcher = self.prefetchers[cache.label]
        self.teacher_seconds = 0.0
        self._labels = None   # label -> (logp, indices, log_tail) of the pass's views, on the device
        self._mix = None
        self._slab = None     # the views' slab in use (cycle): kept while the next pass replays the same seed
        self._all = None      # per-sample: every seed's rows stacked, {label: {name: (S, N, ...)}}
        self._t = 0           # the pass (random ensembles draw from it)
        self._choice_all = None

    @property
    def teacher_labels(self) -> List[str]:
        return list(self.members)

    def seed_for_pass(self, t: int) -> int:
        return self.seeds[t % len(self.seeds)]

    def _to_device(self, logp, indices, log_tail):
        dev = self.device
        return (torch.from_numpy(np.ascontiguousarray(logp)).to(dev),
                torch.from_numpy(np.ascontiguousarray(indices).astype(np.int64)).to(dev),
                torch.from_numpy(np.ascontiguousarray(log_tail)).to(dev))

    def _with_mixing(self, params: np.ndarray, seed: int) -> np.ndarray:
        """--mix-labels: the cached rows plus mixing columns drawn for this seed (the loader mixes)."""
        n = len(params)
        idx = np.arange(n)
        partner = partner_indices(self.recipe, self.cache.spec.global_seed, seed, idx, n)
        mix = draw_mixing(self.cache.spec.global_seed, seed, idx, partner, self.recipe)
        out = np.empty((n, self.layout.width), np.float32)
        out[:, :params.shape[1]] = params
        out[:, self.layout.mix_offset:self.layout.mix_offset + MIX_COLUMNS] = mix
        return out

    def _read_seed(self, seed: int, next_seed: Optional[int]) -> None:
        """One slab per cache (the views' and each chosen teacher's), read at once in the background; the next
        seed's prefetched after."""
        for p in self.prefetchers.values():
            p.prefetch(seed)
        slabs = {label: p.get(seed, next_seed=next_seed) for label, p in self.prefetchers.items()}
        self._slab = slabs[self.cache.label]
        self._labels = {label: self._to_device(slabs[label].logp, slabs[label].indices, slabs[label].log_tail)
                        for label in self.members}

    def begin_pass(self, epoch: int, r: int) -> PassViews:
        t = epoch * self.recipe.repeats + r
        n = self.cache.spec.num_samples
        active = repeat_subset(n, self.recipe.repeats, self.recipe.mix_block if self.recipe.mixing else 1,
                               self.order_seed, epoch)
        self._t = t
        if self.weights is None and not self.per_step and len(self.members) > 1:   # random, a teacher per sample
            self._choice_all = teacher_choice(n, len(self.members), (self.order_seed, t), False).to(self.device)
        if self.seed_choice == "cycle":
            s = self.seed_for_pass(t)
            if self._slab is None or self._slab.seed != s:
                following = self.seed_for_pass(t + 1)
                last = self.epochs is not None and t + 1 >= self.epochs * self.recipe.repeats
                self._read_seed(s, None if last or following == s else following)
            params = self._with_mixing(self._slab.params, s) if self.mix_labels else self._slab.params
            self._mix = MixTargets(params, self.layout, self.device) if self.layout.mixing else None
            return PassViews(params, s, active)
        return self._per_sample_pass(t, n, active)

    def _per_sample_pass(self, t: int, n: int, active) -> PassViews:
        """--seed-choice per-sample: each sample's view and targets from a seed drawn for it (every chosen
        teacher's from the same seed)."""
        if self._all is None:  # every seed's slab of every cache in memory, stacked once: S x N rows each
            self._all = {}
            for label, c in self._caches.items():
                slabs = [read_slab(c, s) for s in self.seeds]
                self._all[label] = {name: np.stack([getattr(sl, name) for sl in slabs])
                                    for name in ("logp", "indices", "log_tail", "params")
                                    if getattr(slabs[0], name) is not None}
        rng = np.random.default_rng([self.order_seed, t, 0x5EED])
        pick = rng.integers(0, len(self.seeds), n)
        rows = np.arange(n)
        picked = {label: {name: stacked[pick, rows] for name, stacked in arrays.items()}
                  for label, arrays in self._all.items()}
        self._labels = {label: self._to_device(picked[label]["logp"], picked[label]["indices"],
                                               picked[label]["log_tail"]) for label in self.members}
        self._mix = None
        return PassViews(picked[self.cache.label]["params"], np.asarray(self.seeds)[pick], active)

    @property
    def mix(self) -> Optional[MixTargets]:
        return self._mix

    def _combined(self, rows: torch.Tensor, indices: torch.Tensor):
        """The targets of the pass's views `rows` (on the device): one teacher's, or the chosen teachers' combined;
        `indices`: the batch's samples (a per-step draw is keyed by its first)."""
        members = [SparseTargets(idx[rows], logp[rows], log_tail[rows], self.num_classes, **self._rules[label])
                   for label, (logp, idx, log_tail) in self._labels.items()]
        choice = None
        if self.weights is None and len(members) > 1:
            if self.per_step:
                first = int(indices[0]) if len(indices) else 0
                choice = teacher_choice(len(rows), len(members), (self.order_seed, self._t, first), True).to(self.device)
            else:
                choice = self._choice_all[rows]
        return combine(members, self.weights, choice)

    def targets(self, indices: torch.Tensor):
        """The stored answers of the pass's views of these samples, on the device: SparseTargets of one teacher,
        MixedTargets of several."""
        return self._combined(indices.to(self.device, non_blocking=True), indices)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, indices: torch.Tensor):
        rows = indices.to(self.device, non_blocking=True)
        if not self.mix_labels:
            return self._combined(rows, indices)   # the loss takes them at its temperature (kdcache.student.losses)
        # FKD/ReLabel: the lambda-mix of the two views' cached targets
        own, other = self._combined(rows, indices), self._combined(self._mix.partner[rows], indices)
        if not isinstance(own, SparseTargets) or own.sampled:
            return LambdaMix(own, other, self._mix.lam[rows])
        # one top-k teacher: the mix of the two rebuilt distributions at T = 1, as log-probabilities (unchanged)
        lam = self._mix.lam[rows][:, None].clamp(1e-12, 1.0)
        return torch.logaddexp(own.dense_logits() + lam.log(), other.dense_logits() + (1.0 - lam).clamp_min(1e-12).log())


class PassBatch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor                   # global sample indices
    teacher_images: Optional[torch.Tensor]  # online KD at another size: the view at the recipe's size
    views: PassViews                        # the pass's views (params, seeds, active samples)
    mix: Optional[MixTargets]               # partners and weights when the recipe mixes


def epoch_passes(source, loader, epoch: int, passes: int, layout: ParamLayout, device, size: int) -> Iterator[PassBatch]:
    """The batches of one epoch at the epoch's size: R passes, each with its own views (repeated augmentation),
    and the pass's mixing weights when the recipe mixes. `loader`: a kdcache.augment.loader.ReplayLoader.
    Used by train-student's loop and by the public kdcache.student.replay.ReplayLoader alike."""
    for r in range(passes):
        views = source.begin_pass(epoch, r)
        loader.set_views(views.params, views.active)
        loader.set_size(size)                          # before iter(): FFCV allocates the epoch's buffers then
        loader.loader.next_epoch = epoch * passes + r   # the order is a function of (seed, pass): resumable
        mix = getattr(source, "mix", None)        # a cached source has them already for this pass
        if mix is None and layout.mixing:
            mix = MixTargets(views.params, layout, device)
        for batch in loader:
            yield PassBatch(*batch[:3], batch[3] if len(batch) > 3 else None, views, mix)
