"""What the dump's render thread (the producer) tells the teacher's thread (the consumer), in order.

Per pass: one PassStarted, its Chunks, one PassEnded. Between rounds over the units other writers hold: a
Waiting. At the very end: a ProducerFailed if the producer raised, then always one Done."""

from dataclasses import dataclass
from typing import List, Union

import numpy as np


@dataclass(frozen=True)
class PassStarted:
    """A pass claimed these seeds of one block; params: their view parameters, (samples, seeds, P)."""
    pass_id: int
    block: int
    seeds: List[int]
    params: np.ndarray


@dataclass(frozen=True)
class Chunk:
    """Rendered views of samples start..stop-1 of a pass, (samples, seeds, H, W, 3): whole teacher batches of
    `samples_per_batch` samples (the last one may be shorter). `images` lives in a reused ring slot."""
    pass_id: int
    start: int
    stop: int
    images: np.ndarray
    samples_per_batch: int


@dataclass(frozen=True)
class PassEnded:
    """Every chunk of the pass was sent: its units can be written."""
    pass_id: int


@dataclass(frozen=True)
class Waiting:
    """`units` units this process asked for are held by other live writers; the producer polls again."""
    units: int


@dataclass(frozen=True)
class ProducerFailed:
    """The producer raised: the consumer raises it in the main thread."""
    error: BaseException


@dataclass(frozen=True)
class Done:
    """The producer has stopped (finished, stopped or failed): nothing follows."""


Message = Union[PassStarted, Chunk, PassEnded, Waiting, ProducerFailed, Done]
