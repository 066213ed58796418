"""FFCV loaders over a prepared beton: the replay loader for training views, a centre-crop loader for eval.

Batches are (images, labels, indices): images uint8 NCHW (channels_last memory), labels and global
sample indices int64. Normalisation happens in torch on the training device: FFCV hangs when a jitted
op follows ToTensor on CPU (ffcv issue #396), so nothing numeric runs after ToTensor here.
"""

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

from kdcache.augment.ffcv_ops import ReplayViewDecoder

ORDERS = {"random": OrderOption.RANDOM, "sequential": OrderOption.SEQUENTIAL, "quasi_random": OrderOption.QUASI_RANDOM}


def usable_workers(requested: Optional[int]) -> int:
    """FFCV refuses more threads than usable cores (ValueError); clamp instead."""
    cores = len(os.sched_getaffinity(0))
    return cores if not requested or requested < 1 else min(requested, cores)


def _int_pipeline():
    return [IntDecoder(), ToTensor(), Squeeze(1)]


class ReplayLoader:
    """Replays stored views: call `set_views(params)` with the epoch's (N, 5) parameters, then iterate."""

    def __init__(self, beton: Path, num_samples: int, size: int, batch_size: int, workers: Optional[int] = None,
                 order: str = "random", seed: int = 0, indices: Optional[Sequence[int]] = None,
                 drop_last: bool = True, distributed: bool = False, os_cache: bool = True,
                 batches_ahead: int = 3):
        self.decoder = ReplayViewDecoder(num_samples, size)
        self.loader = Loader(
            str(beton), batch_size=batch_size, num_workers=usable_workers(workers), order=ORDERS[order],
            seed=seed, indices=None if indices is None else np.asarray(indices), drop_last=drop_last,
            distributed=distributed, os_cache=os_cache, batches_ahead=batches_ahead,
            pipelines={"image": [self.decoder, ToTensor(), ToTorchImage()],
                       "label": _int_pipeline(), "index": _int_pipeline()})

    def set_views(self, params: np.ndarray) -> None:
        self.decoder.set_views(params)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return iter(self.loader)


def eval_loader(beton: Path, size: int, batch_size: int, workers: Optional[int] = None,
                crop_ratio: float = 224 / 256, indices: Optional[Sequence[int]] = None) -> Loader:
    """Resize + centre crop (FFCV's CenterCropRGBImageDecoder), sequential, every sample kept."""
    return Loader(
        str(beton), batch_size=batch_size, num_workers=usable_workers(workers), order=OrderOption.SEQUENTIAL,
        drop_last=False, indices=None if indices is None else np.asarray(indices),
        pipelines={"image": [CenterCropRGBImageDecoder((size, size), crop_ratio), ToTensor(), ToTorchImage()],
                   "label": _int_pipeline(), "index": _int_pipeline()})
