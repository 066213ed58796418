"""`kdcache verify`: is a cache complete and sane, and (with --replay N) does it hold what the teacher says?

Checks per seed: every unit has its marker; no fill values (NaN, -1) in finished units; class indices in
range and distinct per row; values descending; lse >= the top value; view parameters inside the image.
Replay draws N random views of complete seeds, renders them through the student-side FFCV replay
decoder from the stored parameters, re-runs the teacher (fp32) and compares:
  top1_agreement  fresh argmax == cached top-1 class
  mean_kl         KL(fresh || cached) over the k stored classes plus one bin for the remaining mass:
                  exactly what the cache holds, independent of how the tail is rebuilt
  tail_kl         KL(full fresh distribution || the documented rebuild): the top-k approximation itself
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.cache.targets import dense_logits, stored_bins
from kdcache.data.dataset import PreparedDataset
from kdcache.dist import DistContext, resolve_device
from kdcache.errors import KdcacheError
from kdcache.models import Normalize, build_model, forward_u8, spec_from_info


def _check_rows(slab, rows: np.ndarray, num_classes: int) -> list:
    problems = []
    v, ix, lse, p = (a[rows] for a in (slab.values, slab.indices, slab.lse, slab.params))
    s = slab.seed
    for name, arr in (("values", v), ("lse", lse), ("params", p)):
        bad = ~np.isfinite(arr.astype(np.float32))
        if bad.any():
            problems.append(f"seed {s}: {int(bad.any(axis=tuple(range(1, bad.ndim))).sum())} rows of {name} hold NaN/inf "
                            f"(first sample {int(rows[np.flatnonzero(bad.reshape(len(rows), -1).any(1))[0]])})")
    if ((ix < 0) | (ix >= num_classes)).any():
        first = int(rows[np.flatnonzero(((ix < 0) | (ix >= num_classes)).any(1))[0]])
        problems.append(f"seed {s}: class indices outside [0, {num_classes}) (first sample {first})")
    if ix.shape[1] > 1:
        srt = np.sort(ix, 1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            problems.append(f"seed {s}: repeated class indices within a row")
        vf = v.astype(np.float32)
        if (vf[:, 1:] > vf[:, :-1]).any():
            problems.append(f"seed {s}: top-k values not in descending order")
    if (lse < v[:, 0].astype(np.float32) - 1e-2).any():
        problems.append(f"seed {s}: log-sum-exp below the top logit")
    top, left, h, w, flip = p.T
    eps = 1e-5
    if ((top < -eps) | (left < -eps) | (h <= 0) | (w <= 0) | (top + h > 1 + eps) | (left + w > 1 + eps)).any() \
            or not np.isin(flip, (0.0, 1.0)).all():
        problems.append(f"seed {s}: view parameters outside the image")
    return problems


def _replay(cache: TeacherCache, seeds: list, n: int, checkpoint: Optional[str], data: Optional[Path],
            device: str, seed: int) -> dict:
    from kdcache.student.loader import ReplayLoader
    spec = cache.spec
    ds = PreparedDataset.open(data or spec.dataset["path"])
    split = ds.split(spec.dataset["split"])
    if split.fingerprint != spec.dataset["split_fingerprint"]:
        raise KdcacheError(f"{ds.root}: split {split.name} fingerprint {split.fingerprint[:16]} differs from the "
                           f"cache's {spec.dataset['split_fingerprint'][:16]}")
    model, info = build_model(spec_from_info(spec.teacher, checkpoint), spec.num_classes, what="teacher")
    if info["sha256"] != spec.teacher["sha256"]:
        raise KdcacheError(f"teacher weights sha256 {info['sha256'][:16]} differ from the cache's "
                           f"{spec.teacher['sha256'][:16]} ({info.get('checkpoint') or 'random init'})")
    dev = resolve_device(device, DistContext())
    model = model.to(dev).eval()
    normalize = Normalize(spec.teacher["mean"], spec.teacher["std"]).to(dev)
    rng = np.random.default_rng(seed)
    picks = sorted(zip(rng.choice(seeds, n).tolist(), rng.choice(spec.num_samples, n, replace=True).tolist()))
    wanted = sorted({i for _, i in picks})
    loader = ReplayLoader(split.beton_path, split.num_samples, spec.recipe["size"], batch_size=len(wanted),
                          workers=None, order="sequential", indices=wanted, drop_last=False)
    fresh_logits, cached = [], []
    for s in sorted({s for s, _ in picks}):
        slab = read_slab(cache, s)
        loader.set_views(slab.params)
        images = {}
        for batch, _, idx in loader:
            for img, i in zip(batch, idx.tolist()):
                images[i] = img
        rows = [i for t, i in picks if t == s]
        x = torch.stack([images[i] for i in rows]).to(dev)
        with torch.inference_mode():
            fresh_logits.append(forward_u8(model, normalize, x).cpu())
        cached.append(tuple(torch.from_numpy(np.asarray(a[rows])) for a in (slab.values, slab.indices, slab.lse)))
    fresh = torch.cat(fresh_logits)
    values, indices, lse = (torch.cat([c[j] for c in cached]) for j in range(3))
    indices = indices.long()
    logp = torch.log_softmax(fresh, 1)
    fresh_bins = stored_bins(fresh.gather(1, indices), torch.logsumexp(fresh, 1))
    cache_bins = stored_bins(values, lse)
    if values.shape[1] == spec.num_classes:  # no tail: a "rest" bin would only hold float16 rounding
        fresh_bins, cache_bins = fresh_bins[:, :-1], cache_bins[:, :-1]
    # float16 logits against a float32 lse can sum past 1 by a little: compare normalised distributions
    fresh_bins = fresh_bins / fresh_bins.sum(1, keepdim=True)
    cache_bins = cache_bins / cache_bins.sum(1, keepdim=True)
    eps = 1e-12
    kl = (fresh_bins * (torch.log(fresh_bins + eps) - torch.log(cache_bins + eps))).sum(1)
    rebuilt = torch.log_softmax(dense_logits(values, indices, lse, spec.num_classes), 1)
    tail_kl = (logp.exp() * (logp - rebuilt)).sum(1)
    logit_err = (fresh.gather(1, indices) - values.float()).abs().max()
    return {"views": n, "top1_agreement": float((fresh.argmax(1) == indices[:, 0]).float().mean()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "max_abs_logit_error": float(logit_err),
            "tail_kl": float(tail_kl.mean()), "device": str(dev)}


def verify(path, replay: int = 0, checkpoint: Optional[str] = None, data: Optional[Path] = None,
           device: str = "auto", seed: int = 0, min_agreement: float = 0.99, max_kl: float = 1e-3) -> dict:
    cache = TeacherCache.open(path)
    spec = cache.spec
    problems, missing, complete = [], {}, []
    for s in cache.seeds:
        miss = cache.missing_blocks(s)
        if miss:
            missing[str(s)] = miss
        slab = read_slab(cache, s, require_complete=False)
        done = sorted(set(range(spec.num_blocks)) - set(miss))
        rows = np.concatenate([np.arange(*spec.block_bounds(b)) for b in done]) if done else np.zeros(0, np.int64)
        if len(rows):
            problems += _check_rows(slab, rows, spec.num_classes)
        if not miss:
            complete.append(s)
    report = {"cache": str(cache.path), "seeds": cache.seeds, "seeds_complete": sorted(complete),
              "complete": not missing, "missing_units": missing, "problems": problems}
    if replay:
        if not complete:
            raise KdcacheError(f"{cache.path}: no complete seed to replay")
        report["replay"] = _replay(cache, sorted(complete), replay, checkpoint, data, device, seed)
        report["replay"]["thresholds"] = {"min_agreement": min_agreement, "max_kl": max_kl}
    report["ok"] = (report["complete"] and not problems
                    and (not replay or (report["replay"]["top1_agreement"] >= min_agreement
                                        and report["replay"]["mean_kl"] <= max_kl)))
    return report


def render_report(r: dict) -> str:
    lines = [f"cache {r['cache']}: {'OK' if r['ok'] else 'PROBLEMS'}",
             f"  seeds {r['seeds']}, complete {r['seeds_complete']}"]
    for s, blocks in r["missing_units"].items():
        lines.append(f"  seed {s}: {len(blocks)} units missing (blocks {blocks[:8]}{'...' if len(blocks) > 8 else ''})")
    lines += [f"  problem: {p}" for p in r["problems"]]
    if "replay" in r:
        p = r["replay"]
        lines.append(f"  replay {p['views']} views on {p['device']}: top-1 agreement {100 * p['top1_agreement']:.2f} %, "
                     f"mean KL {p['mean_kl']:.2e} (max {p['max_kl']:.2e}), max |logit error| {p['max_abs_logit_error']:.2e}, "
                     f"top-k rebuild KL {p['tail_kl']:.2e}")
    return "\n".join(lines)
