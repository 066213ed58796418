"""Same pixels with the strong augmentations: RandAugment, random erasing, mixup and cutmix views
replayed by the FFCV loader equal the dump's render (kdcache.augment.render.render_samples, the path
dump-teacher takes), for every sample of two datasets and several seeds."""

import numpy as np
import pytest

from kdcache.augment import ParamLayout, ViewRecipe, view_params
from kdcache.augment.loader import ReplayLoader
from kdcache.augment.mixing import MODE_CUTMIX, MODE_MIXUP
from kdcache.augment.render import render_samples

A2 = dict(aa="rand-m7-mstd0.5", mixup=0.2, cutmix=1.0, reprob=0.25, remode="pixel", recount=2, mix_block=16)


def _params(split, recipe, seed):
    n = split.num_samples
    return view_params(recipe, 0, seed, np.arange(n), split.sizes[:, 0], split.sizes[:, 1], n)


def dump_side(split, recipe, params, chunk=48):
    """Every sample's view as dump-teacher renders it: chunks of whole mixing blocks, then mix_chunk."""
    reader = split.jpeg_reader()
    layout = ParamLayout.of(recipe)
    n = split.num_samples
    out = []
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        views = render_samples([reader[i] for i in range(c0, c1)], split.sizes[c0:c1, 0], split.sizes[c0:c1, 1],
                               params[c0:c1, None], recipe.size, layout)
        out.append(views[:, 0])
    return np.concatenate(out)


def student_side(loader):
    views = {}
    for images, _, idx in loader:
        for image, i in zip(images.permute(0, 2, 3, 1).numpy(), idx.tolist()):
            views[i] = image.copy()
    return views


@pytest.mark.parametrize("which", ["fmnist_small", "folder_ds"])
def test_strong_views_replay_equal_the_dump_render(which, request):
    ds = request.getfixturevalue(which)
    split = ds.split("train")
    recipe = ViewRecipe(size=ds.view_size, **A2)
    loader = ReplayLoader(split.beton_path, split.num_samples, recipe.size, batch_size=32, workers=2, order="random",
                          seed=4, drop_last=False, layout=ParamLayout.of(recipe))
    layout = ParamLayout.of(recipe)
    modes = set()
    for seed in (0, 3, 7):
        params = _params(split, recipe, seed)
        teacher = dump_side(split, recipe, params)
        loader.set_views(params)
        student = student_side(loader)
        n_paired = split.num_samples // 2 * 2
        assert len(student) >= n_paired   # every paired sample is shown (an odd one out may be the last)
        bad = [i for i in student if not np.array_equal(student[i], teacher[i])]
        assert not bad, f"seed {seed}: FFCV replay differs from the dump's render for samples {bad[:10]}"
        modes |= set(params[:, layout.mix_offset].astype(int).tolist())
        # the strong augmentations really are in these views: RandAugment ops applied, boxes erased
        assert (params[:, layout.ra_offset] >= 0).mean() > 0.3
        assert (params[:, layout.erase_offset] > 0).mean() > 0.1
    assert {MODE_MIXUP, MODE_CUTMIX} <= modes


def test_mixing_changes_pixels_as_documented(fmnist_small):
    """Mixup: rint(lam·a + (1-lam)·b); cutmix: the box swapped; computed here with numpy on the unmixed views."""
    split = fmnist_small.split("train")
    recipe = ViewRecipe(size=32, mixup=0.8, cutmix=1.0, mix_block=16)
    layout = ParamLayout.of(recipe)
    params = _params(split, recipe, 2)
    mixed = dump_side(split, recipe, params)
    plain_params = params.copy()
    plain_params[:, layout.mix_offset] = 0          # mode none: the unmixed views
    plain = dump_side(split, recipe, plain_params)
    o = layout.mix_offset
    checked = {MODE_MIXUP: 0, MODE_CUTMIX: 0}
    for i in range(split.num_samples):
        mode, offset, lam = int(params[i, o]), int(params[i, o + 1]), float(params[i, o + 2])
        j = i + offset
        assert int(params[j, o + 1]) == -offset and params[j, o + 2] == params[i, o + 2]   # mutual, one draw
        if mode == MODE_MIXUP:
            lam32 = np.float32(lam)
            want = np.rint(plain[i].astype(np.float32) * lam32 + plain[j].astype(np.float32) * np.float32(1 - lam))
            assert np.abs(mixed[i].astype(int) - want.astype(int)).max() <= 0
            checked[mode] += 1
        elif mode == MODE_CUTMIX:
            top, left, h, w = (int(x) for x in params[i, o + 3:o + 7])
            want = plain[i].copy()
            want[top:top + h, left:left + w] = plain[j][top:top + h, left:left + w]
            assert np.array_equal(mixed[i], want)
            assert abs(lam - (1 - h * w / 32 ** 2)) < 1e-6     # lambda corrected to the box's true area
            checked[mode] += 1
    assert checked[MODE_MIXUP] > 20 and checked[MODE_CUTMIX] > 20


def test_preview_shows_strong_views_identical_on_both_sides(fmnist_small, tmp_path):
    from conftest import kdcache
    out = tmp_path / "strong.png"
    proc = kdcache("preview", fmnist_small.root, "--samples", 6, "--num-seeds", 3, "--aa", "rand-m9-mstd0.5",
                   "--reprob", 0.5, "--mixup", 0.5, "--cutmix", 1.0, "--mix-block", 16, "--out", out)
    assert "18/18 views identical" in proc.stdout and out.is_file()


def test_paired_order_keeps_pairs_adjacent_and_on_one_rank():
    """The student's sample order under DDP: each rank gets whole pairs, adjacent at positions 2k, 2k+1."""
    from types import SimpleNamespace
    from kdcache.augment.loader import PairedOrder
    recipe = ViewRecipe(size=32, mixup=1.0, mix_block=16)
    layout = ParamLayout.of(recipe)
    n = 203
    params = view_params(recipe, 0, 5, np.arange(n), np.full(n, 28), np.full(n, 28), n)
    decoder = SimpleNamespace(table=params, layout=layout)
    partner = np.arange(n) + params[:, layout.mix_offset + 1].astype(int)
    orders = []
    for rank in (0, 1):
        order = object.__new__(PairedOrder)
        order.decoder, order.seed, order.length = decoder, 0, None
        order.allowed = order.active = np.arange(n)
        order.rank, order.world = rank, 2
        o = order.sample_order(epoch=3)
        pairs = o[:len(o) // 2 * 2].reshape(-1, 2)
        paired = pairs[partner[pairs[:, 0]] != pairs[:, 0]]
        assert np.array_equal(partner[paired[:, 0]], paired[:, 1])
        orders.append(o)
    assert not set(orders[0]) & set(orders[1])
    assert len(set(orders[0]) | set(orders[1])) >= n - 3          # at most an odd pair (2) and a single left out
