"""The public readers: `open_dataset` (a prepared dataset) and `open_cache` (a teacher cache, its identity and
its stored rows). Reads go through the same checks as training's (kdcache.cache.slabs.read_slab: every unit
checked against its marker's size and CRC32C, only complete seeds), so a damaged cache is refused by name here too.
"""

import logging
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.slabs import Slab, read_slab
from kdcache.cache.targets import SparseTargets
from kdcache.data.dataset import PreparedDataset
from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)

Rows = Union[None, int, slice, np.ndarray, List[int], torch.Tensor]


def open_dataset(path) -> PreparedDataset:
    """A prepared dataset (`kdcache prepare`'s output): its splits, labels, beton and shards.

    Parameters
    ----------
    path : str or Path
        The dataset directory (it holds manifest.json).
    """
    return PreparedDataset.open(path)


def open_cache(path_or_url=None, *, root=None, cache_id: Optional[str] = None, teacher_sha256: Optional[str] = None,
               split_fingerprint: Optional[str] = None, split: str = "train") -> "Cache":
    """Open a teacher cache for reading (nothing is ever written; read-only mounts and URLs work).

    Parameters
    ----------
    path_or_url : str or Path
        Without `root`: the cache itself, a local path or a URL (s3://..., gs://..., https://... of a
        published cache). With `root`: the prepared dataset the cache was made for (its `split`'s
        fingerprint chooses the cache), or None when `split_fingerprint` is given.
    root : str, optional
        A cache root holding many caches (`kdcache ls ROOT`); the one made for the dataset is found as
        `kdcache train-student --cache-root` finds it.
    cache_id, teacher_sha256 : str, optional
        With `root`: narrow the choice to the cache of this id, or whose teacher's sha256 starts with this.
    split_fingerprint : str, optional
        With `root`, instead of a dataset path: the split fingerprint to match (``Cache.dataset["split_fingerprint"]``).
    split : str
        With `root` and a dataset path: the split the cache was dumped over.

    Returns
    -------
    Cache
    """
    from kdcache.cache.schema import TeacherCache
    if root is None:
        if cache_id or teacher_sha256 or split_fingerprint:
            raise KdcacheError("open_cache: cache_id, teacher_sha256 and split_fingerprint choose among the caches "
                               "of a root; give root= too")
        if path_or_url is None:
            raise KdcacheError("open_cache: give the cache's path or URL (or root= and the dataset)")
        return Cache(TeacherCache.open(str(path_or_url)))
    from kdcache.cache.catalog import find_cache
    if (path_or_url is None) == (split_fingerprint is None):
        raise KdcacheError("open_cache with root=: give either the dataset's path or split_fingerprint=, not both")
    if split_fingerprint is None:
        split_fingerprint = open_dataset(path_or_url).split(split).fingerprint
    return Cache(find_cache(root, split_fingerprint, cache_id, teacher_sha256))


class Cache:
    """A teacher cache opened for reading (made by `open_cache`).

    Identity: `path`, `recipe`, `teacher`, `dataset`, `global_seed`, `topk`, `num_classes`, `num_samples`;
    `seeds`: the complete augmentation seeds; `teachers`: the labels of the teachers over its views (its own
    first, then those added with `dump-teacher --add-teacher`). Readers of a seed's rows: `targets`, `probs`
    (of any of its teachers), `view_params`. A seed's rows are read whole once (one slab, every unit checked)
    and kept until another seed is read.
    """

    def __init__(self, cache):
        self._cache = cache          # kdcache.cache.schema.TeacherCache
        self._slab: Optional[Slab] = None
        self._teacher_slabs: Dict[str, Slab] = {}   # an added teacher's slab of one seed, by label

    def __repr__(self) -> str:
        return f"Cache({self.path!r}, teacher={self.teacher.get('name')!r}, top-{self.topk} of {self.num_classes})"

    @property
    def teacher_cache(self):
        """The underlying kdcache.cache.schema.TeacherCache (internal: kdcache's own loaders take it)."""
        return self._cache

    @property
    def path(self) -> str:
        """Where the cache is: a local path or a URL."""
        return self._cache.path

    @property
    def identity(self) -> dict:
        """The cache's identity as its root document records it (teacher, dataset, recipe as stored,
        global_seed, topk, num_classes, values_dtype, unit size, ...): what makes two caches the same."""
        import dataclasses
        return dataclasses.asdict(self._cache.spec)

    @property
    def recipe(self) -> ViewRecipe:
        """How the views were drawn and rendered."""
        return ViewRecipe.from_dict(self._cache.spec.recipe)

    @property
    def teacher(self) -> dict:
        """The teacher's record: name, sha256 of its weights, num_classes, mean, std, checkpoint, ..."""
        return dict(self._cache.spec.teacher)

    @property
    def dataset(self) -> dict:
        """The dataset identity: fingerprint, split, split_fingerprint, num_samples, num_classes, view_size."""
        return dict(self._cache.spec.dataset)

    @property
    def global_seed(self) -> int:
        return self._cache.spec.global_seed

    @property
    def seeds(self) -> List[int]:
        """The complete augmentation seeds, ascending (read from the store at each call: dumps may add seeds)."""
        return self._cache.complete_seeds()

    @property
    def topk(self) -> int:
        return self._cache.spec.topk

    @property
    def num_classes(self) -> int:
        return self._cache.spec.num_classes

    @property
    def num_samples(self) -> int:
        return self._cache.spec.num_samples

    @property
    def teachers(self) -> List[str]:
        """The labels of the cache's teachers: its own teacher's first (the teacher's name), then the added ones
        (`kdcache info CACHE` lists them with their seeds). Read from the store at each call."""
        return list(self._cache.teachers())

    def _teacher_cache(self, teacher: Optional[str]):
        """The TeacherCache of teacher label `teacher` (None: the cache's own)."""
        if teacher is None or teacher == self._cache.label:
            return self._cache
        added = self._cache.added_teachers()
        if teacher not in added:
            raise KdcacheError(f"{self.path}: no teacher labelled {teacher!r} in this cache; its teachers: "
                               f"{', '.join([self._cache.label, *added])}")
        return added[teacher]

    def _read_teacher(self, seed: int, teacher: Optional[str]) -> Slab:
        """The slab of `seed` of one teacher: the cache's own (with the view rows), or an added one's."""
        cache = self._teacher_cache(teacher)
        if cache is self._cache:
            return self._read(seed)
        slab = self._teacher_slabs.get(teacher)
        if slab is None or slab.seed != seed:
            complete = cache.complete_seeds()
            if seed not in complete:
                raise KdcacheError(f"{cache.path}: seed {seed} is not a complete seed of teacher {teacher!r} "
                                   f"(complete: {complete})")
            self._teacher_slabs.pop(teacher, None)
            slab = self._teacher_slabs[teacher] = read_slab(cache, seed)
        return slab

    def _read(self, seed: int) -> Slab:
        if self._slab is None or self._slab.seed != seed:
            complete = self.seeds
            if seed not in complete:
                raise KdcacheError(f"{self.path}: seed {seed} is not a complete seed of this cache (complete: {complete})")
            log.debug("%s: reading seed %d", self.path, seed)
            self._slab = None   # the old slab's memory is free before the new one is read
            self._slab = read_slab(self._cache, seed)
        return self._slab

    def _rows(self, rows: Rows) -> Union[slice, np.ndarray]:
        if rows is None:
            return slice(None)
        if isinstance(rows, slice):
            return rows
        picked = np.atleast_1d(np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows))
        if picked.dtype.kind not in "iu":
            raise KdcacheError(f"{self.path}: rows must be sample indices (integers), got {picked.dtype}")
        n = self.num_samples
        bad = picked[(picked < 0) | (picked >= n)]
        if bad.size:
            raise KdcacheError(f"{self.path}: sample index {int(bad.flat[0])} is outside the cache's {n} samples")
        return picked.astype(np.int64)

    def targets(self, seed: int, rows: Rows = None, *, teacher: Optional[str] = None) -> SparseTargets:
        """The stored teacher answers of views (rows, seed).

        Parameters
        ----------
        seed : int
            A complete augmentation seed (`seeds`; an added teacher must have it complete too).
        rows : int, slice, sequence or tensor of int, optional
            Global sample indices (default: every sample, in order); an int is a batch of one.
        teacher : str, optional
            A label of `teachers` (default: the cache's own teacher).

        Returns
        -------
        SparseTargets
            indices (B, n) int64, logp (B, n) float32, log_tail (B,) float32, on the CPU, with the teacher's
            target rule (top-k: n = k, descending; sampled: k exact columns then m draws, docs/cache-format.md).
            Several teachers' targets combine with ``MixedTargets([...], weights=...)``.
        """
        slab, picked = self._read_teacher(seed, teacher), self._rows(rows)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a[picked]))   # noqa: E731
        return SparseTargets(t(slab.indices).long(), t(slab.logp), t(slab.log_tail), self.num_classes,
                             **self._teacher_cache(teacher).spec.target_rule())

    def probs(self, seed: int, rows: Rows = None, temperature: float = 1.0, *,
              teacher: Optional[str] = None) -> torch.Tensor:
        """(B, C) float32 teacher probabilities of views (rows, seed), softened at `temperature` (top-k: the
        uniform-tail rebuild, exact for k = C; sampled: the importance-weighted target, docs/cache-format.md);
        `teacher`: a label of `teachers` (default: the cache's own)."""
        return self.targets(seed, rows, teacher=teacher).probs(temperature)

    def view_params(self, seed: int, rows: Rows = None) -> np.ndarray:
        """(B, P) float32 parameter rows of views (rows, seed): crop box, flip, RandAugment, erasing, mixing
        (columns: kdcache.augment.params.ParamLayout of `recipe`; docs/views.md)."""
        slab, picked = self._read(seed), self._rows(rows)
        return np.array(slab.params[picked], dtype=np.float32)

    def check_made_for(self, dataset: PreparedDataset, split: str = "train") -> None:
        """Refuse (KdcacheError) a dataset other than the one this cache was dumped over: another split
        fingerprint (another dataset, or another prepare of it) or another class count."""
        self._cache.check_made_for(dataset, split)

    def summary(self) -> dict:
        """What `kdcache info CACHE --json` prints."""
        return self._cache.summary()


def list_caches(root, unreadable: Optional[List[dict]] = None) -> List[Cache]:
    """The caches under a cache root (`kdcache ls ROOT`), each opened for reading.

    Parameters
    ----------
    root : str or Path
        A directory or URL holding caches (each in a folder named by its id).
    unreadable : list, optional
        If given, each cache whose metadata cannot be read is appended to it as ``{"path", "error"}``
        instead of being skipped silently.
    """
    from kdcache.cache.catalog import list_caches as _list
    return [Cache(c) for c in _list(root, unreadable)]
