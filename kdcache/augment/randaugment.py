"""RandAugment as timm's `rand_augment_transform` (timm/data/auto_augment.py), drawn per view, applied in uint8.

Draws (`draw_rand_augment`, vectorised numpy) follow timm's RandAugment/AugmentOp: each of num_layers layers
picks one of the 15 ops uniformly with replacement, is applied with probability p, draws its magnitude
(gauss(M, mstd), uniform(0, M) for mstd > 100, else M), clamps it to [0, mmax] and converts it to the op's
argument with timm's level functions, random sign included. A layer is stored as [op id, argument] with the
argument already converted and rounded to float32: the stored value is what the renderer uses.

Pixels (`apply_rand_augment`, plain Python that numba compiles) follow the PIL code timm calls, in PIL's own
arithmetic (float32 where PIL's C uses float, float64 where it uses double, the same truncations), so the
point ops, the enhance ops and the geometric ops give PIL's bytes. Geometric ops always use bilinear
interpolation (timm trains with a random choice of bilinear/bicubic per op) and timm's ImageNet img_mean
as fill. docs/views.md ("RandAugment") has the grammar, the op table and the measured differences from timm.
"""

import math
import re
import types
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numba
import numpy as np

from kdcache.augment.rng import uniform
from kdcache.errors import KdcacheError

# Op ids are indices into OP_NAMES. The argument is already converted from the magnitude.
OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
            "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
(AUTO_CONTRAST, EQUALIZE, INVERT, ROTATE, POSTERIZE, SOLARIZE, SOLARIZE_ADD,
 COLOR, CONTRAST, BRIGHTNESS, SHARPNESS, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y) = range(len(OP_NAMES))
# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, position by position the same ops as OP_NAMES
TIMM_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
            "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TIMM_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED_OPS = (ROTATE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y)  # plus the enhance ops when increasing

NUM_RA_COLUMNS_PER_LAYER = 2
MAX_LAYERS = 8
STREAM_RAND_AUGMENT = 128  # layer l, draw t: 128 + 8 l + t (0 op, 1 apply, 2-3 gaussian, 4 sign)
FILL = (124, 116, 104)     # timm train's img_mean for ImageNet: round(255 * IMAGENET_DEFAULT_MEAN)
TRANSLATE_PCT = 0.45       # timm's default translate_pct (fraction of the side)
_LEVEL_DENOM = 10.0
ARG_GRID = 4096            # stored arguments are multiples of 1/ARG_GRID
_MSTD_UNIFORM = 100.0      # timm: mstd above this means uniform(0, M)


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's rand-m{M}-n{N}-mstd{S}-mmax{X}-inc{0|1}-p{P}; defaults as timm's."""

    magnitude: int = 10
    num_layers: int = 2
    mstd: float = 0.0        # inf: magnitude uniform in [0, M]
    mmax: int = 10
    increasing: bool = False
    prob: float = 0.5

    def __post_init__(self):
        if not 0 <= self.num_layers <= MAX_LAYERS:  # each layer owns 8 of the RNG streams 128..191
            raise KdcacheError(f"RandAugment: {self.num_layers} layers; at most {MAX_LAYERS}")

    @classmethod
    def parse(cls, text: str) -> "RandAugmentSpec":
        sections = text.split("-")
        if sections[0] != "rand":
            raise KdcacheError(f"--aa {text!r}: only RandAugment ('rand-...') is supported, not {sections[0]!r}")
        values, seen = {}, set()
        for c in sections[1:]:
            if c.startswith("w") or c.startswith("t"):
                raise KdcacheError(f"--aa {text!r}: section {c!r} (weighted or alternative transform sets) "
                                   "is not supported; kdcache draws timm's default op list uniformly")
            m = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", c)
            if m is None or m.group(1) not in ("m", "n", "mstd", "mmax", "inc", "p"):
                raise KdcacheError(f"--aa {text!r}: unknown section {c!r} (known: m, n, mstd, mmax, inc, p)")
            key, val = m.groups()
            if key in seen:  # timm lets the last m/n/p/inc but the first mstd/mmax win: refuse the ambiguity
                raise KdcacheError(f"--aa {text!r}: section {key!r} given twice")
            seen.add(key)
            if key in ("m", "n", "mmax", "inc") and "." in val:
                raise KdcacheError(f"--aa {text!r}: {c!r} needs an integer")
            values[key] = val
        spec = {}
        if "m" in values:
            spec["magnitude"] = int(values["m"])
        if "n" in values:
            spec["num_layers"] = int(values["n"])
            if spec["num_layers"] > MAX_LAYERS:
                raise KdcacheError(f"--aa {text!r}: n{spec['num_layers']}: at most {MAX_LAYERS} layers")
        if "mstd" in values:
            mstd = float(values["mstd"])
            spec["mstd"] = math.inf if mstd > _MSTD_UNIFORM else mstd
        if "mmax" in values:
            spec["mmax"] = int(values["mmax"]) or int(_LEVEL_DENOM)  # timm: `magnitude_max or 10`
        if "inc" in values:
            if values["inc"] not in ("0", "1"):
                raise KdcacheError(f"--aa {text!r}: inc must be inc0 or inc1")
            spec["increasing"] = values["inc"] == "1"
        if "p" in values:
            spec["prob"] = float(values["p"])
            if not 0.0 <= spec["prob"] <= 1.0:
                raise KdcacheError(f"--aa {text!r}: p{values['p']} is not a probability")
        return cls(**spec)

    def to_str(self) -> str:
        """The canonical string (every field); parse(to_str()) == self, and timm reads it the same way."""
        mstd = "101" if math.isinf(self.mstd) else _num(self.mstd)
        return (f"rand-m{self.magnitude}-n{self.num_layers}-mstd{mstd}-mmax{self.mmax}"
                f"-inc{int(self.increasing)}-p{_num(self.prob)}")


def _num(x: float) -> str:
    # shortest exact decimal without exponent: '-' separates sections
    return np.format_float_positional(float(x), trim="-")


def parse_rand_augment(text: Optional[str]) -> Optional[RandAugmentSpec]:
    """None, '' and 'none' mean no RandAugment."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    return RandAugmentSpec.parse(text.strip())


# ---------------------------------------------------------------------------------------------------------
# Draws


def _magnitudes(keys: np.ndarray, stream: int, spec: RandAugmentSpec) -> np.ndarray:
    """AugmentOp.__call__'s magnitude: M, gauss(M, mstd) or uniform(0, M), clamped to [0, mmax]."""
    mag = np.full(len(keys), float(spec.magnitude))
    if math.isinf(spec.mstd):
        mag = float(spec.magnitude) * uniform(keys, stream + 2)
    elif spec.mstd > 0:
        # Box-Muller as Python's random.gauss; 1 - u keeps the log finite
        z = np.cos(2.0 * np.pi * uniform(keys, stream + 3)) * np.sqrt(-2.0 * np.log(1.0 - uniform(keys, stream + 2)))
        mag = spec.magnitude + spec.mstd * z
    return np.maximum(0.0, np.minimum(mag, float(spec.mmax)))


def level_to_arg(op: np.ndarray, magnitude: np.ndarray, negate: np.ndarray, increasing: bool) -> np.ndarray:
    """timm's LEVEL_TO_ARG for op ids (float64, before rounding to float32); negate is timm's random sign."""
    op = np.asarray(op)
    level = np.asarray(magnitude, np.float64) / _LEVEL_DENOM
    sign = np.where(negate, -1.0, 1.0)
    arg = np.zeros(np.broadcast(op, level).shape)
    bits = np.trunc(level * 4)  # int(level * 4); both posterize variants
    posterize = (4 - bits) if increasing else bits
    # keep >= 8 bits is the identity and <= 0 bits makes black: store the effective count
    posterize = np.clip(posterize, 0, 8)
    solarize = np.minimum(256, np.trunc(level * 256))
    if increasing:
        solarize = 256 - solarize
        enhance = np.maximum(0.1, 1.0 + sign * (level * 0.9))
    else:
        enhance = level * 1.8 + 0.1
    choices = {
        ROTATE: sign * (level * 30.0),
        POSTERIZE: posterize,
        SOLARIZE: solarize,
        SOLARIZE_ADD: np.minimum(128, np.trunc(level * 110)),
        COLOR: enhance, CONTRAST: enhance, BRIGHTNESS: enhance, SHARPNESS: enhance,
        SHEAR_X: sign * (level * 0.3), SHEAR_Y: sign * (level * 0.3),
        TRANSLATE_X: sign * (level * TRANSLATE_PCT), TRANSLATE_Y: sign * (level * TRANSLATE_PCT),
    }
    for op_id, value in choices.items():
        arg = np.where(op == op_id, value, arg)
    return arg


def draw_rand_augment(keys: np.ndarray, spec: RandAugmentSpec) -> np.ndarray:
    """float32 (n, num_layers, 2): [op id, argument] per layer; op id -1 (argument 0) where not applied."""
    keys = np.asarray(keys, np.uint64)
    out = np.zeros((len(keys), spec.num_layers, NUM_RA_COLUMNS_PER_LAYER), np.float32)
    for layer in range(spec.num_layers):
        stream = STREAM_RAND_AUGMENT + 8 * layer
        op = np.minimum(np.floor(uniform(keys, stream) * len(OP_NAMES)), len(OP_NAMES) - 1).astype(np.int64)
        # timm: skipped if prob < 1 and random() > prob
        applied = (spec.prob >= 1.0) | (uniform(keys, stream + 1) <= spec.prob)
        negate = uniform(keys, stream + 4) > 0.5  # timm's _randomly_negate
        arg = level_to_arg(op, _magnitudes(keys, stream, spec), negate, spec.increasing)
        # continuous arguments on a 2^-12 grid (integer ones are unchanged): a float32 with few mantissa bits
        # compresses to about half on disk, and 1/4096 of a degree or of the image side is far below a pixel
        arg = np.round(arg * ARG_GRID) / ARG_GRID
        out[:, layer, 0] = np.where(applied, op, -1)
        out[:, layer, 1] = np.where(applied, arg, 0.0)
    return out


# ---------------------------------------------------------------------------------------------------------
# Pixels: plain Python that numba compiles (compile_rand_augment). Images are uint8 (H, W, 3).
# Values are cast to np.int64 before subtracting (uint8 arithmetic wraps, and numba types int(uint8) as
# unsigned) and to np.float32 where PIL computes in C float.

_SMOOTH_EDGE = np.float32(1.0) / np.float32(13.0)   # ImageFilter.SMOOTH: (1 1 1, 1 5 1, 1 1 1) / 13 in float32
_SMOOTH_CENTRE = np.float32(5.0) / np.float32(13.0)
_DEG_TO_RAD = math.pi / 180.0                         # math.radians' constant


def _taylor(first: int, terms: int = 15):
    """(-1)^k / (first + 2k)! as double-double (hi, lo) tuples, exact to 2^-106."""
    hi, lo = [], []
    for k in range(terms):
        c = Fraction((-1) ** k, math.factorial(first + 2 * k))
        hi.append(float(c))
        lo.append(float(c - Fraction(hi[-1])))
    return tuple(hi), tuple(lo)


_COS_HI, _COS_LO = _taylor(0)   # cos r = sum_k (-1)^k r^2k / (2k)!
_SIN_HI, _SIN_LO = _taylor(1)   # sin r = r sum_k (-1)^k r^2k / (2k+1)!


def apply_lut(image, lut):
    """image[..., c] = lut[c, image[..., c]]; lut (3, 256) of values in 0..255."""
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = lut[c, image[y, x, c]]


def histograms(image):
    hist = np.zeros((3, 256), np.int64)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                hist[c, image[y, x, c]] += 1
    return hist


def autocontrast(image):
    """ImageOps.autocontrast(image) (cutoff 0): per channel, stretch [lo, hi] to [0, 255] in float64."""
    hist = histograms(image)
    lut = np.empty((3, 256), np.int64)
    for c in range(3):
        lo = 0
        while lo < 255 and hist[c, lo] == 0:
            lo += 1
        hi = 255
        while hi > 0 and hist[c, hi] == 0:
            hi -= 1
        if hi <= lo:
            for i in range(256):
                lut[c, i] = i
        else:
            scale = 255.0 / (hi - lo)
            offset = -lo * scale
            for i in range(256):
                lut[c, i] = min(max(int(i * scale + offset), 0), 255)
    apply_lut(image, lut)


def equalize(image):
    """ImageOps.equalize(image): PIL's per-channel lut; values above 255 clip as Image.point does."""
    hist = histograms(image)
    lut = np.empty((3, 256), np.int64)
    for c in range(3):
        used, total, last = 0, 0, 0
        for i in range(256):
            if hist[c, i] > 0:
                used += 1
                total += hist[c, i]
                last = hist[c, i]
        step = (total - last) // 255 if used > 1 else 0
        if step == 0:
            for i in range(256):
                lut[c, i] = i
        else:
            n = step // 2
            for i in range(256):
                lut[c, i] = min(n // step, 255)
                n += hist[c, i]
    apply_lut(image, lut)


def invert(image):
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = 255 - image[y, x, c]


def posterize(image, bits):
    """Keep the top `bits` bits; 8 is the identity and 0 black (Pillow >= 10 refuses bits = 0, see docs)."""
    mask = (0xFF << (8 - min(max(bits, 0), 8))) & 0xFF
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = image[y, x, c] & mask


def solarize(image, threshold):
    """ImageOps.solarize: values >= threshold are inverted (256: identity)."""
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                v = np.int64(image[y, x, c])
                if v >= threshold:
                    image[y, x, c] = 255 - v


def solarize_add(image, add):
    """timm's solarize_add with threshold 128: values below 128 get + add, capped at 255."""
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                v = np.int64(image[y, x, c])
                if v < 128:
                    image[y, x, c] = min(255, v + add)


def blend(degenerate, value, alpha):
    """PIL's ImagingBlend(degenerate, image, alpha) for one value: float32 arithmetic (alpha is a C float),
    truncation, clipping when extrapolating (alpha outside [0, 1])."""
    d = np.float32(degenerate)
    t = d + alpha * (np.float32(value) - d)
    if t <= 0:
        return 0
    if t >= 255:
        return 255
    return int(t)


def grey(r, g, b):
    """PIL's RGB -> L: (R 19595 + G 38470 + B 7471 + 2^15) >> 16, i.e. ITU-R 601 rounded."""
    return (np.int64(r) * 19595 + np.int64(g) * 38470 + np.int64(b) * 7471 + 0x8000) >> 16


def color(image, alpha):
    """ImageEnhance.Color: blend with the image converted to L and back to RGB."""
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            l = grey(image[y, x, 0], image[y, x, 1], image[y, x, 2])
            for c in range(3):
                image[y, x, c] = blend(l, image[y, x, c], alpha)


def contrast(image, alpha):
    """ImageEnhance.Contrast: blend with the grey level int(mean(L) + 0.5); the mean in float64 as ImageStat."""
    total = 0
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            total += grey(image[y, x, 0], image[y, x, 1], image[y, x, 2])
    mean = int(float(total) / float(image.shape[0] * image.shape[1]) + 0.5)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = blend(mean, image[y, x, c], alpha)


def brightness(image, alpha):
    """ImageEnhance.Brightness: blend with black."""
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = blend(0, image[y, x, c], alpha)


def smooth(src, dst):
    """ImageFilter.SMOOTH as PIL's ImagingFilter3x3: float32 sums row y+1, y, y-1 plus 0.5, truncated;
    the border pixels are copied (and images under 3x3 copied whole)."""
    h, w = src.shape[0], src.shape[1]
    dst[:] = src
    if h < 3 or w < 3:
        return
    k, k5 = _SMOOTH_EDGE, _SMOOTH_CENTRE
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            for c in range(3):
                ss = np.float32(0.5)
                ss += (np.float32(src[y + 1, x - 1, c]) * k + np.float32(src[y + 1, x, c]) * k
                       + np.float32(src[y + 1, x + 1, c]) * k)
                ss += (np.float32(src[y, x - 1, c]) * k + np.float32(src[y, x, c]) * k5
                       + np.float32(src[y, x + 1, c]) * k)
                ss += (np.float32(src[y - 1, x - 1, c]) * k + np.float32(src[y - 1, x, c]) * k
                       + np.float32(src[y - 1, x + 1, c]) * k)
                dst[y, x, c] = min(max(int(ss), 0), 255)


def sharpness(image, alpha, scratch):
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
    smooth(image, scratch)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = blend(scratch[y, x, c], image[y, x, c], alpha)


def affine(src, dst, a0, a1, a2, a3, a4, a5):
    """Image.transform(size, AFFINE, (a0..a5), BILINEAR, fillcolor=FILL) as PIL's generic transform: output
    pixel (x, y) samples the source at (a0 (x+.5) + a1 (y+.5) + a2, a3 (x+.5) + a4 (y+.5) + a5), float64
    in PIL's order, edge-clamped bilinear, truncated; points outside the source get FILL."""
    h, w = src.shape[0], src.shape[1]
    for y in range(h):
        yc = y + 0.5
        for x in range(w):
            xc = x + 0.5
            xin = a0 * xc + a1 * yc + a2
            yin = a3 * xc + a4 * yc + a5
            if xin < 0.0 or xin >= w or yin < 0.0 or yin >= h:
                for c in range(3):
                    dst[y, x, c] = FILL[c]
                continue
            xin -= 0.5
            yin -= 0.5
            x0 = int(np.floor(xin))
            y0 = int(np.floor(yin))
            dx = xin - x0
            dy = yin - y0
            xa = min(max(x0, 0), w - 1)
            xb = min(max(x0 + 1, 0), w - 1)
            ya = min(max(y0, 0), h - 1)
            yb = y0 + 1
            for c in range(3):
                p = np.int64(src[ya, xa, c])
                v1 = p + (np.int64(src[ya, xb, c]) - p) * dx
                if 0 <= yb < h:
                    q = np.int64(src[yb, xa, c])
                    v2 = q + (np.int64(src[yb, xb, c]) - q) * dx
                else:
                    v2 = v1
                dst[y, x, c] = int(v1 + (v2 - v1) * dy)


def _two_product(a, b):
    """a * b = p + e exactly (Dekker, no FMA needed)."""
    p = a * b
    f = 134217729.0  # 2^27 + 1
    t = f * a
    ah = t - (t - a)
    al = a - ah
    t = f * b
    bh = t - (t - b)
    bl = b - bh
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def round15(x):
    """Python's round(x, 15) for |x| <= 1: the double nearest to x rounded half-even to 15 decimals."""
    p, e = _two_product(x, 1e15)
    r = np.floor(p)
    f = p - r  # exact; p is a multiple of 1/8 or finer, so only an exact .5 can be pushed across by e
    if f > 0.5 or (f == 0.5 and (e > 0 or (e == 0 and r % 2 == 1))):
        r += 1.0
    return r / 1e15


def _two_sum(a, b):
    """a + b = s + e exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _dd_add(ah, al, bh, bl):
    s, e = _two_sum(ah, bh)
    e += al + bl
    hi = s + e
    return hi, e - (hi - s)


def _dd_mul(ah, al, bh, bl):
    p, e = _two_product(ah, bh)
    e += ah * bl + al * bh
    hi = p + e
    return hi, e - (hi - p)


def _dd_series(coef_hi, coef_lo, zh, zl):
    """sum_k coef[k] z^k by Horner in double-double."""
    k = len(coef_hi) - 1
    sh, sl = coef_hi[k], coef_lo[k]
    while k > 0:
        k -= 1
        sh, sl = _dd_mul(sh, sl, zh, zl)
        sh, sl = _dd_add(sh, sl, coef_hi[k], coef_lo[k])
    return sh, sl


def cos_sin(x):
    """(cos x, sin x), correctly rounded on all of 60k angles checked with mpmath, in float64 arithmetic only
    (so every machine gets the same bits, and almost always glibc's, which PIL's rotate uses): a Cody-Waite
    reduction by pi/2 (fdlibm's two-step constants), then Taylor series in double-double."""
    n = np.floor(x * 6.36619772367581382433e-01 + 0.5)
    t = x - n * 1.57079632673412561417e+00   # exact: pio2_1 has 33 bits and x is near n pi/2 (Sterbenz)
    w = n * 6.07710050630396597660e-11       # pio2_2
    r = t - w
    w = n * 2.02226624879595063154e-21 - ((t - r) - w)  # pio2_2t, plus the rounding error of t - w
    rh = r - w                                # x - n pi/2 = rh + rl to about 2^-118
    rl = (r - rh) - w
    zh, zl = _dd_mul(rh, rl, rh, rl)
    ch, cl = _dd_series(_COS_HI, _COS_LO, zh, zl)
    sh, sl = _dd_series(_SIN_HI, _SIN_LO, zh, zl)
    sh, sl = _dd_mul(sh, sl, rh, rl)
    c, s = ch + cl, sh + sl
    q = int(n) & 3
    if q == 0:
        return c, s
    if q == 1:
        return -s, c
    if q == 2:
        return -c, -s
    return s, -c


def rotate(image, degrees, scratch):
    """Image.rotate(degrees, BILINEAR, fillcolor=FILL) about the centre, with PIL's matrix (entries rounded
    to 15 decimals) and its exact fast paths for multiples of 90 degrees."""
    h, w = image.shape[0], image.shape[1]
    angle = np.fmod(degrees, 360.0)  # exact; with the sign fix below, Python's degrees % 360.0
    if angle < 0:
        angle += 360.0
    if angle == 0:
        return
    scratch[:] = image
    if angle == 180 or ((angle == 90 or angle == 270) and h == w):
        for y in range(h):
            for x in range(w):
                for c in range(3):
                    if angle == 180:
                        image[h - 1 - y, w - 1 - x, c] = scratch[y, x, c]
                    elif angle == 90:
                        image[w - 1 - x, y, c] = scratch[y, x, c]
                    else:
                        image[x, h - 1 - y, c] = scratch[y, x, c]
        return
    cs, sn = cos_sin(-(angle * _DEG_TO_RAD))
    a, b, d, e = round15(cs), round15(sn), -round15(sn), round15(cs)
    cx, cy = w / 2.0, h / 2.0
    c = a * -cx + b * -cy + 0.0 + cx
    f = d * -cx + e * -cy + 0.0 + cy
    affine(scratch, image, a, b, c, d, e, f)


def apply_rand_augment(image, ops):
    """Apply the layers of one view in order, in place: image uint8 (H, W, 3), ops (L, 2) [op id, argument]."""
    apply_rand_augment_into(image, ops, np.empty_like(image))


def apply_rand_augment_into(image, ops, scratch):
    """apply_rand_augment with a caller's scratch image of the same shape: the renderers keep one per sample,
    since a fresh 150 kB array per geometric op costs page faults that many threads contend on."""
    for layer in range(ops.shape[0]):
        op = int(ops[layer, 0])
        arg = np.float32(ops[layer, 1])
        if op < 0:
            continue
        if op == AUTO_CONTRAST:
            autocontrast(image)
        elif op == EQUALIZE:
            equalize(image)
        elif op == INVERT:
            invert(image)
        elif op == ROTATE:
            rotate(image, float(arg), scratch)
        elif op == POSTERIZE:
            posterize(image, int(arg))
        elif op == SOLARIZE:
            solarize(image, int(arg))
        elif op == SOLARIZE_ADD:
            solarize_add(image, int(arg))
        elif op == COLOR:
            color(image, arg)
        elif op == CONTRAST:
            contrast(image, arg)
        elif op == BRIGHTNESS:
            brightness(image, arg)
        elif op == SHARPNESS:
            sharpness(image, arg, scratch)
        else:
            scratch[:] = image
            h, w = image.shape[0], image.shape[1]
            v = float(arg)
            if op == SHEAR_X:
                affine(scratch, image, 1.0, v, 0.0, 0.0, 1.0, 0.0)
            elif op == SHEAR_Y:
                affine(scratch, image, 1.0, 0.0, 0.0, v, 1.0, 0.0)
            elif op == TRANSLATE_X:
                affine(scratch, image, 1.0, 0.0, v * w, 0.0, 1.0, 0.0)
            elif op == TRANSLATE_Y:
                affine(scratch, image, 1.0, 0.0, 0.0, 0.0, 1.0, v * h)


# Every function apply_rand_augment reaches; compile_rand_augment compiles each afresh.
_KERNELS = (apply_lut, histograms, autocontrast, equalize, invert, posterize, solarize, solarize_add, blend, grey,
            color, contrast, brightness, smooth, sharpness, affine, _two_product, round15, _two_sum, _dd_add,
            _dd_mul, _dd_series, cos_sin, rotate, apply_rand_augment_into, apply_rand_augment)


def compile_rand_augment(with_scratch: bool = False):
    """A freshly compiled apply_rand_augment (image, ops) with its own compiled helpers (the renderer's copy is
    made once, in kdcache.augment.render); no fastmath, so every copy computes the same bytes. The helpers'
    global names are rebound to their compiled copies (numba resolves globals when it compiles)."""
    scope = dict(globals())
    for fn in _KERNELS:
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        # flags set explicitly: a callee inherits unset flags from its caller, and FFCV's decoders are fastmath
        scope[fn.__name__] = numba.njit(fastmath=False, error_model="python", cache=True)(copy)
    return scope["apply_rand_augment_into" if with_scratch else "apply_rand_augment"]
