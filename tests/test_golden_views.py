"""Golden views: the sha256 of a fixed set of views made by each renderer version (RENDERER_VERSIONS).

An upgrade of ffcv, OpenCV, numba or numpy (or a code change) that alters the pixels of any of these views
fails here, loudly: such a change must become a new renderer version (docs/views.md), or old caches would
be replayed with pixels their teacher never scored (FFCV #392, TinyViT #109). The source is a JPEG kept in
tests/data, so the decoder is covered too. Every version keeps its table: old caches replay with the
renderer that made them.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from kdcache.augment import ParamLayout, ViewRecipe
from kdcache.augment.randaugment import OP_NAMES
from kdcache.augment.render import RENDERER_VERSIONS, decode_jpeg, mix_views, render_views

JPEG = Path(__file__).parent / "data" / "golden.jpg"
SIZE = 40
CROP = [0.1, 0.05, 0.8, 0.7, 1.0]      # top, left, height, width (fractions), flipped
# one argument per RandAugment op, as stored (op ids are kdcache.augment.randaugment.OP_NAMES)
RA_ARGS = {"AutoContrast": 0, "Equalize": 0, "Invert": 0, "Rotate": -17.5, "Posterize": 2, "Solarize": 140,
           "SolarizeAdd": 60, "Color": 1.6, "Contrast": 0.4, "Brightness": 1.5, "Sharpness": 1.8, "ShearX": 0.2,
           "ShearY": -0.25, "TranslateX": 0.3, "TranslateY": -0.2}

GOLDEN = {}
GOLDEN[1] = {  # renderer version 1, made with ffcv 1.0.2, opencv-python-headless 5.0.0, numba 0.68.1, numpy 2.4.6
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
GOLDEN[2] = {  # renderer version 2, made with ffcv 1.0.2, opencv-python-headless 5.0.0, numba 0.68.1, numpy 2.4.6
    "decode": "d11dda41d9fa3a77",
    "rrc": "56849338d97c6252",
    "ra-AutoContrast": "9d5a4490ccf7152a",
    "ra-Equalize": "892484597d837bb5",
    "ra-Invert": "102363e1c1c6503d",
    "ra-Rotate": "6e5c2e1256a76fac",
    "ra-Posterize": "3dea4b7d357d0426",
    "ra-Solarize": "24ca491500159db2",
    "ra-SolarizeAdd": "4fdc7523a84af389",
    "ra-Color": "4c053c543b4e24e3",
    "ra-Contrast": "7f7b4343cf332109",
    "ra-Brightness": "dc30a7115db6d1c9",
    "ra-Sharpness": "ebae38f14bd58416",
    "ra-ShearX": "de4fe18a176f1777",
    "ra-ShearY": "2e827e13272f7031",
    "ra-TranslateX": "c39b806bc68cacb3",
    "ra-TranslateY": "079e036202862f15",
    "erase-const": "bbd4cd0d1f6a26bd",
    "erase-rand": "b1128da20950fb61",
    "erase-pixel": "fd52067bc320da9c",
    "mixup": "8c0a07e334d07637",
    "cutmix": "8759b355a07f11d4",
}


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def golden_views(renderer: int) -> dict:
    image = decode_jpeg(JPEG.read_bytes(), 80, 96)
    out = {"decode": _digest(image)}
    plain = ViewRecipe(size=SIZE, renderer=renderer)
    out["rrc"] = _digest(render_views(image, np.array(CROP, np.float32), SIZE, ParamLayout.of(plain)))
    ra_layout = ParamLayout.of(ViewRecipe(size=SIZE, aa="rand-m9-n1", renderer=renderer))
    for op, name in enumerate(OP_NAMES):
        row = np.array(CROP + [op, RA_ARGS[name]], np.float32)
        out[f"ra-{name}"] = _digest(render_views(image, row, SIZE, ra_layout))
    for mode in ("const", "rand", "pixel"):
        layout = ParamLayout.of(ViewRecipe(size=SIZE, reprob=1.0, remode=mode, recount=2, renderer=renderer))
        row = np.array(CROP + [2, 123456, 4, 8, 12, 10, 20, 22, 8, 16], np.float32)
        out[f"erase-{mode}"] = _digest(render_views(image, row, SIZE, layout))
    layout = ParamLayout.of(ViewRecipe(size=SIZE, mixup=1.0, cutmix=1.0, renderer=renderer))
    other = np.array([0.0, 0.0, 1.0, 1.0, 0.0] + [0] * 7, np.float32)
    for name, mix in (("mixup", [1, 1, 0.37, 0, 0, 0, 0]), ("cutmix", [2, 1, 0.75, 10, 12, 20, 20])):
        row = np.array(CROP + mix, np.float32)
        a = render_views(image, row, SIZE, layout)[0]
        b = render_views(image, other, SIZE, layout)[0]
        mix_views(a, b, row, layout)
        out[name] = _digest(np.stack([a, b]))
    return out


def test_every_renderer_version_has_a_golden_table():
    assert sorted(GOLDEN) == sorted(RENDERER_VERSIONS), "a new renderer version needs its own table (keep the old ones)"


@pytest.mark.parametrize("renderer", RENDERER_VERSIONS)
def test_golden_views_have_not_changed(renderer):
    got = golden_views(renderer)
    golden = GOLDEN[renderer]
    changed = {k: (golden[k], got[k]) for k in golden if golden[k] != got[k]}
    assert not changed, (f"renderer {renderer} output changed for {sorted(changed)}: pixels of cached views "
                         f"would differ from what their teacher scored; make it a new renderer version. {changed}")


def test_golden_views_see_every_op():
    """Guards the tables: every entry is a distinct image (an op that did nothing would repeat rrc), and the
    versions differ where the resize runs (and only there: the decode is shared)."""
    got = {r: golden_views(r) for r in RENDERER_VERSIONS}
    for views in got.values():
        ra = [v for k, v in views.items() if k.startswith("ra-")]
        assert len(set(ra)) == len(ra) and views["rrc"] not in ra
    assert got[1]["decode"] == got[2]["decode"] and got[1]["rrc"] != got[2]["rrc"]


def test_recipes_written_before_renderer_2_replay_with_renderer_1():
    """A format-1 recipe has no renderer field: its pixels are renderer 1's; recipes of now record 2."""
    old = {"size": 32, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "hflip": 0.5, "version": 1}
    assert ViewRecipe.from_dict(old).renderer == 1 and ParamLayout.of(ViewRecipe.from_dict(old)).as_array()[5] == 1
    assert ViewRecipe.from_dict(ViewRecipe(size=32).to_dict()).renderer == 2
    assert ViewRecipe.from_dict(ViewRecipe(size=32, renderer=1).to_dict()).renderer == 1


def test_a_changed_renderer_source_drops_the_renderers_numba_cache(tmp_path):
    """numba checks only a cached function's own file; the renderer's kernels in render.py compile in code
    from the other renderer files, so a change in any of them must drop render.py's cache entries."""
    from kdcache.augment.render import RENDERER_SOURCES, _invalidate_stale_cache
    for name in RENDERER_SOURCES:
        (tmp_path / name).write_text(f"# {name}\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    entries = ["render.render_into-1.py311.nbi", "render.render_into-1.py311.1.nbc",
               "rescale.scale_view_row-22.py311.nbi"]
    kept = ["render.cpython-311.pyc", "erasing.apply_erasing-1.py311.nbi"]
    for name in entries + kept:
        (cache / name).write_bytes(b"x")
    _invalidate_stale_cache(str(tmp_path))            # no stamp yet: dropped, stamp written
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".sha256")) == sorted(kept)
    for name in entries:
        (cache / name).write_bytes(b"x")
    _invalidate_stale_cache(str(tmp_path))            # nothing changed: kept
    assert all((cache / name).exists() for name in entries)
    (tmp_path / "mixing.py").write_text("# changed\n")
    _invalidate_stale_cache(str(tmp_path))            # another file of the renderer changed: dropped
    assert not any((cache / name).exists() for name in entries) and all((cache / n).exists() for n in kept)
