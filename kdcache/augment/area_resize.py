"""Renderer 2's resize: crop + area (box-filter) resample + optional mirror, in integer fixed point.

Why not OpenCV's INTER_AREA (renderer 1, through FFCV's resize_crop): for a non-integer downscale, its
generic area path walks a per-pixel coefficient table in scalar code, 416 of the 455 us of a 224 px view on
one core (BENCHMARKS.md). The same filter is separable: each output pixel is the mean of the source area its
footprint covers, so one pass over rows and one over columns give it. Both passes are written as sums of
whole contiguous rows (the column pass runs on a transposed intermediate), which numba/LLVM vectorises;
the crop, the transposes and the mirror are folded into the stores. Integer arithmetic makes the pixels
independent of the SIMD width of the machine (AVX2 or AVX-512 give the same bytes), as the cache needs.

Per axis the weights are the overlap of the output pixel's footprint [i*s, (i+1)*s) (s = source / output
length) with each source pixel, divided by s. That is INTER_AREA's definition when both axes shrink and its
upscale rule when both grow; where one axis shrinks and the other grows, INTER_AREA switches to a 2-tap
linear filter on both axes (which aliases), and this resample stays area-weighted per axis. Renderer 2 uses
it whenever a side shrinks; a crop that grows on both axes goes to OpenCV's INTER_AREA, whose growth path is
this same filter on SIMD code, faster there (the two transposes here cost more than the sums when the crop
is small).
Not JPEG DCT-domain scaling: it picks the scale per view, so a decode could no longer serve several views
of one image (the dump decodes once for S views), and the pixels would change with the crop size.
"""

import numpy as np

WEIGHT_BITS = 14   # each axis' weights sum to exactly 2^14 (a flat image stays flat)
KEEP_BITS = 7      # fractional bits kept between the passes: 255 * 2^7 fits the int16 intermediate
FINAL_SHIFT = 2 * WEIGHT_BITS - KEEP_BITS


def area_taps(src_len, dst_len):
    """(first source index, int32 weights (dst_len, K)) of each output pixel; weights of a row sum to 2^14.
    Computed in float64 without fastmath, so both stages (and any machine) get the same integers."""
    scale = src_len / dst_len
    taps = int(src_len // dst_len) + 2
    one = 1 << WEIGHT_BITS
    start = np.empty(dst_len, np.int64)
    weights = np.zeros((dst_len, taps), np.int32)
    for i in range(dst_len):
        a = i * scale
        b = (i + 1) * scale
        j0 = min(int(np.floor(a)), src_len - 1)
        start[i] = j0
        total = 0
        largest = 0
        for k in range(taps):
            j = j0 + k
            lo = max(a, float(j))
            hi = min(b, float(j + 1))
            if hi > lo and j < src_len:
                weights[i, k] = int(np.floor((hi - lo) / scale * one + 0.5))
                total += weights[i, k]
                if weights[i, k] > weights[i, largest]:
                    largest = k
        weights[i, largest] += one - total
    return start, weights


def weighted_lines(acc, data, base, stride, weights, start):
    """acc[:L] <- start + sum over k of weights[k] * data[base + k*stride : ... + L] (L = len(acc)), skipping
    zero weights: one output line of either pass, a sum of whole contiguous lines (what numba vectorises)."""
    n = acc.shape[0]
    w0 = weights[0]
    line = data[base:base + n]
    for i in range(n):
        acc[i] = start + w0 * np.int32(line[i])
    for k in range(1, weights.shape[0]):
        wk = weights[k]
        if wk != 0:
            line = data[base + k * stride:base + k * stride + n]
            for i in range(n):
                acc[i] += wk * np.int32(line[i])


def resize_area(image, top, left, height, width, out, mirror):
    """out (S_y, S_x, 3) uint8 <- the crop image[top:top+height, left:left+width], area-resampled, mirrored
    left-right when `mirror`. Pass 1 sums source rows into one output row at a time and stores it transposed;
    pass 2 sums rows of that transpose (source columns) into one output column at a time. Each sum starts
    at half its final shift's unit, so the shift rounds half up."""
    out_h, out_w = out.shape[0], out.shape[1]
    row_start, row_w = area_taps(height, out_h)
    col_start, col_w = area_taps(width, out_w)
    src = image.reshape(-1)
    src_stride = image.shape[1] * 3
    acc = np.empty(max(width, out_h) * 3, np.int32)
    row_acc = acc[:width * 3]
    col_acc = acc[:out_h * 3]
    columns = np.empty((width, out_h, 3), np.int16)   # columns[x, y]: output row y at source column x
    round1 = np.int32(1 << (KEEP_BITS - 1))
    for y in range(out_h):
        weighted_lines(row_acc, src, (top + row_start[y]) * src_stride + left * 3, src_stride, row_w[y], round1)
        for x in range(width):
            columns[x, y, 0] = row_acc[3 * x] >> KEEP_BITS
            columns[x, y, 1] = row_acc[3 * x + 1] >> KEEP_BITS
            columns[x, y, 2] = row_acc[3 * x + 2] >> KEEP_BITS
    flat = columns.reshape(-1)
    m = out_h * 3
    round2 = np.int32(1 << (FINAL_SHIFT - 1))
    for x in range(out_w):
        weighted_lines(col_acc, flat, col_start[x] * m, m, col_w[x], round2)
        x_out = out_w - 1 - x if mirror else x
        for y in range(out_h):
            out[y, x_out, 0] = min(col_acc[3 * y] >> FINAL_SHIFT, 255)
            out[y, x_out, 1] = min(col_acc[3 * y + 1] >> FINAL_SHIFT, 255)
            out[y, x_out, 2] = min(col_acc[3 * y + 2] >> FINAL_SHIFT, 255)
