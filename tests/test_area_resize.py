"""Renderer 2's resize (kdcache.augment.area_resize) against an independent float64 area resample, and
against OpenCV's INTER_AREA (renderer 1) where that one is an area resample too."""

import cv2
import numpy as np
import pytest

from kdcache.augment import ParamLayout, ViewRecipe
from kdcache.augment.render import crop_box, render_views

V2 = ParamLayout.of(ViewRecipe(size=8, renderer=2))


def _area_matrix(src: int, dst: int) -> np.ndarray:
    """Dense (dst, src) weights: overlap of output pixel i's footprint [i*s, (i+1)*s) with source pixel j, / s."""
    s = src / dst
    m = np.zeros((dst, src))
    for i in range(dst):
        for j in range(src):
            m[i, j] = max(0.0, min((i + 1) * s, j + 1) - max(i * s, j)) / s
    return m


def _reference(crop: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    wy, wx = _area_matrix(crop.shape[0], out_h), _area_matrix(crop.shape[1], out_w)
    return np.stack([wy @ crop[:, :, c].astype(np.float64) @ wx.T for c in range(3)], -1)


def _render(image: np.ndarray, row, size: int, layout=V2) -> np.ndarray:
    return render_views(image, np.array(row, np.float32), size, layout)[0]


@pytest.mark.parametrize("crop_hw,size", [((90, 70), 32), ((40, 55), 24), ((20, 30), 48), ((17, 60), 33),
                                          ((64, 64), 32), ((31, 29), 31), ((120, 8), 16)])
def test_area_resample_matches_a_float64_reference(crop_hw, size):
    """Shrinking, growing, one axis each way, integer factors, odd sizes: within rounding of exact area
    weights, and on average unbiased (up to round-half-up: an exact factor of 2 puts values on a quarter grid,
    whose rounding adds 1/8 on average, as OpenCV's does)."""
    rng = np.random.default_rng(crop_hw[0] * 1000 + size)
    image = rng.integers(0, 256, (130, 110, 3), np.uint8)
    h, w = crop_hw
    row = [7 / 130, 5 / 110, h / 130, w / 110, 0.0]
    top, left, ch, cw = crop_box(130, 110, row)
    assert (ch, cw) == (h, w)
    got = _render(image, row, size).astype(np.float64)
    want = _reference(image[top:top + h, left:left + w], size, size)
    assert np.abs(got - want).max() <= 1.0
    assert abs((got - want).mean()) <= 0.126


def test_mirror_is_the_mirrored_resample_and_flat_stays_flat():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 80, 3), np.uint8)
    crop = [0.1, 0.2, 0.7, 0.6]
    assert np.array_equal(_render(image, crop + [1.0], 21), _render(image, crop + [0.0], 21)[:, ::-1])
    flat = np.full((60, 80, 3), (255, 0, 137), np.uint8)
    assert (_render(flat, crop + [0.0], 23) == np.array([255, 0, 137], np.uint8)).all()


@pytest.mark.parametrize("crop_hw", [(96, 80), (14, 12)])
def test_equals_opencv_inter_area_up_to_rounding_where_both_are_area(crop_hw):
    """Both axes shrinking or both growing: INTER_AREA (renderer 1) is the same filter; pixels differ by at
    most one level (fixed-point vs float rounding)."""
    rng = np.random.default_rng(5)
    image = cv2.GaussianBlur(rng.integers(0, 256, (100, 100, 3), np.uint8), (3, 3), 0)
    h, w = crop_hw
    row = [0.0, 0.0, h / 100, w / 100, 0.0]
    v1 = _render(image, row, 40, ParamLayout.of(ViewRecipe(size=40, renderer=1)))
    v2 = _render(image, row, 40)
    assert np.abs(v1.astype(int) - v2).max() <= 1
