"""Parameters of the strong augmentations: pure functions of (recipe, global seed, s, i), with timm's
distributions (erasing boxes, mixing lambda and boxes) and mutual pairs inside blocks."""


import numpy as np
import pytest
from scipy import stats

from kdcache.augment import ParamLayout, ViewRecipe, view_params
from kdcache.augment.erasing import draw_erasing
from kdcache.augment.mixing import MODE_CUTMIX, MODE_MIXUP, MODE_NONE
from kdcache.augment.rng import view_keys
from kdcache.errors import KdcacheError

N = 20000


def _params(recipe, seed=0, n=N, indices=None):
    idx = np.arange(n) if indices is None else np.asarray(indices)
    return view_params(recipe, 0, seed, idx, np.full(len(idx), 300), np.full(len(idx), 400), n)


def test_rows_do_not_depend_on_the_other_samples_of_the_call():
    recipe = ViewRecipe(size=64, aa="rand-m9-n3-mstd0.5", reprob=0.5, recount=3, mixup=0.2, cutmix=1.0, mix_block=64)
    full = _params(recipe, seed=5, n=1000)
    rng = np.random.default_rng(0)
    pick = rng.permutation(1000)[:137]
    part = view_params(recipe, 0, 5, pick, np.full(137, 300), np.full(137, 400), 1000)
    assert np.array_equal(part, full[pick])
    assert full.shape[1] == ParamLayout.of(recipe).width == 5 + 2 * 3 + (2 + 4 * 3) + 7


def test_pairs_are_mutual_inside_blocks_and_differ_between_seeds():
    recipe = ViewRecipe(size=32, mixup=1.0, mix_block=10)
    o = ParamLayout.of(recipe).mix_offset
    n = 1003                                   # the last block (3 samples) leaves one sample unpaired
    for seed in (0, 1):
        p = _params(recipe, seed, n)
        partner = np.arange(n) + p[:, o + 1].astype(int)
        assert np.array_equal(partner[partner], np.arange(n))            # mutual
        assert np.array_equal(partner // 10, np.arange(n) // 10)         # inside the block
        assert (partner == np.arange(n)).sum() == 1                      # one sample is left alone...
        alone = int(np.flatnonzero(partner == np.arange(n))[0])
        assert alone >= 1000 and p[alone, o] == MODE_NONE and p[alone, o + 2] == 1.0   # ...and never mixed
        assert np.array_equal(p[partner, o + 2], p[:, o + 2]) and np.array_equal(p[partner, o], p[:, o])
    p0, p1 = _params(recipe, 0, n), _params(recipe, 1, n)
    assert (p0[:, o + 1] != p1[:, o + 1]).mean() > 0.8


def test_mixing_draws_follow_timm():
    """mixup_prob, switch probability, Beta(alpha, alpha) lambda (KS), cutmix side int(S·sqrt(1-lam)), corrected lambda."""
    recipe = ViewRecipe(size=224, mixup=0.2, cutmix=1.0, mixup_prob=0.8, mixup_switch_prob=0.5, mix_block=256)
    o = ParamLayout.of(recipe).mix_offset
    p = _params(recipe, 3, 40000)
    lower = p[:, o + 1] > 0                                   # one row per pair
    mode, lam = p[lower, o], p[lower, o + 2].astype(np.float64)
    applied = mode != MODE_NONE
    assert abs(applied.mean() - 0.8) < 0.02
    cut = mode == MODE_CUTMIX
    assert abs(cut[applied].mean() - 0.5) < 0.03
    mix_lam = lam[mode == MODE_MIXUP]
    reference = np.round(stats.beta(0.2, 0.2).rvs(20000, random_state=np.random.default_rng(1)) * 65536) / 65536
    assert stats.ks_2samp(mix_lam, reference).pvalue > 1e-3      # lambda is stored on a 2^-16 grid
    box = p[lower][cut, o + 3:o + 7]
    area = box[:, 2] * box[:, 3]
    assert np.allclose(lam[cut], 1 - area / 224 ** 2, atol=1e-6)
    # centred boxes are uncut: side int(224 * sqrt(1 - lam_drawn)) (even-rounded halves, as timm)
    assert (box[:, 2] <= 224).all() and (box[:, 2] >= 0).all()
    # negative control: Beta(1, 1) lambda is not Beta(0.2, 0.2)
    assert stats.kstest(np.random.default_rng(0).uniform(size=2000), stats.beta(0.2, 0.2).cdf).pvalue < 1e-3


def test_erasing_draws_follow_timm():
    """Box count, area fraction and aspect of the accepted boxes against timm's own RandomErasing._erase."""
    import random
    import torch
    from timm.data.random_erasing import RandomErasing
    size, n = 64, 20000
    ours = draw_erasing(view_keys(0, 0, np.arange(n)), reprob=0.5, recount=2, size=size)
    counts = ours[:, 0]
    assert abs((counts > 0).mean() - 0.5) < 0.02
    assert abs((counts == 2).sum() / (counts > 0).sum() - 0.5) < 0.03
    h, w = ours[:, 4], ours[:, 5]
    ok = (counts > 0) & (h > 0)
    ours_area = (h * w)[ok] / size ** 2
    # timm: record the boxes it erases on a zero image with const fill... via the box sizes of a ones tensor
    random.seed(0)
    eraser = RandomErasing(probability=1.0, mode="const", max_count=1, device="cpu")
    theirs = []
    for _ in range(3000):
        x = torch.ones(3, size, size)
        eraser(x)
        theirs.append(float((x[0] == 0).sum()) / size ** 2)
    theirs = np.array(theirs)
    one_box = ok & (counts == 1)
    assert stats.ks_2samp((h * w)[one_box] / size ** 2, theirs[theirs > 0]).pvalue > 1e-3
    assert (ours_area < 1 / 3 + 0.02).all()
    big = one_box & (h >= 12) & (w >= 12)          # integer rounding widens the aspect range of small boxes
    aspect = h[big] / w[big]
    assert 0.25 < aspect.min() < 0.4 and 2.5 < aspect.max() < 4.0


def test_recipe_refuses_bad_settings_by_name():
    for bad, name in ((dict(remode="blur"), "--remode"), (dict(recount=0), "--recount"), (dict(mixup=-1), "--mixup"),
                      (dict(mix_block=7), "--mix-block"), (dict(reprob=2.0), "--reprob"), (dict(aa="rand-x9"), "rand-x9")):
        with pytest.raises(KdcacheError, match=name):
            ViewRecipe(size=32, **bad)
    assert ViewRecipe.from_dict({"size": 32, "scale": [0.08, 1], "ratio": [0.75, 1.3333], "hflip": 0.5, "aa": None,
                                 "mixup": 0.0, "cutmix": 0.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
                                 "aug_repeats": 0, "version": 1}).mixing is False     # a v1 recipe still reads


def test_crop_grid_gives_the_exact_integer_crop():
    """Strong-recipe rows keep crop fractions on a 2^-13 grid (compact on disk): the renderer's integer box is
    the same as from the exact fractions, for every canonical size below 8192."""
    from kdcache.augment.render import crop_box
    rng = np.random.default_rng(0)
    n = 5000
    H, W = rng.integers(8, 8192, n), rng.integers(8, 8192, n)
    exact = view_params(ViewRecipe(size=32), 0, 1, np.arange(n), H, W)
    grid = view_params(ViewRecipe(size=32, aa="rand-m9"), 0, 1, np.arange(n), H, W, n)
    assert not np.array_equal(exact[:, :4], grid[:, :4])
    for i in range(n):
        assert crop_box(int(H[i]), int(W[i]), grid[i]) == crop_box(int(H[i]), int(W[i]), exact[i])
    with pytest.raises(KdcacheError, match="8192"):
        view_params(ViewRecipe(size=32, aa="rand-m9"), 0, 1, np.arange(2), [100, 9000], [100, 100], 2)
