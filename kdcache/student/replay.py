"""The public replay loader: FFCV replays a cache's views (or the recipe's views) into any training loop, each
batch with the soft targets of exactly those views.

It is `kdcache train-student`'s input pipeline, by parts: the views and targets of a pass come from a source
(kdcache.student.soft_labels: CachedTeacher, OnlineTeacher, NoTeacher), an epoch is R passes with repeated
augmentation (soft_labels.epoch_passes), and the pixels come from kdcache.augment.loader.ReplayLoader.
"""

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from kdcache.augment.loader import ReplayLoader as ViewLoader
from kdcache.augment.params import ParamLayout
from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.reader import Cache, open_cache
from kdcache.cache.schema import MAX_SEED, TeacherCache
from kdcache.cache.targets import MixedTargets, SparseTargets
from kdcache.data.dataset import PreparedDataset
from kdcache.errors import KdcacheError
from kdcache.models import IMAGENET_MEAN, IMAGENET_STD, Normalize
from kdcache.student.soft_labels import CachedTeacher, NoTeacher, OnlineTeacher, epoch_passes, mix_labels_recipe


@dataclass
class Batch:
    """One training batch of replayed views; every tensor on the loader's device and its own (a kept batch
    stays valid: FFCV's buffers are copied out of on the CPU).

    images : (B, 3, H, W) uint8 (channels_last memory), or float32 normalised with the loader's mean/std.
    labels : (B,) int64 ground-truth classes.
    indices : (B,) int64 global sample indices (rows of the dataset and of the cache).
    targets : the teacher's answers to exactly these views: SparseTargets (cache, one teacher), MixedTargets
        (cache, several `teachers` combined by `ensemble`), with mix_labels the lambda-mix of the two views'
        targets ((B, C) float32 dense log-probabilities for one top-k teacher, else an object with the same
        methods as MixedTargets), (B, C) float32 logits (online teacher), or None (no teacher). The losses
        (kd_loss, dkd_loss) take any of them.
    partner : (B,) int64 row in this batch of each sample's mixing partner (itself when its view is not mixed,
        lam = 1); None when the recipe does not mix.
    lam : (B,) float32 each sample's own weight in its mixed view (1 when unmixed); None when the recipe does
        not mix. `hard_label_target(labels, C, smoothing, partner, lam)` is the mixed hard-label target.
    seed : the augmentation seed of the pass (int), or (B,) int64 per sample (cache, seed_choice="per-sample").
    """
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    targets: Union[SparseTargets, MixedTargets, torch.Tensor, None]
    partner: Optional[torch.Tensor]
    lam: Optional[torch.Tensor]
    seed: Union[int, torch.Tensor]


def _distributed(requested: Optional[bool]) -> bool:
    if requested is not None:
        return requested
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _owned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on the device, in memory of its own: FFCV refills its batch buffers a few batches later, so a
    Batch that is kept (a list of batches, a prefetching wrapper) must not point into them."""
    out = t.to(device, non_blocking=True)
    return out.clone(memory_format=torch.preserve_format) if out.data_ptr() == t.data_ptr() else out


def _as_cache(cache) -> Cache:
    if isinstance(cache, Cache):
        return cache
    if isinstance(cache, TeacherCache):
        return Cache(cache)
    return open_cache(cache)


def _recipe(recipe, ds: PreparedDataset) -> ViewRecipe:
    if recipe is None:
        return ViewRecipe(size=ds.view_size)
    return recipe if isinstance(recipe, ViewRecipe) else ViewRecipe.from_dict(recipe)


class ReplayLoader:
    """FFCV replay of augmented views for a training loop; iterate it to get one epoch of `Batch`es.

    Three sources of targets: a cache (`cache=`: its views and stored soft labels), an online teacher
    (`teacher=`: the recipe's views, scored by the teacher in the loop), or neither (the recipe's views, no
    targets). An epoch is R passes (R = the recipe's aug_repeats, at least 1); pass t = epoch * R + r shows
    seed seeds[t mod S] (cache, "cycle") or view_seeds[t mod len] (default: seed t). The sample order is a
    function of (order_seed, t) only, so a run resumes exactly; mixing partners always share a batch.

    Parameters
    ----------
    data : str, Path or PreparedDataset
        The prepared dataset (`kdcache prepare`).
    batch_size : int
        Samples per batch and rank (even when the recipe mixes or repeats: pairs share a batch).
    split : str
        The split to replay (the one the cache was dumped over).
    cache : str, Path, Cache or TeacherCache, optional
        A teacher cache of this dataset split (a path or URL is opened with `open_cache`).
    teacher : torch.nn.Module, optional
        An online teacher (not with `cache`): called on the uint8 views normalised with teacher_mean/std.
    teacher_mean, teacher_std : sequence of float, optional
        The teacher's normalisation (default: its timm pretrained_cfg's, else ImageNet's).
    teacher_amp : torch.dtype, optional
        Autocast dtype of the teacher's forward (None: float32).
    teacher_size : int, optional
        Online teacher: score the views rendered at this size (default: the recipe's size when `size`
        differs from it; give it when `set_epoch` will change the size).
    recipe : ViewRecipe or dict, optional
        Without a cache: how views are drawn (default: RandomResizedCrop + flip at the dataset's view size).
    view_global_seed : int, optional
        Without a cache: the views' global seed (default 0, dump-teacher's default). A cache has its own.
    view_seeds : sequence of int, optional
        Cache: the complete seeds to use (default: all complete seeds). Otherwise: the seeds cycled over
        passes (default: pass t uses seed t).
    seed_choice : {"cycle", "per-sample"}
        Cache: one seed per pass, or a seed drawn per sample and pass among the cache's (no mixing).
    mix_labels : dict, optional
        Cache without mixing: mixup/cutmix settings (e.g. ``{"mixup": 0.8, "cutmix": 1.0}``); the loader mixes
        the views and the targets are the lambda-mix of the two cached distributions (FKD/ReLabel).
    teachers : sequence of str, optional
        Cache: the labels of the teachers to distil from (``Cache.teachers``; default: the cache's own), as
        train-student's --teachers. Several are combined by `ensemble`.
    ensemble : {"mean", "weighted", "random"}
        Several teachers: the mean of their probabilities (at the loss's temperature), the weighted mean
        (`teacher_weights`), or one teacher drawn per sample and pass (`ensemble_draw` "sample") or per batch
        ("step"), as train-student's --ensemble (docs/training.md, "Several teachers").
    teacher_weights : sequence of float, optional
        ensemble="weighted": one weight per teacher (normalised to sum 1).
    ensemble_draw : {"sample", "step"}
        ensemble="random": a teacher per sample, or one per batch.
    size : int, optional
        Output size of the images (default: the recipe's); change it per epoch with `set_epoch`.
    order_seed : int
        Seed of the sample order and of the repeated-augmentation subsets (train-student's --seed).
    epochs : int, optional
        The run's length, if known: the cache's next slab is then not prefetched after the last pass.
    workers : int, optional
        FFCV decoding threads (default: every usable core).
    distributed : bool, optional
        Shard samples over ranks (default: when torch.distributed is initialised with more than one process).
    drop_last : bool
        Drop each pass's last incomplete batch (train-student does).
    mean, std : sequence of float, optional
        Give both to get float32 images normalised as train-student feeds its student ((x - 255 mean) / (255 std));
        default: uint8 images.
    channels_last : bool
        With mean/std: normalised images in channels_last memory (train-student's default).
    device : str or torch.device
        Where batches are delivered (and where targets are gathered).
    """

    def __init__(self, *, data, batch_size: int, split: str = "train", cache=None,
                 teacher: Optional[torch.nn.Module] = None, teacher_mean: Optional[Sequence[float]] = None,
                 teacher_std: Optional[Sequence[float]] = None, teacher_amp: Optional[torch.dtype] = None,
                 teacher_size: Optional[int] = None, recipe: Union[ViewRecipe, dict, None] = None,
                 view_global_seed: Optional[int] = None, view_seeds: Optional[Sequence[int]] = None,
                 seed_choice: str = "cycle", mix_labels: Optional[dict] = None,
                 teachers: Optional[Sequence[str]] = None, ensemble: str = "mean",
                 teacher_weights: Optional[Sequence[float]] = None, ensemble_draw: str = "sample",
                 size: Optional[int] = None,
                 order_seed: int = 0, epochs: Optional[int] = None, workers: Optional[int] = None,
                 distributed: Optional[bool] = None, drop_last: bool = True,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 channels_last: bool = True, device: Union[str, torch.device] = "cpu"):
        self.dataset = data if isinstance(data, PreparedDataset) else PreparedDataset.open(data)
        self.split = self.dataset.split(split)
        self.device = torch.device(device)
        if cache is not None and teacher is not None:
            raise KdcacheError("ReplayLoader: give a cache or an online teacher, not both")
        if (mean is None) != (std is None):
            raise KdcacheError("ReplayLoader: give both mean and std (normalised images) or neither (uint8)")
        source_kw = dict(view_global_seed=view_global_seed, view_seeds=view_seeds, order_seed=order_seed, epochs=epochs)
        ensemble_kw = dict(teachers=None if teachers is None else list(teachers), ensemble=ensemble,
                           teacher_weights=None if teacher_weights is None else list(teacher_weights),
                           ensemble_draw=ensemble_draw)
        if cache is not None:
            self.source = self._cached(_as_cache(cache), split, recipe, seed_choice, mix_labels, ensemble_kw,
                                       **source_kw)
        else:
            if mix_labels:
                raise KdcacheError("ReplayLoader: mix_labels mixes cached soft labels: it needs a cache "
                                   "(without one, put the mixing in the recipe)")
            if teachers is not None or teacher_weights is not None or ensemble != "mean" or ensemble_draw != "sample":
                raise KdcacheError("ReplayLoader: teachers, ensemble, teacher_weights and ensemble_draw choose among "
                                   "a cache's teachers: they need a cache")
            self.source = self._uncached(_recipe(recipe, self.dataset), teacher, teacher_mean, teacher_std,
                                         teacher_amp, **source_kw)
        self.recipe: ViewRecipe = self.source.recipe
        self.layout = ParamLayout.of(self.recipe)
        self._size = int(size or self.recipe.size)
        if teacher is not None and teacher_size is None and self._size != self.recipe.size:
            teacher_size = self.recipe.size   # the teacher scores what a cache would hold: the recipe's views
        self._loader = ViewLoader(self.split.beton_path, self.split.num_samples, self._size, batch_size, workers,
                                  order="random", seed=order_seed, drop_last=drop_last,
                                  distributed=_distributed(distributed), layout=self.layout,
                                  repeats=self.recipe.repeats, view_size=self.recipe.size,
                                  teacher_size=teacher_size if teacher is not None else None)
        self._normalize = Normalize(mean, std).to(self.device) if mean is not None else None
        self._channels_last = channels_last
        self._epoch = 0

    def _cached(self, cache: Cache, split, recipe, seed_choice, mix_labels, ensemble_kw, view_global_seed,
                view_seeds, order_seed, epochs) -> CachedTeacher:
        cache.check_made_for(self.dataset, split)
        if view_global_seed is not None and view_global_seed != cache.global_seed:
            raise KdcacheError(f"view_global_seed {view_global_seed} contradicts the cache's global seed "
                               f"{cache.global_seed}: cached views come from the cache")
        if recipe is not None:
            raise KdcacheError("ReplayLoader: a cache's views follow its own recipe (Cache.recipe); give no recipe "
                               "(mix_labels= adds mixing to an unmixed cache)")
        mix_recipe = mix_labels_recipe(cache.recipe, mix_labels) if mix_labels else None
        return CachedTeacher(cache.teacher_cache, self.device, order_seed, seed_choice,
                             seeds=None if view_seeds is None else list(view_seeds), epochs=epochs,
                             mix_recipe=mix_recipe, **ensemble_kw)

    def _uncached(self, recipe: ViewRecipe, teacher, teacher_mean, teacher_std, teacher_amp, view_global_seed,
                  view_seeds, order_seed, epochs) -> NoTeacher:
        if view_seeds is None:   # pass t shows seed t (train-student: one seed per pass of the run)
            view_seeds = range(epochs * recipe.repeats) if epochs else range(MAX_SEED + 1)
        common = dict(recipe=recipe, global_seed=view_global_seed or 0, view_seeds=view_seeds,
                      sizes=self.split.sizes, order_seed=order_seed)
        if teacher is None:
            return NoTeacher(**common)
        pretrained = getattr(teacher, "pretrained_cfg", None) or {}
        info = {"mean": list(teacher_mean or pretrained.get("mean", IMAGENET_MEAN)),
                "std": list(teacher_std or pretrained.get("std", IMAGENET_STD))}
        return OnlineTeacher(teacher, info, self.device, teacher_amp, **common)

    # ---- epochs ---------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next iteration replays."""
        return self._epoch

    @property
    def size(self) -> int:
        """The images' output size of the next epoch."""
        return self._size

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def passes(self) -> int:
        """Passes per epoch (the recipe's aug_repeats, at least 1)."""
        return self.recipe.repeats

    @property
    def teacher_seconds(self) -> float:
        """Seconds the online teacher's forward took since the last reset (0 for the other sources)."""
        return self.source.teacher_seconds

    @teacher_seconds.setter
    def teacher_seconds(self, value: float) -> None:
        self.source.teacher_seconds = value

    def set_epoch(self, epoch: int, size: Optional[int] = None) -> None:
        """Replay epoch `epoch` next (iteration advances by one epoch by itself; call this to resume, or as with
        a DistributedSampler), optionally at another output size (progressive resizing)."""
        if epoch < 0:
            raise KdcacheError(f"ReplayLoader.set_epoch: epoch must be >= 0, got {epoch}")
        self._epoch = int(epoch)
        if size is not None:
            self._size = int(size)

    def __len__(self) -> int:
        """Batches per epoch and rank (all passes)."""
        return len(self._loader) * self.passes

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        for images, labels, indices, teacher_images, views, mix in epoch_passes(
                self.source, self._loader, epoch, self.passes, self.layout, self.device, self._size):
            yield self._batch(images, labels, indices, teacher_images, views, mix)
        self._epoch = epoch + 1

    def _batch(self, images, labels, indices, teacher_images, views, mix) -> Batch:
        dev = self.device
        images = images.to(dev, non_blocking=True) if self._normalize is not None else _owned(images, dev)
        labels = _owned(labels, dev)
        rows = _owned(indices, dev)
        targets = self._targets(images, teacher_images, rows)
        partner, lam = mix.in_batch(rows) if mix is not None else (None, None)
        seed = int(views.seeds) if np.isscalar(views.seeds) else torch.from_numpy(
            np.asarray(views.seeds)[indices.numpy()].astype(np.int64))
        if self._normalize is not None:
            images = self._normalize(images)
            if self._channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        return Batch(images, labels, rows, targets, partner, lam, seed)

    def _targets(self, images, teacher_images, rows):
        source = self.source
        if isinstance(source, CachedTeacher):
            return source.logits(images, rows) if source.mix_labels else source.targets(rows)
        if not source.uses_teacher:
            return None
        if teacher_images is not None:
            images = teacher_images.to(self.device, non_blocking=True)
        return source.logits(images, rows)


__all__ = ["Batch", "ReplayLoader"]
