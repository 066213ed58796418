"""Golden views: the sha256 of a fixed set of views made by the current renderer (RENDERER_VERSION).

An upgrade of ffcv, OpenCV, numba or numpy (or a code change) that alters the pixels of any of these views
fails here, loudly: such a change must become a new renderer version (docs/views.md), or old caches would
be replayed with pixels their teacher never scored (FFCV #392, TinyViT #109). The source is a JPEG kept in
tests/data, so the decoder is covered too.
"""

import hashlib
from pathlib import Path

import numpy as np

from kdcache.augment import ParamLayout, ViewRecipe
from kdcache.augment.randaugment import OP_NAMES
from kdcache.augment.render import RENDERER_VERSION, decode_jpeg, mix_views, render_views

JPEG = Path(__file__).parent / "data" / "golden.jpg"
SIZE = 40
CROP = [0.1, 0.05, 0.8, 0.7, 1.0]      # top, left, height, width (fractions), flipped
# one argument per RandAugment op, as stored (op ids are kdcache.augment.randaugment.OP_NAMES)
RA_ARGS = {"AutoContrast": 0, "Equalize": 0, "Invert": 0, "Rotate": -17.5, "Posterize": 2, "Solarize": 140,
           "SolarizeAdd": 60, "Color": 1.6, "Contrast": 0.4, "Brightness": 1.5, "Sharpness": 1.8, "ShearX": 0.2,
           "ShearY": -0.25, "TranslateX": 0.3, "TranslateY": -0.2}

GOLDEN = {  # renderer version 1, made with ffcv 1.0.2, opencv-python-headless 5.0.0, numba 0.68.1, numpy 2.4.6
    "decode": "d11dda41d9fa3a77",
    "rrc": "f110e07274dfad29",
    "ra-AutoContrast": "101ddd397d0b91ac",
    "ra-Equalize": "aab16accdad354d9",
    "ra-Invert": "86868218bedfeeab",
    "ra-Rotate": "19246f25ca708891",
    "ra-Posterize": "3dea4b7d357d0426",
    "ra-Solarize": "58c8efe856844d8d",
    "ra-SolarizeAdd": "a36e8b77c27686e7",
    "ra-Color": "367a6cc6f273fd2d",
    "ra-Contrast": "13c50a546d816d8b",
    "ra-Brightness": "27e4ac16c33bb6d6",
    "ra-Sharpness": "05abcdae8caf9b88",
    "ra-ShearX": "56cb8d6050138ea8",
    "ra-ShearY": "a771844dadfcae38",
    "ra-TranslateX": "44875e00122d913c",
    "ra-TranslateY": "24215823ed673129",
    "erase-const": "e647c8f50cf52a72",
    "erase-rand": "007b2c5b86ae47b0",
    "erase-pixel": "d4dc486606f47fce",
    "mixup": "f9005edf15d51add",
    "cutmix": "0744b2b09684b53e",
}


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def golden_views() -> dict:
    image = decode_jpeg(JPEG.read_bytes(), 80, 96)
    out = {"decode": _digest(image)}
    plain = ViewRecipe(size=SIZE)
    out["rrc"] = _digest(render_views(image, np.array(CROP, np.float32), SIZE, ParamLayout.of(plain)))
    ra_layout = ParamLayout.of(ViewRecipe(size=SIZE, aa="rand-m9-n1"))
    for op, name in enumerate(OP_NAMES):
        row = np.array(CROP + [op, RA_ARGS[name]], np.float32)
        out[f"ra-{name}"] = _digest(render_views(image, row, SIZE, ra_layout))
    for mode in ("const", "rand", "pixel"):
        layout = ParamLayout.of(ViewRecipe(size=SIZE, reprob=1.0, remode=mode, recount=2))
        row = np.array(CROP + [2, 123456, 4, 8, 12, 10, 20, 22, 8, 16], np.float32)
        out[f"erase-{mode}"] = _digest(render_views(image, row, SIZE, layout))
    layout = ParamLayout.of(ViewRecipe(size=SIZE, mixup=1.0, cutmix=1.0))
    other = np.array([0.0, 0.0, 1.0, 1.0, 0.0] + [0] * 7, np.float32)
    for name, mix in (("mixup", [1, 1, 0.37, 0, 0, 0, 0]), ("cutmix", [2, 1, 0.75, 10, 12, 20, 20])):
        row = np.array(CROP + mix, np.float32)
        a = render_views(image, row, SIZE, layout)[0]
        b = render_views(image, other, SIZE, layout)[0]
        mix_views(a, b, row, layout)
        out[name] = _digest(np.stack([a, b]))
    return out


def test_golden_views_have_not_changed():
    assert RENDERER_VERSION == 1, "a new renderer version needs its own golden table (keep the old one)"
    got = golden_views()
    changed = {k: (GOLDEN[k], got[k]) for k in GOLDEN if GOLDEN[k] != got[k]}
    assert not changed, (f"renderer {RENDERER_VERSION} output changed for {sorted(changed)}: pixels of cached views "
                         f"would differ from what their teacher scored; make it a new renderer version. {changed}")


def test_golden_views_see_every_op():
    """Guards the table itself: every entry is a distinct image (an op that did nothing would repeat rrc)."""
    got = golden_views()
    ra = [v for k, v in got.items() if k.startswith("ra-")]
    assert len(set(ra)) == len(ra) and got["rrc"] not in ra
