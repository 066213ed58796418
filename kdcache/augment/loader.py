"""FFCV loaders over a prepared beton: the replay loader for training views, a centre-crop loader for eval.

Batches are (images, labels, indices): images uint8 NCHW (channels_last memory), labels and global
sample indices int64. Normalisation happens in torch on the training device: FFCV hangs when a jitted
op follows ToTensor on CPU (ffcv issue #396), so nothing numeric runs after ToTensor here.

The replay loader lives with the renderer it wraps (as timm keeps its transforms apart from its
trainers): verify, preview and the trainer all use it.
"""

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from kdcache.ffcv_fixes import set_traversal_order  # first: corrects FFCV as it is imported
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

from kdcache.augment.ffcv_ops import ReplayViewDecoder
from kdcache.augment.params import ParamLayout
from kdcache.errors import KdcacheError

ORDERS = {"random": OrderOption.RANDOM, "sequential": OrderOption.SEQUENTIAL, "quasi_random": OrderOption.QUASI_RANDOM}


def usable_workers(requested: Optional[int]) -> int:
    """FFCV refuses more threads than usable cores (ValueError); clamp instead."""
    cores = len(os.sched_getaffinity(0))
    return cores if not requested or requested < 1 else min(requested, cores)


def _int_pipeline():
    return [IntDecoder(), ToTensor(), Squeeze(1)]


class PairedOrder:
    """Sample order for mixing recipes and repeated augmentation (replaces FFCV's traversal order).

    Partners (the table's partner column) sit at positions 2k, 2k+1 of the order, so with an even batch
    size a pair is always in one batch, and on one rank; pairs are shuffled by (seed, pass); unpaired
    samples come last. `active` (set per pass) restricts the pass to a subset of samples (whole pairs),
    and `length` fixes the number of samples per pass and rank (repeated augmentation: N / R).
    """

    def __init__(self, loader: Loader, decoder: ReplayViewDecoder, allowed: Optional[np.ndarray], seed: int,
                 length: Optional[int]):
        self.loader, self.decoder, self.seed = loader, decoder, seed
        self.allowed = np.arange(decoder.table.shape[0]) if allowed is None else np.sort(np.asarray(allowed))
        self.active = self.allowed
        self.rank, self.world = (0, 1)
        if loader.distributed:
            import torch.distributed as dist
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.length = length

    def partners(self, samples: np.ndarray) -> np.ndarray:
        offset = self.decoder.layout.mix_offset
        if offset is None:
            return samples
        return samples + self.decoder.table[samples, offset + 1].astype(np.int64)

    def sample_order(self, epoch: int) -> np.ndarray:
        mine = pair_order(self.active, self.partners, self.seed, epoch, self.rank, self.world)
        if self.length is not None:
            mine = mine[:self.length]
        return mine


def pair_order(samples: np.ndarray, partner_of, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
               shuffle: bool = True) -> np.ndarray:
    """The order of `samples` for one epoch on one rank, pairs side by side: partners (partner_of(samples))
    at positions 2k, 2k+1, the pairs in an order drawn from (seed, epoch), then the unpaired samples (and
    those whose partner is not among `samples`); ranks get equal numbers of whole pairs and of singles.
    The FFCV replay (PairedOrder) and the map-style dataset's PairBatchSampler share it."""
    samples = np.asarray(samples)
    partner = partner_of(samples)
    inside = np.isin(partner, samples)
    lower = samples[(partner > samples) & inside]
    singles = samples[(partner == samples) | ~inside]
    if shuffle:
        rng = np.random.default_rng([seed, epoch, 0x0DE7])
        lower = rng.permutation(lower)
        singles = rng.permutation(singles)
    pairs = np.stack([lower, partner_of(lower)], 1)             # (P, 2)
    per_rank_pairs = len(pairs) // world_size
    per_rank_singles = len(singles) // world_size
    return np.concatenate([pairs[rank * per_rank_pairs:(rank + 1) * per_rank_pairs].reshape(-1),
                           singles[rank * per_rank_singles:(rank + 1) * per_rank_singles]])


class ReplayLoader:
    """Replays stored views: call `set_views(params)` with the epoch's (N, P) parameters, then iterate.

    With a mixing layout, `repeats` > 1 or `subsets` (set_views(params, active) chooses the samples of each
    pass) the order is PairedOrder (partners in one batch; an even batch size is required); otherwise
    FFCV's own order.

    `size` is the output size, changeable per epoch with set_size (progressive resizing); `view_size` the size
    the views were drawn at (the recipe's; their pixel boxes refer to it). With `teacher_size`, batches carry a
    fourth tensor: the same views rendered at that fixed size (a second decoder on the same field and table;
    each image is decoded once more), for an online teacher that scores what a cache would hold."""

    def __init__(self, beton: Path, num_samples: int, size: int, batch_size: int, workers: Optional[int] = None,
                 order: str = "random", seed: int = 0, indices: Optional[Sequence[int]] = None,
                 drop_last: bool = True, distributed: bool = False, os_cache: bool = True,
                 batches_ahead: int = 3, layout: Optional[ParamLayout] = None, repeats: int = 1,
                 subsets: bool = False, view_size: Optional[int] = None, teacher_size: Optional[int] = None):
        self.decoder = ReplayViewDecoder(num_samples, size, layout, view_size)
        paired = self.decoder.layout.mixing or repeats > 1 or subsets
        if paired and batch_size % 2:
            raise KdcacheError(f"--batch-size {batch_size}: a mixing recipe needs an even batch size (pairs share a batch)")
        pipelines = {"image": [self.decoder, ToTensor(), ToTorchImage()],
                     "label": _int_pipeline(), "index": _int_pipeline()}
        if teacher_size is not None:   # FFCV outputs custom pipelines after the fields: batch[3]
            teacher = ReplayViewDecoder(num_samples, teacher_size, layout, self.decoder.view_size, self.decoder.table)
            pipelines["teacher_image"] = PipelineSpec("image", decoder=teacher, transforms=[ToTensor(), ToTorchImage()])
        self.loader = Loader(
            str(beton), batch_size=batch_size, num_workers=usable_workers(workers), order=ORDERS[order],
            seed=seed, indices=None if indices is None else np.asarray(indices), drop_last=drop_last,
            distributed=distributed, os_cache=os_cache, batches_ahead=batches_ahead, pipelines=pipelines)
        self.order = None
        if paired:
            allowed = None if indices is None else np.asarray(indices)
            total = num_samples if indices is None else len(allowed)
            world = torch.distributed.get_world_size() if distributed else 1
            length = (total // repeats) // world // 2 * 2 if repeats > 1 else None
            self.order = PairedOrder(self.loader, self.decoder, allowed, seed, length)
            # a pass has `length` samples per rank (or all of them)
            set_traversal_order(self.loader, self.order, length if length is not None else (total // world))

    def set_views(self, params: np.ndarray, active: Optional[np.ndarray] = None) -> None:
        """The pass's view parameters; `active`: the samples this pass shows (repeated augmentation)."""
        self.decoder.set_views(params)
        if self.order is not None:
            self.order.active = self.order.allowed if active is None else np.intersect1d(self.order.allowed, active)
        elif active is not None:
            raise KdcacheError("a subset of samples per pass needs the paired order (repeats > 1)")

    def set_size(self, size: int) -> None:
        """The output size of the next epochs (before iter(): FFCV allocates an epoch's buffers when it starts)."""
        self.decoder.output_size = (int(size), int(size))

    @property
    def size(self) -> int:
        return self.decoder.output_size[0]

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        offset = self.decoder.layout.mix_offset
        for batch in self.loader:
            if offset is not None:  # the decoder mixes inside the batch: every partner must be there
                idx = batch[2].numpy()
                rows = self.decoder.table[idx]
                mixed = rows[:, offset] != 0
                if not np.isin(idx[mixed] + rows[mixed, offset + 1].astype(np.int64), idx).all():
                    raise KdcacheError("a mixing partner was not in its batch (the sample order must keep pairs "
                                       "together; this batch's views are not the cached ones)")
            yield batch


def eval_loader(beton: Path, size: int, batch_size: int, workers: Optional[int] = None,
                crop_ratio: float = 224 / 256, indices: Optional[Sequence[int]] = None) -> Loader:
    """Resize + centre crop (FFCV's CenterCropRGBImageDecoder), sequential, every sample kept."""
    return Loader(
        str(beton), batch_size=batch_size, num_workers=usable_workers(workers), order=OrderOption.SEQUENTIAL,
        drop_last=False, indices=None if indices is None else np.asarray(indices),
        pipelines={"image": [CenterCropRGBImageDecoder((size, size), crop_ratio), ToTensor(), ToTorchImage()],
                   "label": _int_pipeline(), "index": _int_pipeline()})
