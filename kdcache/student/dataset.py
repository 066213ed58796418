"""A map-style torch Dataset of a cache's views, for torch DataLoader, Lightning or accelerate users (no FFCV
in the training process).

`ReplayDataset` renders view (i, s) with the teacher side's renderer (kdcache.augment.render: FFCV's JPEG
decoder, the crop + resize + flip, RandAugment, random erasing, pair mixing), from the view's parameters: a
cache's stored rows (and then each item carries the view's cached teacher answer), or, without a cache, the
rows a ViewRecipe and a global seed define (kdcache.augment.params.view_params). Its pixels equal the FFCV
replay's (kdcache.augment.loader.ReplayLoader) byte for byte: tests/test_torch_dataset.py.

Which seed an epoch shows: `set_epoch(e)` picks s = seeds[e mod S] as `train-student`'s "cycle" does (the
cache's complete seeds in ascending order, or the given view seeds; without either, s = e), and
`set_view_seed(s)` picks one directly. The choice reaches DataLoader workers, persistent ones included: it is
kept in shared memory, and a worker that finds it changed reloads the seed's rows before its next item.

Mixing (mixup / cutmix) needs both views of a pair: the mixed pixels of i are computed from i's and its
partner's rendered views (kdcache.augment.mixing). Two ways, both exact:

    mix="batch" (default)  an item is the unmixed view; `collate_views` mixes each pair inside the batch, as the
                           FFCV replay mixes inside its batch. The sampler must put both members of a pair in one
                           batch: `PairBatchSampler` does (partners side by side, pairs shuffled per epoch,
                           split across ranks by whole pairs), and collate_views raises if a partner is missing.
                           Each image is decoded once per epoch.
    mix="item"             __getitem__ renders the partner's view as well and mixes: any sampler works
                           (DistributedSampler, timm's), at the cost of a second decode and render per mixed view.

Items are ReplayItem; a batch (collate_views) is a ReplayBatch: images uint8 (B, 3, S, S) as the FFCV replay
yields them (before normalisation; channels-last memory), labels, global indices, the targets with a cache
(SparseTargets of one teacher; MixedTargets of several `teachers` combined by `ensemble`, as train-student's
--teachers and --ensemble), and each view's partner, partner label and own weight lambda (the hard-label
target of a mixed view: lambda·y_i + (1 - lambda)·y_partner).

`CentreCropDataset` is the evaluation side: FFCV's CenterCropRGBImageDecoder (resize + centre crop), the
pixels of kdcache.augment.loader.eval_loader.
"""

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kdcache.augment.mixing import MIX_COLUMNS, MODE_NONE
from kdcache.augment.params import ParamLayout, view_params
from kdcache.augment.recipe import ViewRecipe
from kdcache.augment import render
from kdcache.augment.render import mix_views
from kdcache.augment.rescale import rescale_params
from kdcache.cache.targets import MixedTargets, SparseTargets, teacher_choice
from kdcache.data.dataset import PreparedDataset, PreparedSplit
from kdcache.errors import KdcacheError
from kdcache.student.ensemble import cat_targets, choose_teachers, combine, ensemble_weights, shared_seeds

logger = logging.getLogger(__name__)

MIX_MODES = ("batch", "item")
# the renderer's layout argument for a row that holds only the 7 mixing columns (mix_pair reads layout[4] only)
_MIX_ONLY_LAYOUT = np.array([0, 0, -1, 0, 0, 0], np.int64)


@dataclass(frozen=True)
class ReplayItem:
    """One view (i, s). image: uint8 (3, S, S); targets: the view's cached teacher answer (one row: SparseTargets,
    or MixedTargets of several teachers) or None;
    partner, partner_label, lam: the mixing partner's global index and label and this view's own weight
    (partner = index, lam = 1 when the view is not mixed); pending_mix: the pair's 7 mixing columns when the
    mixing is left to collate_views (mix="batch"), else None."""
    image: torch.Tensor
    label: int
    index: int
    targets: Union[SparseTargets, MixedTargets, None]
    partner: int
    partner_label: int
    lam: float
    pending_mix: Optional[np.ndarray] = None


@dataclass
class ReplayBatch:
    """A batch of views (collate_views). images: uint8 (B, 3, S, S); labels, indices, partner, partner_labels:
    int64 (B,); lam: float32 (B,); targets: SparseTargets or MixedTargets (B rows) or None (no cache)."""
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    targets: Union[SparseTargets, MixedTargets, None]
    partner: torch.Tensor
    partner_labels: torch.Tensor
    lam: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "ReplayBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return ReplayBatch(move(self.images), move(self.labels), move(self.indices),
                           None if self.targets is None else _targets_to(self.targets, device, non_blocking),
                           move(self.partner), move(self.partner_labels), move(self.lam))

    def __len__(self) -> int:
        return len(self.labels)


def _targets_to(targets, device, non_blocking: bool):
    if isinstance(targets, MixedTargets):
        members = [_targets_to(m, device, non_blocking) for m in targets.members]
        if targets.choice is not None:
            return MixedTargets(members, choice=targets.choice.to(device, non_blocking=non_blocking))
        return MixedTargets(members, weights=targets.weights)
    return targets.to(device, non_blocking=non_blocking)


def _open_split(data, split: str):
    ds = data if isinstance(data, PreparedDataset) else PreparedDataset.open(Path(data))
    return ds, ds.split(split)


class _ViewRenderer:
    """Renders one sample's view as the teacher side does (unmixed): its JPEG bytes read from the shards, decoded
    with FFCV's decoder, then render.render_many. Per-item costs kept low for small views: the layout array and
    image sizes are prepared once, and each thread decodes into its own reused buffer (a fresh image-sized array
    per item costs page faults comparable to the decode itself at 224 px)."""

    def __init__(self, split: PreparedSplit, size: int, layout: ParamLayout):
        self.split, self.size = split, size
        self.layout = layout.as_array()
        self.heights = split.sizes[:, 0].tolist()
        self.widths = split.sizes[:, 1].tolist()
        self.reader = split.jpeg_reader()
        self._local = threading.local()

    def __call__(self, i: int, row: np.ndarray) -> np.ndarray:
        height, width = self.heights[i], self.widths[i]
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.size < height * width * 3:
            buffer = self._local.buffer = np.empty(max(height * width * 3, 1 << 20), np.uint8)
        image = buffer[:height * width * 3].reshape(height, width, 3)
        status = render.decode_into(np.frombuffer(self.reader[i], np.uint8), height, width, image, render.C_FUNCTIONS)
        if status != 0:
            raise KdcacheError(f"{self.split.dir}: sample {i}: JPEG decode failed (turbojpeg status {status})")
        out = np.empty((1, self.size, self.size, 3), np.uint8)
        render.render_many(image, row.reshape(1, -1), self.layout, out, render.C_FUNCTIONS)
        return out[0]

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]            # per process and thread; made again where unpickled
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


def _target_arrays(slab) -> tuple:
    return (np.ascontiguousarray(slab.indices, dtype=np.int64), np.ascontiguousarray(slab.logp),
            np.ascontiguousarray(slab.log_tail))


class _ViewRows(NamedTuple):
    """One seed's view rows (scaled to the size rendered) and, from a cache, its chosen teachers' answers
    (label -> indices, logp, log_tail arrays of all samples) and, for a random ensemble, each view's teacher."""
    seed: int
    params: np.ndarray
    targets: Optional[dict]
    choice: Optional[np.ndarray] = None


def _warm_renderer(renderer: _ViewRenderer, row: np.ndarray) -> None:
    """Compile (or load from numba's cache) the renderer's entry points in this process, so that DataLoader
    workers forked from it start rendering at once instead of each loading them again every epoch."""
    view = renderer(0, row)
    mix_views(view, view.copy(), np.zeros(MIX_COLUMNS, np.float32), _MIX_ONLY_LAYOUT)


class ReplayDataset(Dataset):
    """Map-style dataset of the views (i, s) of one split, rendered by the teacher side's renderer.

    Parameters
    ----------
    data : str, Path or PreparedDataset
        A prepared dataset (`kdcache prepare`); its webdataset shards hold the JPEG bytes that are decoded.
    cache : str, Path or TeacherCache, optional
        A dump-teacher cache of this split: its stored view rows are replayed and every item carries the
        view's cached targets. Without a cache the rows come from `recipe` and `view_global_seed`.
    split : str
        The split to read (default "train").
    recipe : ViewRecipe or dict, optional
        Without a cache: the views' recipe (default: ViewRecipe at the dataset's view size). Refused with a cache
        (the cache's recipe is the truth).
    view_global_seed : int, optional
        Without a cache: the views' global seed (default 0). With a cache it must equal the cache's, if given.
    view_seeds : sequence of int, optional
        The seeds set_epoch cycles through. With a cache: a subset of its complete seeds (default: all of them);
        without: default s = epoch.
    size : int, optional
        Output side in pixels (default the recipe's); erasing and cutmix boxes are scaled as the replay scales
        them (kdcache.augment.rescale).
    mix : "batch" or "item"
        Where a mixed view's pair is mixed (module docstring): in collate_views (default) or in __getitem__.
    teachers : sequence of str, optional
        With a cache: the labels of the teachers whose targets items carry (``Cache.teachers``; default the
        cache's own), as train-student's --teachers; the default seeds are those complete in all of them.
    ensemble : {"mean", "weighted", "random"}
        Several teachers: the mean of their probabilities, the weighted mean (`teacher_weights`), or one
        teacher per view (i, s), drawn from (the cache's global seed, s): the same each time the view is shown
        (train-student's "random" draws again each pass; a per-batch draw is not offered: items know no batch).
    teacher_weights : sequence of float, optional
        ensemble="weighted": one weight per teacher (normalised to sum 1).
    """

    def __init__(self, data, cache=None, *, split: str = "train", recipe: Union[ViewRecipe, dict, None] = None,
                 view_global_seed: Optional[int] = None, view_seeds: Optional[Sequence[int]] = None,
                 size: Optional[int] = None, mix: str = "batch", teachers: Optional[Sequence[str]] = None,
                 ensemble: str = "mean", teacher_weights: Optional[Sequence[float]] = None):
        if mix not in MIX_MODES:
            raise KdcacheError(f"ReplayDataset: mix must be one of {MIX_MODES}, got {mix!r}")
        self.dataset, self.split = _open_split(data, split)
        self.mix = mix
        self._cache, self._cache_where = None, None
        self._teacher_where, self._teachers, self._rules, self._weights = {}, None, {}, None
        if cache is not None:
            self._use_cache(cache, recipe, view_global_seed, view_seeds)
            self._choose_teachers(teachers, ensemble, teacher_weights, view_seeds)
        else:
            if teachers is not None or teacher_weights is not None or ensemble != "mean":
                raise KdcacheError("ReplayDataset: teachers, ensemble and teacher_weights choose among a cache's "
                                   "teachers: they need a cache")
            self.recipe = (recipe if isinstance(recipe, ViewRecipe) else
                           ViewRecipe.from_dict(recipe) if recipe else ViewRecipe(size=self.dataset.view_size))
            self.global_seed = 0 if view_global_seed is None else int(view_global_seed)
            self.seeds = None if view_seeds is None else [int(s) for s in view_seeds]
            self.num_classes = self.dataset.num_classes
        self.layout = ParamLayout.of(self.recipe)
        self.size = int(size or self.recipe.size)
        self.labels = np.asarray(self.split.labels, np.int64)
        self._render = _ViewRenderer(self.split, self.size, self.layout)
        self._rows: Optional[_ViewRows] = None
        # the chosen seed in shared memory, seen by every worker; read through a numpy view (cheaper per item)
        self._chosen = torch.full((1,), -1, dtype=torch.int64).share_memory_()
        self._chosen_view = self._chosen.numpy()
        self.set_epoch(0)
        if len(self):
            _warm_renderer(self._render, self._current().params[0])

    # --- where the views come from ---------------------------------------------------------------
    def _use_cache(self, cache, recipe, view_global_seed, view_seeds) -> None:
        from kdcache.cache.reader import Cache
        from kdcache.cache.schema import TeacherCache
        if isinstance(cache, Cache):   # the public handle (kdcache.open_cache)
            cache = cache.teacher_cache
        self._cache = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
        self._cache_where = self._cache.path
        spec = self._cache.spec
        if recipe is not None:
            raise KdcacheError(f"ReplayDataset: recipe given with cache {self._cache_where}: a cache's views come "
                               "from its own recipe")
        self._cache.check_made_for(self.dataset, self.split.name)
        if view_global_seed is not None and int(view_global_seed) != spec.global_seed:
            raise KdcacheError(f"ReplayDataset: view_global_seed {view_global_seed} contradicts the global seed "
                               f"{spec.global_seed} of cache {self._cache_where}")
        complete = self._cache.complete_seeds()
        if view_seeds is not None:
            missing = sorted(set(int(s) for s in view_seeds) - set(complete))
            if missing:
                raise KdcacheError(f"{self._cache_where}: seeds {missing} are not complete (complete: {complete})")
            complete = sorted(int(s) for s in view_seeds)
        if not complete:
            raise KdcacheError(f"{self._cache_where}: no complete seed; run dump-teacher first")
        self.recipe = ViewRecipe.from_dict(spec.recipe)
        self.global_seed, self.seeds, self.num_classes = spec.global_seed, complete, spec.num_classes
        self._complete = set(self._cache.complete_seeds())

    def _choose_teachers(self, teachers, ensemble: str, teacher_weights, view_seeds) -> None:
        """The teachers whose targets items carry (their caches, reopened by path in spawned workers), how they
        combine, and the seeds complete in all of them."""
        members = choose_teachers(self._cache, None if teachers is None else list(teachers))
        self._weights = ensemble_weights(len(members), ensemble, teacher_weights)
        self._teacher_where = {label: c.path for label, c in members.items()}
        self._teachers = dict(members)
        self._rules = {label: c.spec.target_rule() for label, c in members.items()}
        if len(members) > 1 or self._cache.label not in members:
            self.seeds = shared_seeds(self._cache, members, None if view_seeds is None else [int(s) for s in view_seeds])
            if not self.seeds:
                raise KdcacheError(f"{self._cache_where}: no seed is complete in teachers {', '.join(members)}")
            for c in members.values():
                self._complete &= set(c.complete_seeds())

    def _load(self, seed: int) -> _ViewRows:
        if self._cache_where is None:
            n = self.split.num_samples
            params = view_params(self.recipe, self.global_seed, seed, np.arange(n), self.split.sizes[:, 0],
                                 self.split.sizes[:, 1], n)
            targets = None
        else:
            from kdcache.cache.slabs import read_slab
            if self._cache is None:   # a worker started by pickling (spawn): open the cache again
                from kdcache.cache.schema import TeacherCache
                self._cache = TeacherCache.open(self._cache_where)
            slab = read_slab(self._cache, seed)
            params = slab.params
            targets = {label: _target_arrays(slab if label == self._cache.label else
                                             read_slab(self._teacher(label), seed)) for label in self._teacher_where}
        if self.size != self.recipe.size:
            params = rescale_params(params, self.layout, self.recipe.size, self.size)
        choice = None
        if targets and len(targets) > 1 and self._weights is None:   # random: a teacher per view (i, s)
            choice = teacher_choice(len(params), len(targets), (self.global_seed, seed), False).numpy()
        logger.debug("views of seed %d loaded (%d samples)", seed, len(params))
        return _ViewRows(seed, np.ascontiguousarray(params, dtype=np.float32), targets, choice)

    def _teacher(self, label: str):
        """An added teacher's cache (opened again by path in a worker started by pickling)."""
        from kdcache.cache.schema import TeacherCache
        if self._teachers is None:
            self._teachers = {}
        if label not in self._teachers:
            self._teachers[label] = TeacherCache.open(self._teacher_where[label])
        return self._teachers[label]

    def _item_targets(self, rows: _ViewRows, i: int):
        """View i's targets: one row of each chosen teacher, combined as the ensemble says."""
        members = []
        for label, (indices, logp, log_tail) in rows.targets.items():
            members.append(SparseTargets(torch.from_numpy(indices[i:i + 1].copy()), torch.from_numpy(logp[i:i + 1].copy()),
                                         torch.from_numpy(log_tail[i:i + 1].copy()), self.num_classes,
                                         **self._rules[label]))
        choice = None if rows.choice is None else torch.from_numpy(rows.choice[i:i + 1].copy())
        return combine(members, self._weights, choice)

    def seed_for_epoch(self, epoch: int) -> int:
        """The view seed of an epoch: seeds[epoch mod S] ("cycle"), or the epoch itself without seeds."""
        return int(epoch) if not self.seeds else self.seeds[int(epoch) % len(self.seeds)]

    def set_epoch(self, epoch: int) -> None:
        """Show the views of seed_for_epoch(epoch) from now on (call before iterating the epoch's loader)."""
        self.set_view_seed(self.seed_for_epoch(epoch))

    def set_view_seed(self, seed: int) -> None:
        """Show the views of seed `seed` from now on (with a cache: one of its complete seeds)."""
        seed = int(seed)
        if self._cache_where is not None and seed not in self._complete:
            raise KdcacheError(f"{self._cache_where}: seed {seed} is not complete in this cache")
        if seed < 0:
            raise KdcacheError(f"ReplayDataset: view seed {seed} must be >= 0")
        self._chosen_view[0] = seed
        self._current()   # load here, so that workers forked afterwards share the rows

    @property
    def view_seed(self) -> int:
        return int(self._chosen_view[0])

    def _current(self) -> _ViewRows:
        seed = int(self._chosen_view[0])
        if self._rows is None or self._rows.seed != seed:
            self._rows = self._load(seed)
        return self._rows

    def partners(self) -> np.ndarray:
        """int64 (N,): each sample's mixing partner under the current seed (itself when unpaired or not mixing)."""
        n = self.split.num_samples
        offset = self.layout.mix_offset
        if offset is None:
            return np.arange(n)
        return np.arange(n) + self._current().params[:, offset + 1].astype(np.int64)

    # --- items -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.split.num_samples

    def __getitem__(self, index: int) -> ReplayItem:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"ReplayDataset: index {index} outside [0, {len(self)})")
        rows = self._current()
        view = self._render(i, rows.params[i])
        j, lam, pending = i, 1.0, None
        if self.layout.mix_offset is not None:
            mixing = rows.params[i, self.layout.mix_offset:self.layout.mix_offset + MIX_COLUMNS]
            j, lam = i + int(mixing[1]), float(mixing[2])
            if int(mixing[0]) != MODE_NONE and self.mix == "item":
                self._mix_here(view, i, j, rows)
            elif int(mixing[0]) != MODE_NONE:
                pending = self._pair_columns(i, j, rows)
        targets = None if rows.targets is None else self._item_targets(rows, i)
        image = torch.from_numpy(view).permute(2, 0, 1)
        return ReplayItem(image, int(self.labels[i]), i, targets, j, int(self.labels[j]), lam, pending)

    def _pair_columns(self, i: int, j: int, rows: _ViewRows) -> np.ndarray:
        """The pair's mixing columns, from its lower member's row (as both stages mix)."""
        o = self.layout.mix_offset
        return rows.params[min(i, j), o:o + MIX_COLUMNS].copy()

    def _mix_here(self, view: np.ndarray, i: int, j: int, rows: _ViewRows) -> None:
        """mix="item": render the partner's view too and mix the pair into `view` (in place)."""
        other = self._render(j, rows.params[j])
        lower, upper = (view, other) if i < j else (other, view)
        mix_views(lower, upper, rows.params[min(i, j)], self.layout)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None          # reopened by path where needed (zarr handles do not travel)
        state["_teachers"] = None
        del state["_chosen_view"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._chosen_view = self._chosen.numpy()


def collate_views(items: List[ReplayItem]) -> ReplayBatch:
    """ReplayItems -> ReplayBatch, mixing every pair whose mixing was left to the batch (mix="batch") exactly as
    the FFCV replay mixes: from the pair's lower member, on the two rendered uint8 views. Raises KdcacheError
    when a mixed view's partner is not in the batch (use PairBatchSampler, or mix="item")."""
    n = len(items)
    size = items[0].image.shape[1]
    images = np.empty((n, size, size, 3), np.uint8)
    where = {}
    for b, item in enumerate(items):
        images[b] = item.image.permute(1, 2, 0).numpy()
        where[item.index] = b
    for b, item in enumerate(items):
        if item.pending_mix is None:
            continue
        at = where.get(item.partner)
        if at is None:
            raise KdcacheError(f"sample {item.index}'s mixing partner {item.partner} is not in its batch: batch "
                               "with PairBatchSampler (pairs stay together), or make the dataset with mix='item'")
        if item.index < item.partner:
            mix_views(images[b], images[at], item.pending_mix, _MIX_ONLY_LAYOUT)
    targets = None if items[0].targets is None else cat_targets([it.targets for it in items])
    column = lambda name, dtype: torch.tensor([getattr(it, name) for it in items], dtype=dtype)  # noqa: E731
    return ReplayBatch(torch.from_numpy(images).permute(0, 3, 1, 2), column("label", torch.int64),
                       column("index", torch.int64), targets, column("partner", torch.int64),
                       column("partner_label", torch.int64), column("lam", torch.float32))


def paired_order(partners: np.ndarray, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> np.ndarray:
    """The samples of one epoch on one rank, pairs side by side (kdcache.augment.loader.pair_order over all
    samples): the FFCV replay's order, so with the same seed and batch size the batches are train-student's."""
    from kdcache.augment.loader import pair_order
    partners = np.asarray(partners, np.int64)
    return pair_order(np.arange(len(partners)), partners.__getitem__, seed, epoch, rank, world_size, shuffle)


ReplayDataset.collate = staticmethod(collate_views)   # DataLoader(..., collate_fn=ReplayDataset.collate)


class PairBatchSampler(Sampler[List[int]]):
    """Batches of a ReplayDataset that keep each mixing pair together (give it to DataLoader as batch_sampler).

    Parameters
    ----------
    dataset : ReplayDataset
        Its current seed's partners decide the pairs (read when an epoch's iteration starts).
    batch_size : int
        Samples per batch on this rank; even when the recipe mixes (a pair fills two places of one batch).
    shuffle : bool
        Pairs in a random order drawn from (seed, epoch) (default), or in index order.
    seed : int
        Order seed (train-student's --seed: the same batches as its FFCV replay).
    rank, world_size : int, optional
        This process's share (whole pairs); default torch.distributed's when it is initialised, else 0 and 1.
    drop_last : bool
        Drop the last incomplete batch.
    sync_dataset : bool
        set_epoch(e) also calls dataset.set_epoch(e) (default), so one call per epoch — by the user, or by
        Lightning, which calls a batch sampler's set_epoch — moves both the order and the views on.
    """

    def __init__(self, dataset: ReplayDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, drop_last: bool = False,
                 sync_dataset: bool = True):
        if batch_size < 1 or (dataset.layout.mixing and batch_size % 2):
            raise KdcacheError(f"PairBatchSampler: batch_size {batch_size} must be positive"
                               + (" and even (this recipe mixes pairs)" if dataset.layout.mixing else ""))
        if world_size is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        if not 0 <= rank < world_size:
            raise KdcacheError(f"PairBatchSampler: rank {rank} outside world size {world_size}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, int(batch_size), shuffle, int(seed)
        self.rank, self.world_size, self.drop_last, self.sync_dataset = rank, world_size, drop_last, sync_dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.sync_dataset:
            self.dataset.set_epoch(epoch)

    def order(self) -> np.ndarray:
        return paired_order(self.dataset.partners(), self.seed, self.epoch, self.rank, self.world_size, self.shuffle)

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order().tolist()
        stop = len(order) // self.batch_size * self.batch_size if self.drop_last else len(order)
        for b in range(0, stop, self.batch_size):
            yield order[b:b + self.batch_size]

    def __len__(self) -> int:
        n = len(self.order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class CentreCropDataset(Dataset):
    """Evaluation views: resize + centre crop of side int(crop_ratio · min(H, W)), the pixels of FFCV's
    CenterCropRGBImageDecoder (kdcache.augment.loader.eval_loader). Items are (image uint8 (3, S, S), label,
    index); torch's default collate batches them."""

    def __init__(self, data, *, split: str = "val", size: int = 224, crop_ratio: float = 224 / 256):
        self.dataset, self.split = _open_split(data, split)
        self.size, self.crop_ratio = int(size), float(crop_ratio)
        self.labels = np.asarray(self.split.labels, np.int64)
        self.layout = ParamLayout(renderer=1)   # renderer 1: FFCV's own resize_crop (cv::resize INTER_AREA)
        self._render = _ViewRenderer(self.split, self.size, self.layout)
        if len(self):
            _warm_renderer(self._render, self._row(0))

    def __len__(self) -> int:
        return self.split.num_samples

    def __getitem__(self, index: int):
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"CentreCropDataset: index {index} outside [0, {len(self)})")
        view = self._render(i, self._row(i))
        return torch.from_numpy(view).permute(2, 0, 1), int(self.labels[i]), i

    def _row(self, i: int) -> np.ndarray:
        """FFCV's get_center_crop as a crop row: the fractions round back to its integers in crop_box."""
        height, width = (int(x) for x in self.split.sizes[i])
        side = int(self.crop_ratio * min(height, width))
        top, left = (height - side) // 2, (width - side) // 2
        return np.array([top / height, left / width, side / height, side / width, 0.0], np.float32)
