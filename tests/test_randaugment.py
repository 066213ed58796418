"""RandAugment: timm's grammar and draws, and pixels equal to timm's PIL ops (kdcache/augment/randaugment.py)."""

import itertools
import math
import os
import random

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chi2_contingency, ks_2samp
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data import auto_augment as aa

from kdcache.augment import randaugment as ra
from kdcache.augment.randaugment import (OP_NAMES, RandAugmentSpec, compile_rand_augment, draw_rand_augment,
                                         level_to_arg, parse_rand_augment)
from kdcache.augment.rng import view_keys
from kdcache.data import sources
from kdcache.errors import KdcacheError

# timm's train transforms fill with img_mean = round(255 * ImageNet mean) (timm/data/transforms_factory.py)
IMG_MEAN = tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)
TIMM_KW = dict(resample=Image.BILINEAR, fillcolor=IMG_MEAN)
ENHANCE = (ra.COLOR, ra.CONTRAST, ra.BRIGHTNESS, ra.SHARPNESS)
NO_ARG = (ra.AUTO_CONTRAST, ra.EQUALIZE, ra.INVERT)
INT_ARG = (ra.POSTERIZE, ra.SOLARIZE, ra.SOLARIZE_ADD)


@pytest.fixture(scope="module")
def apply():
    return compile_rand_augment()


def _photo(size: int) -> np.ndarray:
    import matplotlib
    img = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    w, h = img.size  # 512 x 600: a square crop around the face, then resized
    return np.asarray(img.crop((40, 60, w - 40, 60 + w - 80)).resize((size, size), Image.BILINEAR)).copy()


@pytest.fixture(scope="module")
def images():
    """Real photographs: Grace Hopper at 224 and 64 px, and four Fashion-MNIST test images upscaled to 56 px RGB."""
    if not os.path.exists(os.path.join(sources.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.fail("Debian's dataset-fashion-mnist is not installed (tools/setup.sh installs it)")
    fm = [s.payload for s in sources.fashion_mnist(limit=4).splits["val"]()]
    fm = [np.asarray(Image.fromarray(a).resize((56, 56), Image.BILINEAR).convert("RGB")).copy() for a in fm]
    return {"photo224": [_photo(224)], "photo64": [_photo(64)], "fmnist56": fm}


def _timm_args(op: int, arg: np.float32) -> tuple:
    if op in NO_ARG:
        return ()
    return (int(arg),) if op in INT_ARG else (float(arg),)


def _timm_op(name: str, image: np.ndarray, args: tuple) -> np.ndarray:
    """timm's own op function on a PIL image, bilinear with the ImageNet fill."""
    return np.asarray(aa.NAME_TO_OP[name](Image.fromarray(image), *args, **TIMM_KW))


def _ours(apply, image: np.ndarray, ops) -> np.ndarray:
    out = image.copy()
    apply(out, np.asarray(ops, np.float32).reshape(-1, 2))
    return out


def _arg(op, magnitude, negate, increasing) -> np.float32:
    return np.float32(level_to_arg(np.array([op]), np.array([float(magnitude)]), np.array([negate]), increasing)[0])


def _signed(op: int, increasing: bool) -> bool:
    return op in ra.SIGNED_OPS or (increasing and op in ENHANCE)


# ------------------------------------------------------------------------------------------------ pixels


def test_every_op_equals_timm_at_magnitudes_7_and_10(apply, images):
    """Each op of both timm op lists, both signs where timm negates, on photographs and Fashion-MNIST:
    the same bytes as timm's PIL op (mean absolute difference 0)."""
    mad = {}
    for increasing, names in ((False, ra.TIMM_OPS), (True, ra.TIMM_INCREASING_OPS)):
        for op, name in enumerate(names):
            signs = (False, True) if _signed(op, increasing) else (False,)
            for magnitude, negate, (kind, imgs) in itertools.product((7, 10), signs, images.items()):
                arg = _arg(op, magnitude, negate, increasing)
                diffs = []
                for image in imgs:
                    ours = _ours(apply, image, [op, arg])
                    try:
                        ref = _timm_op(name, image, _timm_args(op, arg))
                    except ValueError:
                        # PosterizeIncreasing at m10 keeps 0 bits; this Pillow refuses bits=0 (older ones
                        # returned black, i & ~255): we keep the black image
                        assert name == "PosterizeIncreasing" and arg == 0
                        ref = np.zeros_like(image)
                    assert ours.shape == ref.shape
                    diffs.append(np.abs(ours.astype(np.int64) - ref).mean())
                mad[(name, magnitude, "-" if negate else "+", kind)] = float(np.mean(diffs))
    print("\nmean absolute difference vs timm (grey levels):")
    for key, value in mad.items():
        print(*key, f"{value:.4f}")
    assert all(value <= 2.0 for value in mad.values()), {k: v for k, v in mad.items() if v > 2.0}
    assert all(value == 0.0 for value in mad.values()), {k: v for k, v in mad.items() if v != 0.0}


def test_random_arguments_and_sizes_equal_pil(apply, images):
    """Continuous arguments (any magnitude and noise), extrapolating blends, odd and tiny image sizes."""
    rng = np.random.default_rng(5)
    sources_ = [images["photo224"][0][:37, :53], images["photo64"][0][5:7, :4], images["photo64"][0][:1, :1],
                images["fmnist56"][1][:41, 3:33], images["photo64"][0]]
    for trial in range(300):
        image = np.ascontiguousarray(sources_[trial % len(sources_)])
        op = int(rng.integers(0, len(OP_NAMES)))
        if op == ra.ROTATE:
            arg = rng.uniform(-200, 200)
        elif op in (ra.POSTERIZE, ra.SOLARIZE, ra.SOLARIZE_ADD):
            arg = rng.integers({ra.POSTERIZE: 1, ra.SOLARIZE: 0, ra.SOLARIZE_ADD: 0}[op],
                               {ra.POSTERIZE: 9, ra.SOLARIZE: 257, ra.SOLARIZE_ADD: 129}[op])
        elif op in ENHANCE:
            arg = rng.uniform(-0.5, 2.5)
        else:
            arg = rng.uniform(-0.6, 0.6)
        arg = np.float32(arg)
        ref = _timm_op(ra.TIMM_OPS[op], image, _timm_args(op, arg))
        assert np.array_equal(_ours(apply, image, [op, arg]), ref), (OP_NAMES[op], float(arg), image.shape)


def test_rotation_fast_paths_and_wrapping(apply, images):
    """PIL's exact paths (multiples of 90 degrees), angles beyond 360, on square and non-square images."""
    for image in (images["photo64"][0], np.ascontiguousarray(images["photo64"][0][:40])):
        for degrees in (0.0, -0.0, 90, -90, 180, 270, -270, 360, 450, -405.5, 89.99999):
            ref = _timm_op("Rotate", image, (float(np.float32(degrees)),))
            assert np.array_equal(_ours(apply, image, [ra.ROTATE, degrees]), ref), (degrees, image.shape)


def test_layers_apply_in_order_and_skipped_layers_do_nothing(apply, images):
    image = images["photo64"][0]
    layers = [[ra.ROTATE, 12.5], [-1, 0.0], [ra.EQUALIZE, 0], [ra.COLOR, 0.4], [ra.TRANSLATE_Y, -0.2]]
    ref = image
    for op, arg in layers:
        if op >= 0:
            ref = _timm_op(ra.TIMM_OPS[op], ref, _timm_args(op, np.float32(arg)))
    assert np.array_equal(_ours(apply, image, layers), ref)
    assert np.array_equal(_ours(apply, image, [[-1, 0.0], [-1, 0.0]]), image)


def test_cos_sin_is_correctly_rounded_and_round15_is_pythons():
    import mpmath
    mpmath.mp.prec = 200
    rng = np.random.default_rng(2)
    for degrees in list(rng.uniform(0, 360, 2000)) + [0.0, 45.0, 90.0, 135.0, 225.0, 359.9999]:
        angle = -math.radians(float(np.float32(degrees)))
        c, s = ra.cos_sin(angle)
        assert (c, s) == (float(mpmath.cos(angle)), float(mpmath.sin(angle))), degrees
    for x in list(rng.uniform(-1, 1, 5000)) + [0.5, -0.5, 0.1 + 5e-16, 1.0, 0.0]:
        assert ra.round15(float(x)) == round(float(x), 15), x


def test_compiled_twice_and_plain_python_give_the_same_bytes(apply, images):
    """Two compile_rand_augment() copies agree byte for byte; the uncompiled Python agrees with them."""
    other = compile_rand_augment()
    assert other is not apply
    rng = np.random.default_rng(9)
    spec = RandAugmentSpec(magnitude=9, num_layers=4, mstd=1.0, prob=0.9, increasing=True)
    draws = draw_rand_augment(view_keys(1, 2, np.arange(60)), spec)
    for j, ops in enumerate(draws):
        image = images["photo224"][0] if j % 2 else images["fmnist56"][j % 4]
        assert _ours(apply, image, ops).tobytes() == _ours(other, image, ops).tobytes()
    small = np.ascontiguousarray(images["photo64"][0][10:22, 20:36])
    for op in range(len(OP_NAMES)):
        arg = _arg(op, rng.uniform(3, 10), bool(rng.integers(2)), False)
        assert np.array_equal(_ours(ra.apply_rand_augment, small, [op, arg]), _ours(apply, small, [op, arg])), op


# ------------------------------------------------------------------------------------------------ grammar


def test_parse_defaults_and_sections():
    assert parse_rand_augment(None) is None
    assert parse_rand_augment("") is None
    assert parse_rand_augment("none") is None
    assert RandAugmentSpec.parse("rand") == RandAugmentSpec(magnitude=10, num_layers=2, mstd=0.0, mmax=10,
                                                            increasing=False, prob=0.5)
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert spec == RandAugmentSpec(magnitude=9, num_layers=2, mstd=0.5, mmax=10, increasing=True, prob=0.5)
    assert RandAugmentSpec.parse("rand-n3-m7-p1.0-mmax15-inc0") == RandAugmentSpec(7, 3, 0.0, 15, False, 1.0)
    assert math.isinf(RandAugmentSpec.parse("rand-m9-mstd101").mstd)  # timm: > 100 means uniform(0, M)
    assert RandAugmentSpec.parse("rand-mstd100").mstd == 100.0
    assert RandAugmentSpec.parse("rand-mmax0").mmax == 10              # timm: `magnitude_max or 10`
    assert RandAugmentSpec.parse("rand-n0").num_layers == 0


@pytest.mark.parametrize("text, part", [
    ("rand-m9-w0", "'w0'"), ("rand-m9-tweights", "'tweights'"), ("rand-m9-foo", "'foo'"), ("rand-m9-x3", "'x3'"),
    ("rand--m9", "''"), ("rand-m9.5", "'m9.5'"), ("rand-n9", "n9"), ("rand-p1.5", "p1.5"), ("rand-inc2", "inc"),
    ("rand-m9-m7", "'m'"), ("augmix-m5", "'augmix'"), ("v0", "'v0'"), ("rand-mstdinf", "'mstdinf'"),
])
def test_parse_refuses_bad_parts_by_name(text, part):
    with pytest.raises(KdcacheError, match=part.replace(".", r"\.")):
        parse_rand_augment(text)


@pytest.mark.parametrize("text", ["rand", "rand-m9-mstd0.5-inc1", "rand-m9-n3-mstd101-p0.25", "rand-m15-mmax20-n8",
                                  "rand-m0-n1-p0-mstd0.001", "rand-m7-mstd1-p1"])
def test_to_str_round_trips_and_timm_reads_it_the_same(text):
    spec = RandAugmentSpec.parse(text)
    assert RandAugmentSpec.parse(spec.to_str()) == spec
    timm = aa.rand_augment_transform(spec.to_str(), {"img_mean": IMG_MEAN})
    assert timm.num_layers == spec.num_layers
    assert [op.name for op in timm.ops] == list(ra.TIMM_INCREASING_OPS if spec.increasing else ra.TIMM_OPS)
    op = timm.ops[0]
    assert (op.magnitude, op.prob, op.magnitude_std, op.magnitude_max or 10) == (
        spec.magnitude, spec.prob, spec.mstd, spec.mmax)


def test_op_lists_and_fill_are_timms():
    assert IMG_MEAN == ra.FILL == (124, 116, 104)
    assert list(ra.TIMM_OPS) == aa._RAND_TRANSFORMS
    assert list(ra.TIMM_INCREASING_OPS) == aa._RAND_INCREASING_TRANSFORMS


# ------------------------------------------------------------------------------------------------ draws


@pytest.mark.parametrize("increasing", [False, True])
def test_level_to_arg_is_timms(increasing, monkeypatch):
    """Our stored argument is float32 of timm's level function (its random sign forced either way)."""
    names = ra.TIMM_INCREASING_OPS if increasing else ra.TIMM_OPS
    hparams = dict(aa._HPARAMS_DEFAULT)
    for negate in (False, True):
        monkeypatch.setattr(aa.random, "random", lambda: 0.9 if negate else 0.1)  # timm negates if > 0.5
        for op, name in enumerate(names):
            level_fn = aa.LEVEL_TO_ARG[name]
            for magnitude in (0.0, 0.3, 2.5, 4.99, 7.0, 7.5, 9.1, 10.0, 13.7, 25.0):
                ours = _arg(op, magnitude, negate, increasing)
                if level_fn is None:
                    assert ours == 0
                    continue
                (theirs,) = level_fn(magnitude, hparams)
                if op == ra.POSTERIZE:
                    theirs = min(max(theirs, 0), 8)  # >= 8 bits: identity; <= 0: black (see posterize)
                assert ours == np.float32(theirs), (name, magnitude, negate, ours, theirs)


def _timm_draws(spec: RandAugmentSpec, n: int, seed: int = 0):
    """(op index, argument) of every layer timm applies to n images, recorded instead of applied."""
    timm = aa.rand_augment_transform(spec.to_str(), {"img_mean": IMG_MEAN})
    names = list(ra.TIMM_INCREASING_OPS if spec.increasing else ra.TIMM_OPS)
    record = []
    for op in timm.ops:
        op.aug_fn = (lambda name: lambda img, *args, **kw: record.append((names.index(name), *args)) or img)(op.name)
    random.seed(seed)
    np.random.seed(seed)
    image = Image.new("RGB", (1, 1))
    for _ in range(n):
        timm(image)
    return np.array([(r[0], r[1] if len(r) > 1 else 0.0) for r in record], np.float64)


def _our_draws(spec: RandAugmentSpec, n: int):
    draws = draw_rand_augment(view_keys(11, 3, np.arange(n)), spec).reshape(-1, 2).astype(np.float64)
    return draws[draws[:, 0] >= 0]


def test_draws_follow_timms_distribution():
    spec = RandAugmentSpec(magnitude=9, num_layers=3, mstd=1.0, increasing=True, prob=0.7)
    n = 12000
    theirs, ours = _timm_draws(spec, n), _our_draws(spec, n)
    # apply rate: binomial, both within 5 sigma of p
    sigma = math.sqrt(spec.prob * (1 - spec.prob) / (n * spec.num_layers))
    for draws in (theirs, ours):
        assert abs(len(draws) / (n * spec.num_layers) - spec.prob) < 5 * sigma
    # op frequencies: uniform, and the same as timm's
    counts = np.array([np.bincount(d[:, 0].astype(int), minlength=len(OP_NAMES)) for d in (theirs, ours)])
    assert chi2_contingency(counts)[1] > 1e-4
    assert counts.min() > 0.8 * len(ours) / len(OP_NAMES)
    # every op's argument distribution (magnitude noise, clamping at 10, sign) as timm's
    for op in range(len(OP_NAMES)):
        a, b = theirs[theirs[:, 0] == op, 1], ours[ours[:, 0] == op, 1]
        if op in NO_ARG:
            assert (b == 0).all()
        elif op == ra.POSTERIZE:  # a few bit counts: compare the frequencies
            values = np.union1d(a, b)
            table = np.array([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
            assert chi2_contingency(table)[1] > 1e-4, OP_NAMES[op]
        else:
            # ours are stored on the 2^-12 grid (ra.ARG_GRID): timm's on the same grid, in float32 as stored
            a = np.round(a * ra.ARG_GRID) / ra.ARG_GRID
            assert ks_2samp(np.float32(a), np.float32(b)).pvalue > 1e-4, OP_NAMES[op]
    # magnitude: |rotation| / 3 is the clamped gauss(9, 1); sign 50 %
    rot = ours[ours[:, 0] == ra.ROTATE, 1]
    mag = np.abs(rot) / 3.0
    z = np.random.default_rng(0).normal(9.0, 1.0, 400000).clip(0, 10)
    assert abs(mag.mean() - z.mean()) < 5 * z.std() / math.sqrt(len(mag))
    assert abs(mag.std() - z.std()) < 0.05
    assert (mag == 10.0).mean() == pytest.approx((z == 10).mean(), abs=0.03)
    assert abs((rot < 0).mean() - 0.5) < 5 * 0.5 / math.sqrt(len(rot))


def test_uniform_magnitude_and_fixed_magnitude_draws():
    n = 20000
    spec = RandAugmentSpec.parse("rand-m8-n2-mstd101-p1")  # mstd > 100: magnitude uniform in [0, 8]
    theirs, ours = _timm_draws(spec, 4000, seed=1), _our_draws(spec, n)
    assert len(ours) == n * 2  # p = 1: every layer applied
    a, b = np.abs(theirs[theirs[:, 0] == ra.SHEAR_X, 1]), np.abs(ours[ours[:, 0] == ra.SHEAR_X, 1])
    assert ks_2samp(a, b).pvalue > 1e-4
    assert b.max() <= np.float32(0.8 * 0.3) and abs(b.mean() - 0.12) < 0.005
    fixed = _our_draws(RandAugmentSpec.parse("rand-m7"), n)
    assert set(np.abs(fixed[fixed[:, 0] == ra.ROTATE, 1])) == {np.float32(21.0)}
    assert set(fixed[fixed[:, 0] == ra.SOLARIZE, 1]) == {179.0}


def test_draws_of_a_sample_do_not_depend_on_the_call():
    spec = RandAugmentSpec(magnitude=9, num_layers=8, mstd=0.5, prob=0.5)
    idx = np.arange(5000)
    whole = draw_rand_augment(view_keys(4, 6, idx), spec)
    assert whole.shape == (5000, 8, 2) and whole.dtype == np.float32
    perm = np.random.default_rng(3).permutation(idx)
    assert np.array_equal(draw_rand_augment(view_keys(4, 6, perm), spec), whole[perm])
    for part in (idx[:1], idx[17:18], idx[::7], idx[4000:]):
        assert np.array_equal(draw_rand_augment(view_keys(4, 6, part), spec), whole[part])
    # a view's first layers do not depend on how many layers there are; layers and seeds differ
    assert np.array_equal(draw_rand_augment(view_keys(4, 6, idx), RandAugmentSpec(9, 3, 0.5)), whole[:, :3])
    assert not np.array_equal(whole[:, 0], whole[:, 1])
    assert not np.array_equal(draw_rand_augment(view_keys(4, 7, idx), spec), whole)
    # skipped layers are [-1, 0]
    skipped = whole[:, :, 0] < 0
    assert 0.45 < skipped.mean() < 0.55 and (whole[:, :, 1][skipped] == 0).all()
