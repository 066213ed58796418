#!/usr/bin/env python
"""The renderer's cost and quality, renderer 1 (OpenCV INTER_AREA via FFCV's resize_crop) against renderer 2
(kdcache.augment.area_resize), on the same views:

  --breakdown        one thread: JPEG decode per image and crop + resize + flip per view for each renderer,
                     then the cost per view at S = 1, 4, 16 views per decoded image; with OpenCV's
                     INTER_LINEAR (not antialiased) and a JPEG decode at 1/2 scale (DCT-domain) for scale
  --photos DIR       quality: PSNR of renderer 2 against INTER_AREA, and of both against an exact float64
                     area resample, over RandomResizedCrop views of the photographs in DIR (any PNG/JPEG)
  --balance T        how evenly the dump's render calls share T threads (a projection for a machine with more
                     cores than this one): each sample's one-thread cost (decode + its S views) is measured,
                     then the render calls are laid out as numba's static split of one teacher batch (before)
                     and as kdcache's equal-cost groups over its larger calls (kdcache.augment.render.balance)
  (default)          the multi-view renderer (decode once, S views, numba threads) against the thread count

    python tools/render_scaling.py --data DIR --size 224 --breakdown
    python tools/render_scaling.py --photos DIR --size 224
    python tools/render_scaling.py --data DIR --size 224 --views 4 [--renderer 1]
    python tools/render_scaling.py --data DIR --size 224 --views 4 --samples 1024 --balance 14
"""

import argparse
import glob
import os
import time

import numba
import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a prepared dataset (kdcache prepare)")
    p.add_argument("--photos", help="a folder of photographs (PNG/JPEG) for --quality")
    p.add_argument("--size", type=int, default=None, help="view size (default: the dataset's view size; 224 for --photos)")
    p.add_argument("--views", type=int, default=1, help="views per decoded image (thread scaling)")
    p.add_argument("--samples", type=int, default=256, help="images used")
    p.add_argument("--renderer", type=int, default=None, help="renderer version (thread scaling; default: current)")
    p.add_argument("--breakdown", action="store_true", help="one-thread decode vs resize cost per renderer, then exit")
    p.add_argument("--views-per-photo", type=int, default=200, help="RRC views per photograph (--photos)")
    p.add_argument("--balance", type=int, default=None, metavar="T", help="project the dump's render balance on T threads")
    p.add_argument("--batch-size", type=int, default=256, help="teacher batch in views (--balance)")
    args = p.parse_args()
    if args.photos:
        quality(args.photos, args.size or 224, args.views_per_photo)
        return
    if not args.data:
        p.error("--data (or --photos) is required")
    from kdcache.augment import ParamLayout, ViewRecipe, view_params
    from kdcache.augment.recipe import RENDERER_VERSION
    from kdcache.augment.render import SampleBuffers, render_samples
    from kdcache.data.dataset import PreparedDataset
    ds = PreparedDataset.open(args.data)
    split = ds.split("train")
    size = args.size or ds.view_size
    m = min(args.samples, split.num_samples)
    reader = split.jpeg_reader()
    jpegs = [reader[i] for i in range(m)]
    h, w = split.sizes[:m, 0], split.sizes[:m, 1]
    recipe = ViewRecipe(size=size, renderer=args.renderer or RENDERER_VERSION)
    params = np.stack([view_params(recipe, 0, s, np.arange(m), h, w) for s in range(args.views)], 1)
    if args.breakdown:
        breakdown(jpegs, h, w, params[:, 0], size)
        return
    layout = ParamLayout.of(recipe)
    if args.balance:
        balance_projection(jpegs, h, w, params, size, layout, args.balance, args.batch_size)
        return
    out = np.empty((m, args.views, size, size, 3), np.uint8)
    buffers = SampleBuffers()
    render_samples(jpegs, h, w, params, size, layout, out=out, buffers=buffers)
    print(f"renderer {recipe.renderer}; cpu_count {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}, "
          f"numba {numba.__version__}, threading layer {numba.threading_layer()}, "
          f"default threads {numba.config.NUMBA_NUM_THREADS}")
    threads = sorted({t for t in (1, 2, 4, 8, 16) if t <= numba.config.NUMBA_NUM_THREADS} | {numba.config.NUMBA_NUM_THREADS})
    for t in threads:
        numba.set_num_threads(t)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            render_samples(jpegs, h, w, params, size, layout, out=out, buffers=buffers)
            best = min(best, time.perf_counter() - t0)
        print(f"threads {t:>2}: {best / (m * args.views) * 1e6:8.1f} us/view, {m / best:8.0f} img/s")


def _best_us(fn, items, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1e6


def breakdown(jpegs, heights, widths, params, size):
    import cv2
    from kdcache.augment import ParamLayout, ViewRecipe
    from kdcache.augment.render import C_FUNCTIONS, crop_box, decode_into, render_into
    cv2.setNumThreads(1)
    numba.set_num_threads(1)
    images = [np.empty((hh, ww, 3), np.uint8) for hh, ww in zip(heights, widths)]
    half = [np.empty(((hh + 1) // 2, (ww + 1) // 2, 3), np.uint8) for hh, ww in zip(heights, widths)]
    out = np.empty((size, size, 3), np.uint8)
    scratch = np.empty_like(out)
    jobs = list(zip(jpegs, heights, widths, images, params, half))
    decode_us = _best_us(lambda j: decode_into(np.frombuffer(j[0], np.uint8), np.uint32(j[1]), np.uint32(j[2]), j[3],
                                                C_FUNCTIONS), jobs)
    from ffcv.libffcv import imdecode
    half_us = _best_us(lambda j: imdecode(np.frombuffer(j[0], np.uint8), j[5], j[1], j[2], j[1], j[2], 0, 0, 1, 2,
                                          False, False), jobs)
    render_us, by_kind = {}, {}
    grows = [crop_box(j[1], j[2], j[4])[2] <= size and crop_box(j[1], j[2], j[4])[3] <= size for j in jobs]
    for version in (1, 2):
        layout = ParamLayout.of(ViewRecipe(size=size, renderer=version)).as_array()
        render_us[version] = _best_us(lambda j: render_into(j[3], j[4], layout, out, scratch, C_FUNCTIONS), jobs)
        for kind, want in (("shrinking on a side", False), ("growing on both sides", True)):
            some = [j for j, g in zip(jobs, grows) if g == want]
            if some:
                by_kind.setdefault(kind, [len(some)]).append(
                    _best_us(lambda j: render_into(j[3], j[4], layout, out, scratch, C_FUNCTIONS), some))
    crops = []
    for _, hh, ww, image, row, _ in jobs:
        top, left, ch, cw = crop_box(hh, ww, row)
        crops.append(image[top:top + ch, left:left + cw])
    area_us = _best_us(lambda c: cv2.resize(c, (size, size), dst=out, interpolation=cv2.INTER_AREA), crops)
    linear_us = _best_us(lambda c: cv2.resize(c, (size, size), dst=out, interpolation=cv2.INTER_LINEAR), crops)
    side = np.mean([np.sqrt(c.shape[0] * c.shape[1]) for c in crops])
    shrink = np.mean([c.shape[0] >= size and c.shape[1] >= size for c in crops])
    print(f"{len(jobs)} images of mean {np.mean(heights):.0f}x{np.mean(widths):.0f} px, views at {size} px "
          f"(mean crop side {side:.0f} px; both sides shrink in {shrink:.0%} of views), one thread:")
    print(f"  JPEG decode                     {decode_us:7.0f} us per image (at 1/2 scale, DCT-domain: {half_us:.0f} us)")
    print(f"  crop + resize + flip, renderer 1 {render_us[1]:6.0f} us per view (OpenCV INTER_AREA)")
    print(f"  crop + resize + flip, renderer 2 {render_us[2]:6.0f} us per view (area resample, "
          f"{render_us[1] / render_us[2]:.2f}x faster)")
    for kind, (n, us1, us2) in by_kind.items():
        print(f"    {n} views {kind}: renderer 1 {us1:.0f} us, renderer 2 {us2:.0f} us ({us1 / us2:.2f}x)")
    print(f"  for scale: cv2 INTER_AREA alone {area_us:.0f} us, INTER_LINEAR {linear_us:.0f} us (aliases)")
    print("  per view, decode shared by S views:      renderer 1          renderer 2      speed-up")
    for s in (1, 4, 16):
        t1, t2 = decode_us / s + render_us[1], decode_us / s + render_us[2]
        print(f"    S={s:<2}  {t1:7.0f} us (resize {render_us[1] / t1:4.0%})  {t2:7.0f} us (resize {render_us[2] / t2:4.0%})"
              f"   {t1 / t2:.2f}x")


def balance_projection(jpegs, heights, widths, params, size, layout, threads, batch_views):
    """Per-sample one-thread costs, then the makespan of each render call on `threads` threads: numba's static
    split (equal runs of consecutive samples, one per thread) of one teacher batch per call, as the dump
    rendered before, against equal-cost groups (render.balance) of the dump's calls now (whole batches, at
    least SAMPLES_PER_RENDER_THREAD samples per thread). Efficiency = work / (threads x makespan)."""
    from kdcache.augment.render import balance, decode_jpeg, render_cost, render_views
    from kdcache.teacher.dump import batches_per_render
    numba.set_num_threads(1)
    views = params.shape[1]
    cost = np.empty(len(jpegs))
    for i, jpeg in enumerate(jpegs):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            render_views(decode_jpeg(jpeg, heights[i], widths[i]), params[i], size, layout)
            best = min(best, time.perf_counter() - t0)
        cost[i] = best
    per_batch = max(1, batch_views // views)

    def efficiency(per_call, grouped):
        work = span = 0.0
        for c0 in range(0, len(cost), per_call):
            c = cost[c0:c0 + per_call]
            if grouped:
                rows = slice(c0, c0 + per_call)
                members, bounds = balance(render_cost(heights[rows], widths[rows], params[rows], size),
                                          min(threads, len(c)))
                loads = [c[members[a:b]].sum() for a, b in zip(bounds[:-1], bounds[1:])]
            else:   # numba's static schedule: one run of consecutive iterations per thread, sizes differ by <= 1
                loads = [part.sum() for part in np.array_split(c, min(threads, len(c)))]
            work, span = work + c.sum(), span + max(loads)
        return work / (threads * span)
    per_view_us = cost.sum() / (len(cost) * views) * 1e6
    print(f"{len(cost)} images, {views} views each at {size} px: one thread {per_view_us:.1f} us per view "
          f"(decode shared); per-sample cost spread (max / median) {cost.max() / np.median(cost):.2f}")
    m = batches_per_render(per_batch, views, threads)
    base = None
    for label, per_call, grouped in ((f"one batch ({per_batch} samples) per call, static split", per_batch, False),
                                     (f"one batch ({per_batch} samples) per call, equal-cost groups", per_batch, True),
                                     (f"{m} batch(es) ({m * per_batch} samples) per call, equal-cost groups",
                                      m * per_batch, True)):
        e = efficiency(per_call, grouped)
        base = base if grouped else e
        print(f"  {threads} threads, {label}: {e:5.1%} busy ({e / base:.2f}x the static split)")
    print("  (only the balance: what memory bandwidth and the teacher's thread take is not in this projection)")


def _exact_area(crop: np.ndarray, size: int) -> np.ndarray:
    """Float64 area resample (each output pixel: the mean over its footprint), the ideal both renderers aim at."""
    def matrix(src, dst):
        s = src / dst
        i = np.arange(dst)[:, None]
        j = np.arange(src)[None, :]
        return np.clip(np.minimum((i + 1) * s, j + 1) - np.maximum(i * s, j), 0, None) / s
    wy, wx = matrix(crop.shape[0], size), matrix(crop.shape[1], size)
    return np.stack([wy @ crop[:, :, c].astype(np.float64) @ wx.T for c in range(3)], -1)


def _psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def quality(folder: str, size: int, per_photo: int):
    import cv2
    from kdcache.augment import ParamLayout, ViewRecipe, view_params
    from kdcache.augment.render import crop_box, render_views
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not files:
        raise SystemExit(f"{folder}: no PNG or JPEG photographs")
    layouts = {v: ParamLayout.of(ViewRecipe(size=size, renderer=v)) for v in (1, 2)}
    rows = {"both shrink": [], "both grow": [], "one each way": []}
    for n, f in enumerate(files):
        image = np.ascontiguousarray(cv2.imread(f, cv2.IMREAD_COLOR)[:, :, ::-1])
        H, W = image.shape[:2]
        params = view_params(ViewRecipe(size=size), n, 0, np.arange(per_photo), np.full(per_photo, H), np.full(per_photo, W))
        for row in params:
            top, left, h, w = crop_box(H, W, row)
            v1 = render_views(image, row, size, layouts[1])[0]
            v2 = render_views(image, row, size, layouts[2])[0]
            ideal = _exact_area(image[top:top + h, left:left + w], size)
            if row[4] > 0.5:
                ideal = ideal[:, ::-1]
            case = "both shrink" if h >= size and w >= size else "both grow" if h <= size and w <= size else "one each way"
            rows[case].append((_psnr(v2, v1), _psnr(v1, ideal), _psnr(v2, ideal)))
    print(f"{len(files)} photographs ({', '.join(os.path.basename(f) for f in files)}), {per_photo} RRC views each "
          f"at {size} px. PSNR in dB (median over views; inf = identical):")
    print(f"  {'views':<14}{'n':>6}  {'r2 vs INTER_AREA':>17}  {'r1 vs exact area':>17}  {'r2 vs exact area':>17}")
    every = [v for vals in rows.values() for v in vals]
    for case, vals in list(rows.items()) + [("all", every)]:
        if vals:
            med = np.median(np.array(vals), 0)
            print(f"  {case:<14}{len(vals):>6}  {med[0]:17.1f}  {med[1]:17.1f}  {med[2]:17.1f}")
    low = min(v[0] for v in every)
    print(f"  lowest r2 vs INTER_AREA over all views: {low:.1f} dB")


if __name__ == "__main__":
    main()
