"""The student's training size per epoch: a fixed size, or FFCV's progressive-resizing ramp.

The ramp is ffcv-imagenet's `get_resolution` (train_imagenet.py): START up to epoch `ramp_start`, END from
epoch `ramp_end`, in between the linear interpolation rounded (half to even, np.round) to a multiple of
`step`; epochs counted from 0. That function lives in a script, not in the ffcv package, so it is written
out again here (tests/test_progressive.py compares it with a transcription of the original).

Defaults: ffcv-imagenet's configs put the ramp at epochs floor(E·65/88) and floor(E·76/88) (all six of its
rn18/rn50 schedules, 16 to 88 epochs, follow these fractions exactly); for short runs the end is pulled to
the last epoch and the start before it, so that END is always trained on.

The views keep their size (the recipe's): the crop box is a fraction of the image, and the pixel boxes of
erasing and cutmix are scaled to the rendered size (kdcache.augment.rescale), so only the resolution differs.
"""

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from kdcache.errors import KdcacheError

RAMP_START_FRACTION = 65 / 88   # ffcv-imagenet rn50_88_epochs.yaml: start_ramp 65, end_ramp 76
RAMP_END_FRACTION = 76 / 88
DEFAULT_STEP = 32               # FFCV's multiple


def parse_size(text: Union[str, int]) -> List[int]:
    """'N' or N -> [N, N]; 'START:END' -> [START, END] (checked against the epochs by SizeSchedule.build)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return [text, text]
    parts = str(text).split(":")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        values = [int(p) for p in parts]
    except ValueError:
        raise KdcacheError(f"--size {text!r}: expected N or START:END (pixels, e.g. 160:192)") from None
    return values * 2 if len(values) == 1 else values


@dataclass(frozen=True)
class SizeSchedule:
    start: int
    end: int
    epochs: int
    ramp_start: Optional[int] = None
    ramp_end: Optional[int] = None
    step: int = DEFAULT_STEP

    @property
    def progressive(self) -> bool:
        return self.start != self.end

    @property
    def final(self) -> int:
        return self.size(self.epochs - 1)

    def size(self, epoch: int) -> int:
        if not self.progressive or epoch <= self.ramp_start:
            return self.start
        if epoch >= self.ramp_end:
            return self.end
        interp = np.interp([epoch], [self.ramp_start, self.ramp_end], [self.start, self.end])
        return int(np.round(interp[0] / self.step)) * self.step

    def sizes(self) -> List[int]:
        return [self.size(e) for e in range(self.epochs)]

    def to_dict(self) -> dict:
        """What config.json / summary.json record: the settings and the resulting size of every epoch."""
        return {**asdict(self), "sizes": self.sizes()}

    @classmethod
    def build(cls, size: Sequence[int], epochs: int, ramp_start: Optional[int] = None, ramp_end: Optional[int] = None,
              step: int = DEFAULT_STEP) -> "SizeSchedule":
        """The checked schedule of --size START:END (or N) over --epochs; errors name the option."""
        start, end = int(size[0]), int(size[1])
        text = f"{start}:{end}" if start != end else f"{start}"
        if start < 1 or end < 1:
            raise KdcacheError(f"--size {text}: sizes must be positive")
        if start > end:
            raise KdcacheError(f"--size {text}: START must not exceed END")
        if start == end:
            for name, value in (("--ramp-start", ramp_start), ("--ramp-end", ramp_end)):
                if value is not None:
                    raise KdcacheError(f"{name} only applies to a ramp (--size START:END with START < END)")
            return cls(start, end, epochs, step=step)
        if step < 1:
            raise KdcacheError(f"--size-step must be positive, got {step}")
        for s in (start, end):   # else the rounded interpolation can leave [START, END] (16:32 by 32 gives 0)
            if s % step:
                raise KdcacheError(f"--size {text}: {s} is not a multiple of --size-step {step} "
                                   "(the ramp rounds sizes to multiples of it)")
        if epochs < 2:
            raise KdcacheError(f"--size {text} needs at least 2 epochs to ramp (--epochs {epochs})")
        if ramp_end is None:
            ramp_end = min(math.floor(epochs * RAMP_END_FRACTION), epochs - 1)
        if ramp_start is None:
            ramp_start = min(math.floor(epochs * RAMP_START_FRACTION), ramp_end - 1)
        if ramp_start < 0:
            raise KdcacheError(f"--ramp-start must be 0 or more, got {ramp_start}")
        if ramp_start >= ramp_end:
            raise KdcacheError(f"--ramp-start {ramp_start} must be before --ramp-end {ramp_end}")
        if ramp_end > epochs - 1:
            raise KdcacheError(f"--ramp-end {ramp_end}: --size {text} would never reach {end} (epochs are counted "
                               f"from 0; the last of --epochs {epochs} is {epochs - 1})")
        return cls(start, end, epochs, ramp_start, ramp_end, step)
