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

FFCV's fractions leave END the last 14-19 % of the epochs, late in a decaying learning rate: enough for its
160 -> 192 ramps, not for a ramp that changes the size much more. A ramp by 1.5x or more that trains less
than half of its epochs at END gets a warning with the numbers (adaptation_warning; issue 18: 16:32 over 16
epochs lost 3.3 points to a fixed 32 px on Fashion-MNIST, and 16 to 20 on a user's dataset, 24:32 nothing;
BENCHMARKS.md). The defaults stay FFCV's.
"""

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from kdcache.errors import KdcacheError

RAMP_START_FRACTION = 65 / 88   # ffcv-imagenet rn50_88_epochs.yaml: start_ramp 65, end_ramp 76
RAMP_END_FRACTION = 76 / 88
DEFAULT_STEP = 32               # FFCV's multiple
WARN_RATIO = 1.5                # adaptation_warning: END / START at least this (FFCV's epochs, 16 in all: 2x lost
WARN_END_SHARE = 0.5            # 3.3 points, 1.6x 2.2, 1.33x none) and less than this share of the epochs at END
                                # (2x: 19 % lost 3.3 points, 31 % 1.5, 44 % 1.4, 50 % 0.6; BENCHMARKS.md, issue 18)


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

    @property
    def first_final_epoch(self) -> int:
        """The first epoch of the last size's closing run of epochs (0 for a fixed size)."""
        sizes = self.sizes()
        e = len(sizes) - 1
        while e > 0 and sizes[e - 1] == sizes[-1]:
            e -= 1
        return e

    def ramp_ending_at_half(self) -> "SizeSchedule":
        """The same ramp (START, END, step, ramp length in epochs) moved earlier, so that END is trained for at
        least half of the epochs: what adaptation_warning suggests."""
        end = self.epochs // 2
        return SizeSchedule.build((self.start, self.end), self.epochs, max(0, end - (self.ramp_end - self.ramp_start)),
                                  end, self.step)

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


def final_size_training(schedule: SizeSchedule, steps_per_epoch: int, lr_curve: Sequence[Tuple[int, float]]) -> dict:
    """How much of the run trains at its last size: what summary.json records as `final_size`. `lr_curve`:
    (update t, learning rate of update t + 1) of the run's scheduler at evenly spaced t from 0 (all or a
    sample). lr_start: the learning rate when the last size starts, as a fraction of the run's peak;
    lr_share: the share of the run's summed learning rate spent at the last size."""
    first = schedule.first_final_epoch
    at, total = first * steps_per_epoch, schedule.epochs * steps_per_epoch
    t = np.array([p[0] for p in lr_curve], dtype=np.int64)
    lr = np.array([p[1] for p in lr_curve], dtype=np.float64)
    peak, summed = float(lr.max(initial=0.0)), float(lr.sum())
    return {"size": schedule.final, "first_epoch": first, "epochs": schedule.epochs - first,
            "steps": total - at, "of_steps": total,
            "lr_start": float(np.interp(at, t, lr)) / peak if peak > 0 else 0.0,
            "lr_share": float(lr[t >= at].sum()) / summed if summed > 0 else 0.0}


def adaptation_warning(schedule: SizeSchedule, final: dict) -> Optional[str]:
    """The warning for a ramp by WARN_RATIO or more that trains less than WARN_END_SHARE of its epochs at END
    (None otherwise), with the numbers (`final`: final_size_training's) and the ramp that would train half."""
    if not schedule.progressive or schedule.end < WARN_RATIO * schedule.start:
        return None
    if final["epochs"] >= WARN_END_SHARE * schedule.epochs:
        return None
    better = schedule.ramp_ending_at_half()
    return (f"--size {schedule.start}:{schedule.end} ramps the size {schedule.end / schedule.start:.2g}x but trains only "
            f"{final['epochs']} of {schedule.epochs} epochs at {schedule.end} px ({final['steps']} of "
            f"{final['of_steps']} steps, from epoch {final['first_epoch']} counted from 0, the learning rate there "
            f"from {100 * final['lr_start']:.1f} % of its peak down, {100 * final['lr_share']:.1f} % of its sum): the "
            f"student may stay adapted to the smaller sizes and lose accuracy at {schedule.end} px (issue 18: 16:32 "
            f"over 16 epochs lost 3.3 points to a fixed 32 px; docs/training.md). --ramp-start {better.ramp_start} "
            f"--ramp-end {better.ramp_end} trains {better.epochs - better.first_final_epoch} of them at {schedule.end} px")
