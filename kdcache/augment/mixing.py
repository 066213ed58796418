"""Mixup / cutmix as timm's Mixup in "pair" mode, with partners that are a pure function of (seed, block).

Pairing: for seed s, the samples of each block of `mix_block` consecutive indices are sorted by a
counter-based uniform (stream 200); positions 2k and 2k+1 of that order are partners. An odd last block
leaves one sample unpaired (never mixed). Partners are mutual and share one draw, keyed by the pair's
lower index (timm's `_params_per_elem` per pair): mixed with probability mixup_prob; cutmix rather than
mixup with probability mixup_switch_prob when both alphas are on; lambda ~ Beta(alpha, alpha) by the
inverse CDF of one uniform; for cutmix, timm's `rand_bbox` (cut side int(size·sqrt(1-lambda)), centre
uniform over the view) and lambda corrected to the box's true area.

Applied where both stages can do it identically: on the two uint8 views, after each was rendered
(crop, flip, RandAugment, erasing), as timm's `_mix_pair_collate` does: mixup is
rint(lam·a + (1-lam)·b) in float32 for a and rint(lam·b + (1-lam)·a) for b; cutmix swaps the box.
lambda is each sample's own weight for both partners.
"""


import numpy as np
from scipy.special import betaincinv

from kdcache.augment.rng import uniform, view_keys

STREAM_PAIR = 200
STREAM_MIX_APPLY, STREAM_MIX_SWITCH, STREAM_MIX_LAMBDA, STREAM_BOX_Y, STREAM_BOX_X = 201, 202, 203, 204, 205
MIX_COLUMNS = 7              # [mode, partner offset, lambda, top, left, h, w] (box in view pixels)
LAMBDA_GRID = 65536          # mixup's lambda is a multiple of 1/65536: compresses, and far below a grey level
MODE_NONE, MODE_MIXUP, MODE_CUTMIX = 0, 1, 2


def block_partners(global_seed: int, aug_seed: int, b0: int, b1: int) -> np.ndarray:
    """Partner index of every sample of the block [b0, b1) (itself for the odd one out)."""
    idx = np.arange(b0, b1)
    order = idx[np.argsort(uniform(view_keys(global_seed, aug_seed, idx), STREAM_PAIR), kind="stable")]
    partner = idx.copy()
    m = len(order) // 2 * 2
    partner[order[0:m:2] - b0] = order[1:m:2]
    partner[order[1:m:2] - b0] = order[0:m:2]
    return partner


def draw_mixing(global_seed: int, aug_seed: int, indices: np.ndarray, partner: np.ndarray, recipe) -> np.ndarray:
    """float32 (n, MIX_COLUMNS) for the views (indices, aug_seed) whose partners are given."""
    n = len(indices)
    out = np.zeros((n, MIX_COLUMNS), np.float32)
    out[:, 2] = 1.0
    lower = np.minimum(indices, partner)
    keys = view_keys(global_seed, aug_seed, lower)      # one draw per pair: both partners compute the same
    paired = partner != indices
    apply = paired & (uniform(keys, STREAM_MIX_APPLY) < recipe.mixup_prob)
    if recipe.mixup > 0 and recipe.cutmix > 0:
        cut = uniform(keys, STREAM_MIX_SWITCH) < recipe.mixup_switch_prob
    else:
        cut = np.full(n, recipe.cutmix > 0)
    alpha = np.where(cut, recipe.cutmix, recipe.mixup)
    u = uniform(keys, STREAM_MIX_LAMBDA)
    lam = np.ones(n)
    a = apply & (alpha > 0)
    lam[a] = betaincinv(alpha[a], alpha[a], u[a])
    lam = np.round(lam * LAMBDA_GRID) / LAMBDA_GRID       # the stored value is the truth
    size = recipe.size
    out[:, 0] = np.where(a, np.where(cut, MODE_CUTMIX, MODE_MIXUP), MODE_NONE)
    out[:, 1] = partner - indices
    out[:, 2] = np.where(a, lam, 1.0)
    c = np.flatnonzero(a & cut)
    if c.size:
        cut_side = np.floor(size * np.sqrt(1.0 - lam[c])).astype(np.int64)   # int(img_h * ratio)
        cy = np.floor(uniform(keys[c], STREAM_BOX_Y) * size).astype(np.int64)  # randint(0, img_h)
        cx = np.floor(uniform(keys[c], STREAM_BOX_X) * size).astype(np.int64)
        y0, y1 = np.clip(cy - cut_side // 2, 0, size), np.clip(cy + cut_side // 2, 0, size)
        x0, x1 = np.clip(cx - cut_side // 2, 0, size), np.clip(cx + cut_side // 2, 0, size)
        out[c, 3:7] = np.stack([y0, x0, y1 - y0, x1 - x0], 1)
        out[c, 2] = 1.0 - ((y1 - y0) * (x1 - x0)) / float(size * size)       # correct_lam
    return out


# ---- rendering (numba-compatible plain functions; the renderer compiles them) -------------------------

def mix_pair(a, b, row):
    """Mix the two uint8 views of a pair in place; row = [mode, partner offset, lambda, top, left, h, w]."""
    mode = int(row[0])
    if mode == MODE_MIXUP:
        lam = np.float32(row[2])
        rest = np.float32(1.0 - np.float64(row[2]))   # timm: float32 view * (1 - lam)
        for y in range(a.shape[0]):
            for x in range(a.shape[1]):
                for c in range(a.shape[2]):
                    va = np.float32(a[y, x, c])
                    vb = np.float32(b[y, x, c])
                    a[y, x, c] = np.uint8(np.rint(va * lam + vb * rest))
                    b[y, x, c] = np.uint8(np.rint(vb * lam + va * rest))
    elif mode == MODE_CUTMIX:
        size_h, size_w = a.shape[0], a.shape[1]
        h = min(max(int(row[5]), 0), size_h)
        w = min(max(int(row[6]), 0), size_w)
        top = min(max(int(row[3]), 0), size_h - h)
        left = min(max(int(row[4]), 0), size_w - w)
        for y in range(top, top + h):
            for x in range(left, left + w):
                for c in range(a.shape[2]):
                    t = a[y, x, c]
                    a[y, x, c] = b[y, x, c]
                    b[y, x, c] = t
