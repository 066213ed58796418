"""View parameters: a pure function of (recipe, global seed, s, i), with torchvision's RRC distribution."""

import multiprocessing

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from kdcache.augment import ViewRecipe, view_params
from kdcache.augment.params import rrc_boxes
from kdcache.augment.render import crop_box  # plain Python here: same integers as compiled
from kdcache.augment.rng import splitmix64, view_keys
from kdcache.errors import KdcacheError

M64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_splitmix64_matches_reference_and_published_value():
    # First output of the splitmix64 generator seeded with 0 (Vigna's reference implementation).
    assert int(splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF
    xs = [0, 1, 2**63, M64, 123456789, 0xDEADBEEF]
    got = splitmix64(np.array(xs, dtype=np.uint64))
    assert [int(g) for g in got] == [splitmix64_reference(x) for x in xs]


def _sizes(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(20, 700, n), rng.integers(20, 700, n)


def _chunked(recipe, gseed, s, idx, H, W, bounds):
    parts = [view_params(recipe, gseed, s, idx[a:b], H[a:b], W[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate(parts)


def _params_worker(args):
    recipe, gseed, s, idx, H, W = args
    return view_params(recipe, gseed, s, idx, H, W)


def test_params_do_not_depend_on_batching_order_or_workers():
    recipe = ViewRecipe()
    n = 20000
    H, W = _sizes(n)
    idx = np.arange(n)
    whole = view_params(recipe, 7, 3, idx, H, W)
    # any range split ("batch size")
    for bs in (1, 37, 4096):
        bounds = list(range(0, n, bs)) + [n]
        if bs == 1:
            bounds = list(range(0, 300)) + [n]  # singletons for the first 300, then one block
        assert np.array_equal(_chunked(recipe, 7, 3, idx, H, W, bounds), whole)
    # any order
    perm = np.random.default_rng(1).permutation(n)
    shuffled = view_params(recipe, 7, 3, idx[perm], H[perm], W[perm])
    assert np.array_equal(shuffled[np.argsort(perm)], whole)
    # any number of worker processes, each taking strided shares (one pool for both splits: a spawned
    # worker's start-up, importing torch, is most of this test's time)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for workers in (2, 3):
            jobs = [(recipe, 7, 3, idx[w::workers], H[w::workers], W[w::workers]) for w in range(workers)]
            parts = pool.map(_params_worker, jobs, chunksize=1)
            merged = np.empty_like(whole)
            for w, part in enumerate(parts):
                merged[w::workers] = part
            assert np.array_equal(merged, whole)


def test_params_change_with_each_input_and_stay_valid():
    recipe = ViewRecipe()
    n = 5000
    rng = np.random.default_rng(0)
    H, W = rng.integers(200, 700, n), rng.integers(200, 700, n)  # large enough that boxes rarely coincide
    idx = np.arange(n)
    base = view_params(recipe, 0, 0, idx, H, W)
    for other in (view_params(recipe, 1, 0, idx, H, W),                     # global seed
                  view_params(recipe, 0, 1, idx, H, W),                     # augmentation seed
                  view_params(recipe, 0, 0, idx + 1, H, W),                 # sample index
                  view_params(ViewRecipe(scale=(0.5, 1.0)), 0, 0, idx, H, W)):  # recipe
        assert (np.abs(other[:, :4] - base[:, :4]).sum(1) > 0).mean() > 0.99
    assert np.array_equal(view_params(recipe, 0, 0, idx, H, W), base)
    # boxes lie inside the image and are at least one pixel
    for j in range(0, n, 7):
        top, left, h, w = crop_box(int(H[j]), int(W[j]), base[j])
        assert h >= 1 and w >= 1 and top + h <= H[j] and left + w <= W[j]
    assert set(np.unique(base[:, 4])) <= {0.0, 1.0}
    assert abs(base[:, 4].mean() - 0.5) < 0.03
    assert view_params(ViewRecipe(hflip=0.0), 0, 0, idx, H, W)[:, 4].sum() == 0


def test_fractions_map_back_to_torchvision_integer_boxes():
    """Stored fractions reproduce the integer box drawn at the canonical resolution exactly."""
    n = 3000
    H, W = _sizes(n, seed=5)
    keys = view_keys(0, 0, np.arange(n))
    top, left, h, w = rrc_boxes(keys, H, W, (0.08, 1.0), (3 / 4, 4 / 3))
    params = view_params(ViewRecipe(), 0, 0, np.arange(n), H, W)
    for j in range(n):
        assert crop_box(int(H[j]), int(W[j]), params[j]) == (top[j], left[j], h[j], w[j])


@pytest.mark.parametrize("height,width", [(300, 400), (224, 224)])
def test_crop_distribution_matches_torchvision(height, width):
    """KS test over 20k draws: area fraction and aspect ratio against RandomResizedCrop.get_params."""
    n = 20000
    keys = view_keys(0, 0, np.arange(n))
    H, W = np.full(n, height), np.full(n, width)
    top, left, h, w = rrc_boxes(keys, H, W, (0.08, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = np.array([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    ours_area, ref_area = h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)
    ours_aspect, ref_aspect = w / h, ref[:, 3] / ref[:, 2]
    assert ks_2samp(ours_area, ref_area).pvalue > 0.01
    assert ks_2samp(ours_aspect, ref_aspect).pvalue > 0.01
    assert ks_2samp(top / height, ref[:, 0] / height).pvalue > 0.01
    # the test has power: a different scale range is rejected outright
    _, _, h2, w2 = rrc_boxes(keys, H, W, (0.25, 1.0), (3 / 4, 4 / 3))
    assert ks_2samp(h2 * w2 / (height * width), ref_area).pvalue < 1e-6


def test_fallback_is_torchvisions_centre_crop():
    """When no attempt fits (a 1000x50 strip, area >= 99 %), both fall back to the same central box."""
    torch.manual_seed(0)
    expected = RandomResizedCrop.get_params(torch.zeros(3, 1000, 50), (0.99, 1.0), (3 / 4, 4 / 3))
    keys = view_keys(0, 0, np.arange(50))
    top, left, h, w = rrc_boxes(keys, np.full(50, 1000), np.full(50, 50), (0.99, 1.0), (3 / 4, 4 / 3))
    assert set(zip(top, left, h, w)) == {tuple(expected)}


def test_imagenet_sized_range_in_one_call():
    """Not a timing test (tools/bench_views.py times it): 1.28M views in one vectorised call, one valid row
    per sample, and the tail of the range equal to the same samples asked for alone."""
    n = 1_281_167
    H, W = np.full(n, 375), np.full(n, 500)
    p = view_params(ViewRecipe(), 0, 0, np.arange(n), H, W)
    assert p.shape == (n, 5) and np.isfinite(p).all()
    tail = np.arange(n - 1000, n)
    assert np.array_equal(p[tail], view_params(ViewRecipe(), 0, 0, tail, H[tail], W[tail]))


def test_recipe_round_trips_and_refuses_bad_ranges():
    with pytest.raises(KdcacheError, match="--scale"):
        ViewRecipe(scale=(0.9, 0.1))
    r = ViewRecipe(size=32, scale=(0.35, 1.0))
    assert ViewRecipe.from_dict(r.to_dict()) == r
    strong = ViewRecipe(size=32, aa="rand-m7-mstd0.5", reprob=0.25, mixup=0.1, cutmix=1.0, aug_repeats=3)
    assert ViewRecipe.from_dict(strong.to_dict()) == strong and strong.digest() != r.digest()
    assert r.digest() != ViewRecipe(size=32).digest()
