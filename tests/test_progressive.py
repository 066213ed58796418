"""Progressive resizing from one cache (issue 11): FFCV's size ramp, views rendered at another size with the
same crop box and augmentations, per-epoch sizes in the FFCV loader, and train-student --size START:END."""

import json

import numpy as np
import pytest

from kdcache.errors import KdcacheError
from kdcache.student.resolution import SizeSchedule, parse_size


def _ffcv_imagenet_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp, step=32):
    """ffcv-imagenet's train_imagenet.py get_resolution, written out here as the reference (the script is not
    importable); only the multiple (32 there) is a parameter."""
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / step)) * step


@pytest.mark.parametrize("epochs,start,end", [(16, 11, 13), (24, 17, 20), (32, 23, 27), (40, 29, 34), (56, 41, 48),
                                              (88, 65, 76)])
def test_default_ramp_is_ffcv_imagenets_configs(epochs, start, end):
    """The rn50/rn18 configs of ffcv-imagenet (160 -> 192): their ramp epochs for every schedule length."""
    s = SizeSchedule.build((160, 192), epochs)
    assert (s.ramp_start, s.ramp_end, s.step) == (start, end, 32)
    assert [s.size(e) for e in range(epochs)] == [
        _ffcv_imagenet_get_resolution(e, 160, 192, end, start) for e in range(epochs)]


def test_schedule_follows_ffcv_semantics_with_a_smaller_step():
    s = SizeSchedule.build((16, 32), 12, ramp_start=2, ramp_end=8, step=4)
    sizes = [s.size(e) for e in range(12)]
    assert sizes == [_ffcv_imagenet_get_resolution(e, 16, 32, 8, 2, step=4) for e in range(12)]
    assert sizes == [16, 16, 16, 20, 20, 24, 28, 28, 32, 32, 32, 32]
    assert s.sizes() == sizes and s.final == 32 and s.progressive


def test_short_runs_still_reach_the_end_size():
    """FFCV's fractions floor to the last epoch or past it for few epochs: the default ramp ends by the last epoch."""
    for epochs in (2, 3, 4, 5):
        s = SizeSchedule.build((16, 32), epochs, step=8)
        assert s.sizes()[0] == 16 and s.sizes()[-1] == 32, epochs


def test_fixed_size():
    s = SizeSchedule.build((24, 24), 3)
    assert s.sizes() == [24, 24, 24] and not s.progressive and s.final == 24
    assert parse_size("24") == [24, 24] and parse_size(24) == [24, 24] and parse_size("16:32") == [16, 32]


def test_schedule_round_trips_through_its_record():
    s = SizeSchedule.build((16, 32), 6, step=8)
    rec = s.to_dict()
    assert rec["sizes"] == s.sizes() and SizeSchedule(**{k: v for k, v in rec.items() if k != "sizes"}) == s


@pytest.mark.parametrize("size,kw,epochs,message", [
    ("16:32", {}, 6, "--size 16:32: 16 is not a multiple of --size-step 32 (the ramp rounds sizes to multiples of it)"),
    ("32:16", {"step": 8}, 6, "--size 32:16: START must not exceed END"),
    ("0:32", {"step": 8}, 6, "--size 0:32: sizes must be positive"),
    ("16:32", {"step": 0}, 6, "--size-step must be positive, got 0"),
    ("16:32", {"step": 8, "ramp_start": 4, "ramp_end": 4}, 6, "--ramp-start 4 must be before --ramp-end 4"),
    ("16:32", {"step": 8, "ramp_start": -1}, 6, "--ramp-start must be 0 or more, got -1"),
    ("16:32", {"step": 8, "ramp_end": 6}, 6,
     "--ramp-end 6: --size 16:32 would never reach 32 (epochs are counted from 0; the last of --epochs 6 is 5)"),
    ("16:32", {"step": 8}, 1, "--size 16:32 needs at least 2 epochs to ramp (--epochs 1)"),
    ("32", {"ramp_end": 2}, 6, "--ramp-end only applies to a ramp (--size START:END with START < END)"),
])
def test_bad_schedules_are_one_line_errors_naming_the_option(size, kw, epochs, message):
    with pytest.raises(KdcacheError) as err:
        SizeSchedule.build(parse_size(size), epochs, **kw)
    assert str(err.value) == message


@pytest.mark.parametrize("text", ["16-32", "a:b", "16:24:32", ""])
def test_bad_size_text(text):
    with pytest.raises(KdcacheError, match=r"^--size .*: expected N or START:END"):
        parse_size(text)
