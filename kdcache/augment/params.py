"""View parameters of view (i, s), vectorised over index ranges: one float32 row per view.

The row's columns (ParamLayout; docs/views.md and docs/cache-format.md give the encoding):

    [top, left, height, width, flip]       always; the RandomResizedCrop box as fractions of the source
                                           image (top/height of its height, left/width of its width)
    RandAugment, 2 per layer               [op id (-1: not applied), argument]         when recipe.aa
    erasing, 2 + 4 * recount               [count, noise seed, (top, left, h, w)...]   when recipe.reprob
    mixing, 7                              [mode, partner - i, lambda, top, left, h, w] when mixing

Boxes after the crop (erasing, cutmix) are in pixels of the view. A recipe without the stronger augmentations has
exactly the 5 columns of format v1. The crop follows torchvision's RandomResizedCrop.get_params exactly,
in pixels of the canonical image (area and log-aspect drawn uniformly, integer rounding, 10 attempts,
centre-crop fallback); only the random source differs (counter-based instead of torch's generator).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from kdcache.augment import erasing, mixing
from kdcache.augment.randaugment import draw_rand_augment, parse_rand_augment
from kdcache.augment.recipe import RENDERER_VERSION, ViewRecipe
from kdcache.augment.rng import STREAM_FLIP, STREAM_RRC, uniform, view_keys
from kdcache.errors import KdcacheError

CROP_COLUMNS = 5
RRC_ATTEMPTS = 10


def rrc_boxes(keys: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale, ratio):
    """Integer crop boxes (top, left, h, w) with torchvision's semantics, one per key."""
    H = np.asarray(heights, dtype=np.float64)
    W = np.asarray(widths, dtype=np.float64)
    n = len(keys)
    top = np.zeros(n, np.int64)
    left = np.zeros(n, np.int64)
    h = np.zeros(n, np.int64)
    w = np.zeros(n, np.int64)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    pending = np.arange(n)
    for attempt in range(RRC_ATTEMPTS):
        if pending.size == 0:
            break
        k, Hp, Wp = keys[pending], H[pending], W[pending]
        stream = STREAM_RRC + 4 * attempt
        target_area = Hp * Wp * (scale[0] + uniform(k, stream) * (scale[1] - scale[0]))
        aspect = np.exp(log_lo + uniform(k, stream + 1) * (log_hi - log_lo))
        cw = np.round(np.sqrt(target_area * aspect))   # round half to even, like Python's round()
        ch = np.round(np.sqrt(target_area / aspect))
        ok = (cw > 0) & (cw <= Wp) & (ch > 0) & (ch <= Hp)
        done = pending[ok]
        h[done], w[done] = ch[ok], cw[ok]
        # torch.randint(0, H - h + 1): floor of a uniform over H - h + 1 integers
        top[done] = np.floor(uniform(k[ok], stream + 2) * (Hp[ok] - ch[ok] + 1))
        left[done] = np.floor(uniform(k[ok], stream + 3) * (Wp[ok] - cw[ok] + 1))
        pending = pending[~ok]
    if pending.size:  # torchvision's fallback: the central crop at the nearest allowed aspect ratio
        Hp, Wp = H[pending], W[pending]
        in_ratio = Wp / Hp
        cw, ch = Wp.copy(), Hp.copy()
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        ch[narrow] = np.round(cw[narrow] / min(ratio))
        cw[wide] = np.round(ch[wide] * max(ratio))
        h[pending], w[pending] = ch, cw
        top[pending] = (Hp - ch) // 2
        left[pending] = (Wp - cw) // 2
    return top, left, h, w


@dataclass(frozen=True)
class ParamLayout:
    """Where each augmentation's columns sit in a view's row (None: the recipe does not use it)."""

    ra_layers: int = 0
    erase_boxes: int = 0
    erase_mode: int = 0
    mixing: bool = False
    renderer: int = RENDERER_VERSION     # the renderer version that makes the pixels

    @classmethod
    def of(cls, recipe: ViewRecipe) -> "ParamLayout":
        ra = parse_rand_augment(recipe.aa)
        return cls(ra_layers=ra.num_layers if ra else 0, erase_boxes=recipe.recount if recipe.reprob > 0 else 0,
                   erase_mode=erasing.MODE_IDS[recipe.remode], mixing=recipe.mixing, renderer=recipe.renderer)

    @property
    def ra_offset(self) -> int:
        return CROP_COLUMNS

    @property
    def erase_offset(self) -> Optional[int]:
        return self.ra_offset + 2 * self.ra_layers if self.erase_boxes else None

    @property
    def mix_offset(self) -> Optional[int]:
        if not self.mixing:
            return None
        return self.ra_offset + 2 * self.ra_layers + (erasing.erase_columns(self.erase_boxes) if self.erase_boxes else 0)

    @property
    def width(self) -> int:
        return (self.ra_offset + 2 * self.ra_layers + (erasing.erase_columns(self.erase_boxes) if self.erase_boxes else 0)
                + (mixing.MIX_COLUMNS if self.mixing else 0))

    def as_array(self) -> np.ndarray:
        """What the compiled renderer reads: [ra offset, ra layers, erase offset, erase mode, mix offset, renderer
        version], -1 = absent."""
        return np.array([self.ra_offset, self.ra_layers, -1 if self.erase_offset is None else self.erase_offset,
                         self.erase_mode, -1 if self.mix_offset is None else self.mix_offset, self.renderer], np.int64)

    def columns(self) -> list:
        """Column names, for docs, `info` and the plain-zarr reader."""
        names = ["top", "left", "height", "width", "flip"]
        for l in range(self.ra_layers):
            names += [f"ra{l}_op", f"ra{l}_arg"]
        if self.erase_boxes:
            names += ["erase_count", "erase_noise_seed"]
            for b in range(self.erase_boxes):
                names += [f"erase{b}_top", f"erase{b}_left", f"erase{b}_height", f"erase{b}_width"]
        if self.mixing:
            names += ["mix_mode", "mix_partner_offset", "mix_lambda", "mix_top", "mix_left", "mix_height", "mix_width"]
        return names


def partner_indices(recipe: ViewRecipe, global_seed: int, aug_seed: int, indices: np.ndarray,
                    num_samples: int) -> np.ndarray:
    """Partner of each index (itself when unpaired); each touched block is paired whole."""
    m = recipe.mix_block
    out = np.empty(len(indices), np.int64)
    blocks = indices // m
    for b in np.unique(blocks):
        b0 = int(b) * m
        b1 = min(b0 + m, num_samples)
        table = mixing.block_partners(global_seed, aug_seed, b0, b1)
        sel = blocks == b
        out[sel] = table[indices[sel] - b0]
    return out


CROP_GRID = 8192


def _crop_grid(layout: "ParamLayout", heights: np.ndarray, widths: np.ndarray) -> float:
    """Format-2 rows store the crop fractions on a 2^-13 grid: for sides below 8192 pixels, round(f·H) gives
    back the same integer (the grid's error is at most 2^-14 < 0.5 / H), and a float32 with 13 significant
    bits compresses to half on disk. RRC-only rows keep format 1's exact fractions (no grid)."""
    if layout.width == CROP_COLUMNS:
        return None
    if max(heights.max(initial=0), widths.max(initial=0)) >= CROP_GRID:
        raise KdcacheError(f"canonical images must be below {CROP_GRID} pixels a side for this recipe's parameter "
                           "encoding; prepare with a smaller --max-side")
    return CROP_GRID


def view_params(recipe: ViewRecipe, global_seed: int, aug_seed: int, indices, heights, widths,
                num_samples: Optional[int] = None) -> np.ndarray:
    """float32 (n, ParamLayout.of(recipe).width) parameters of views (indices[j], aug_seed).

    heights/widths are the canonical image sizes of those samples (same length as indices); num_samples
    (the split's size) is needed when the recipe mixes, since pairs are drawn inside blocks of the split.
    The result for one sample never depends on which other samples are in the call.
    """
    indices = np.asarray(indices, dtype=np.int64)
    heights = np.asarray(heights)
    widths = np.asarray(widths)
    if not (len(indices) == len(heights) == len(widths)):
        raise ValueError("indices, heights and widths must have the same length")
    keys = view_keys(global_seed, aug_seed, indices)
    top, left, h, w = rrc_boxes(keys, heights, widths, recipe.scale, recipe.ratio)
    layout = ParamLayout.of(recipe)
    out = np.empty((len(indices), layout.width), np.float32)
    H = heights.astype(np.float64)
    W = widths.astype(np.float64)
    grid = _crop_grid(layout, H, W)
    for col, value in enumerate((top / H, left / W, h / H, w / W)):
        out[:, col] = value if grid is None else np.round(value * grid) / grid
    out[:, 4] = uniform(keys, STREAM_FLIP) < recipe.hflip
    if layout.ra_layers:
        ra = draw_rand_augment(keys, parse_rand_augment(recipe.aa))
        out[:, layout.ra_offset:layout.ra_offset + 2 * layout.ra_layers] = ra.reshape(len(indices), -1)
    if layout.erase_boxes:
        o = layout.erase_offset
        out[:, o:o + erasing.erase_columns(layout.erase_boxes)] = erasing.draw_erasing(
            keys, recipe.reprob, recipe.recount, recipe.size)
    if layout.mixing:
        if num_samples is None:
            raise KdcacheError("view_params: a mixing recipe needs num_samples (pairs are drawn inside blocks)")
        partner = partner_indices(recipe, global_seed, aug_seed, indices, num_samples)
        o = layout.mix_offset
        out[:, o:o + mixing.MIX_COLUMNS] = mixing.draw_mixing(global_seed, aug_seed, indices, partner, recipe)
    return out
