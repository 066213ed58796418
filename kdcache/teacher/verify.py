"""`kdcache verify`: is a cache complete and sane, and (with --replay N) does it hold what the teacher says?

Checks per seed: every unit has its marker; no fill values (NaN, -1) in finished units; class indices in
range and distinct per row; log-probabilities descending and <= 0; stored probabilities plus tail mass sum
to 1 (format 2); view parameters inside the image. Replay draws N random views of complete seeds, renders
them through the student-side FFCV replay decoder from the stored parameters, re-runs the teacher (fp32)
and compares (docs/cache-format.md, "Verifying"):
  replay error (fails the check over its threshold), on what the cache holds exactly:
    top1_agreement     fresh argmax == cached top-1 class
    replay_kl          KL(fresh || cached) over k + 1 bins: the k stored classes plus the tail mass
    tail_mass_error    |cached tail mass / fresh tail mass - 1| (the mass of the classes not stored)
  top-k loss (reported, never failed: it is what a top-k cache gives up by design):
    topk_kl            KL(full fresh distribution || the documented rebuild)
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.integrity import DamagedUnit, damaged_units
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.cache.targets import dense_logits, stored_log_bins
from kdcache.data.dataset import PreparedDataset
from kdcache.dist import DistContext, resolve_device
from kdcache.errors import KdcacheError
from kdcache.models import Normalize, build_model, forward_u8, spec_from_info


# Replay thresholds by the precision of both runs. fp32 on the CPU: fresh and dumped logits differ by summation
# order only, so the cache must hold them to its own precision (1e-3 is the format's goal for the tail mass;
# measured: mean tail error 3e-7, replay KL 3e-10). Otherwise (autocast bf16/fp16, or CUDA, whose fp32
# convolutions run in TF32 by default) the logits themselves differ: bf16 rounds a logit near 20 by up to
# 0.06, which moves the tail mass by as much (measured on CPU bf16, logits near 20: mean 3.9 %, max 15 %).
THRESHOLDS = {"fp32": {"min_agreement": 0.999, "max_kl": 1e-4, "max_tail_error": 1e-3},
              "reduced": {"min_agreement": 0.99, "max_kl": 1e-3, "max_tail_error": 0.2}}
SUM_TOLERANCE = 1e-3  # format 2: k rounded probabilities (each within 2.5e-4 relative) plus the exact tail


def _check_rows(slab, rows: np.ndarray, num_classes: int, exact_tail: bool) -> list:
    problems = []
    lp, ix, lt, p = (a[rows] for a in (slab.logp, slab.indices, slab.log_tail, slab.params))
    s = slab.seed
    # -inf is a legal log-probability (and the tail of k = C); NaN and +inf are not
    for name, bad in (("logp", np.isnan(lp) | np.isposinf(lp)), ("log_tail", np.isnan(lt) | np.isposinf(lt)),
                      ("params", ~np.isfinite(p))):
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
        if (lp[:, 1:] > lp[:, :-1]).any():
            problems.append(f"seed {s}: top-k log-probabilities not in descending order")
    # v1 rows are converted from float16 logits and a float32 log-sum-exp: allow their rounding
    if (lp[:, 0] > (1e-6 if exact_tail else 1e-2)).any():
        problems.append(f"seed {s}: a top-1 log-probability above 0 (probability > 1)")
    if exact_tail:  # v1's tail is 1 - sum by construction: nothing to check
        total = np.exp(lp.astype(np.float64)).sum(1) + np.exp(lt.astype(np.float64))
        bad = np.abs(total - 1) > SUM_TOLERANCE
        if bad.any():
            problems.append(f"seed {s}: stored probabilities plus tail mass do not sum to 1 in {int(bad.sum())} rows "
                            f"(first sample {int(rows[np.flatnonzero(bad)[0]])}, sum {total[bad][0]:.6f})")
    top, left, h, w, flip = (p[:, j] for j in range(5))  # the first five columns: crop box and flip
    eps = 1e-5
    if ((top < -eps) | (left < -eps) | (h <= 0) | (w <= 0) | (top + h > 1 + eps) | (left + w > 1 + eps)).any() \
            or not np.isin(flip, (0.0, 1.0)).all():
        problems.append(f"seed {s}: view parameters outside the image")
    return problems


def _replay(cache: TeacherCache, seeds: list, n: int, checkpoint: Optional[str], data: Optional[Path],
            device: str, seed: int, teacher_module: Optional[str]) -> dict:
    from kdcache.augment.preview import ffcv_side_views, replay_loader
    spec = cache.spec
    recorded = spec.teacher.get("module")
    if recorded and not teacher_module:  # a shared cache must not make verify run code of its choosing
        raise KdcacheError(f"{cache.path}: the teacher comes from the module {recorded!r} named in the cache; verify "
                           f"imports no module a cache names: pass --teacher-module {recorded} if you trust it")
    ds = PreparedDataset.open(data or spec.dataset["path"])
    split = ds.split(spec.dataset["split"])
    if split.fingerprint != spec.dataset["split_fingerprint"]:
        raise KdcacheError(f"{ds.root}: split {split.name} fingerprint {split.fingerprint[:16]} differs from the "
                           f"cache's {spec.dataset['split_fingerprint'][:16]}")
    model, info = build_model(spec_from_info(spec.teacher, checkpoint, teacher_module), spec.num_classes, what="teacher")
    if info["sha256"] != spec.teacher["sha256"]:
        raise KdcacheError(f"teacher weights sha256 {info['sha256'][:16]} differ from the cache's "
                           f"{spec.teacher['sha256'][:16]} ({info.get('checkpoint') or 'random init'})")
    dev = resolve_device(device, DistContext())
    model = model.to(dev).eval()
    normalize = Normalize(spec.teacher["mean"], spec.teacher["std"]).to(dev)
    rng = np.random.default_rng(seed)
    picks = sorted(zip(rng.choice(seeds, n).tolist(), rng.choice(spec.num_samples, n, replace=True).tolist()))
    recipe = ViewRecipe.from_dict(spec.recipe)
    loader = replay_loader(split, recipe)
    fresh_logits, cached = [], []
    for s in sorted({s for s, _ in picks}):
        slab = read_slab(cache, s)
        rows = [i for t, i in picks if t == s]
        # the student-side FFCV replay of the stored parameters (mixed views with their partners)
        images = ffcv_side_views(split, sorted(set(rows)), {s: slab.params}, recipe, loader)
        x = torch.from_numpy(np.stack([images[(i, s)] for i in rows])).permute(0, 3, 1, 2).to(dev)
        with torch.inference_mode():
            fresh_logits.append(forward_u8(model, normalize, x).cpu())
        cached.append(tuple(torch.from_numpy(np.asarray(a[rows])) for a in (slab.logp, slab.indices, slab.log_tail)))
    report = compare(torch.cat(fresh_logits), *(torch.cat([c[j] for c in cached]) for j in range(3)))
    # reduced precision on either side widens the replay error (THRESHOLDS)
    markers = [m for s in sorted({s for s, _ in picks}) for m in cache.markers(s).values()]
    fp32 = dev.type == "cpu" and all(m.get("device") == "cpu" and m.get("amp") == "off" for m in markers)
    return dict(report, views=n, device=str(dev), precision="fp32" if fp32 else "reduced",
                dump_precision=sorted({f"{m.get('device', '?')}/{m.get('amp', '?')}" for m in markers}))


def compare(fresh: torch.Tensor, logp: torch.Tensor, indices: torch.Tensor, log_tail: torch.Tensor) -> dict:
    """Fresh teacher logits (B, C) against cached rows: the replay error and the top-k loss, in float64."""
    fresh, logp, log_tail, indices = fresh.double(), logp.double(), log_tail.double(), indices.long()
    k, num_classes = logp.shape[1], fresh.shape[1]
    fresh_logp = torch.log_softmax(fresh, 1)
    fresh_top = fresh_logp.gather(1, indices)                  # the fresh teacher on the cache's classes...
    fresh_tail = (torch.logsumexp(fresh_logp.scatter(1, indices, -torch.inf), 1) if k < num_classes
                  else torch.full_like(log_tail, -torch.inf))  # ...and on all the others
    # replay error: KL(fresh || cached) over the k + 1 bins the cache holds (no tail bin when k = C)
    log_p = stored_log_bins(fresh_top, fresh_tail)[:, :k + (k < num_classes)]
    log_q = stored_log_bins(logp, log_tail)[:, :k + (k < num_classes)]
    log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)   # uint16 rounding: the sum is 1 within 2.5e-4
    replay_kl = (log_p.exp() * (log_p - log_q)).sum(1)
    tail_error = (log_tail - fresh_tail).expm1().abs() if k < num_classes else torch.zeros_like(log_tail)
    # top-k loss: KL(full fresh distribution || documented rebuild), reported, never failed
    rebuilt = torch.log_softmax(dense_logits(logp, indices, log_tail, num_classes).double(), 1)
    topk_kl = (fresh_logp.exp() * (fresh_logp - rebuilt)).sum(1)
    return {"top1_agreement": float((fresh.argmax(1) == indices[:, 0]).double().mean()),
            "replay_kl_mean": float(replay_kl.mean()), "replay_kl_max": float(replay_kl.max()),
            "tail_mass_error_mean": float(tail_error.mean()), "tail_mass_error_max": float(tail_error.max()),
            "max_abs_logp_error": float((fresh_top - logp).abs().max()),
            "topk_kl_mean": float(topk_kl.mean()), "topk_kl_max": float(topk_kl.max())}


def verify(path, replay: int = 0, checkpoint: Optional[str] = None, data: Optional[Path] = None,
           device: str = "auto", seed: int = 0, min_agreement: Optional[float] = None,
           max_kl: Optional[float] = None, max_tail_error: Optional[float] = None,
           teacher_module: Optional[str] = None) -> dict:
    """Thresholds left None are taken from THRESHOLDS by the precision the dump and the replay ran at.
    teacher_module: the 'package.module:factory' to build the teacher with; the one the cache records is
    never imported unless given here (importing runs the module's code)."""
    cache = TeacherCache.open(path)
    spec = cache.spec
    problems, missing, complete = [], {}, []
    for s in cache.seeds:
        miss = cache.missing_blocks(s)
        if miss:
            missing[str(s)] = miss
            problems.append(f"seed {s}: {len(miss)} of {spec.num_blocks} units missing "
                            f"(blocks {miss[:8]}{'...' if len(miss) > 8 else ''})")
        # damaged units (a bad marker, or shard objects that fail their marker's record) are named and left
        # out of the row checks; metadata that cannot be read leaves nothing of the seed to check
        try:
            cache.arrays(s)
        except KdcacheError as exc:
            problems.append(str(exc))
            continue
        markers, bad = cache.checked_markers(s)
        bad.update(damaged_units(cache, s, markers))
        problems += list(bad.values())
        try:
            slab = read_slab(cache, s, require_complete=False, exclude=bad)
        except DamagedUnit as exc:  # undecodable bytes under a marker without checksums (older caches)
            problems.append(str(exc))
            continue
        done = sorted(set(range(spec.num_blocks)) - set(miss) - set(bad))
        rows = np.concatenate([np.arange(*spec.block_bounds(b)) for b in done]) if done else np.zeros(0, np.int64)
        if len(rows):
            problems += _check_rows(slab, rows, spec.num_classes, exact_tail=cache.version >= 2)
        if not miss and not bad:
            complete.append(s)
    report = {"cache": str(cache.path), "seeds": cache.seeds, "seeds_complete": sorted(complete),
              "complete": not missing, "missing_units": missing, "problems": problems}
    if replay:
        if not complete:
            raise KdcacheError(f"{cache.path}: no complete seed to replay")
        r = report["replay"] = _replay(cache, sorted(complete), replay, checkpoint, data, device, seed, teacher_module)
        r["renderer"] = renderer_comparison(cache)
        given = {"min_agreement": min_agreement, "max_kl": max_kl, "max_tail_error": max_tail_error}
        t = r["thresholds"] = {key: given[key] if given[key] is not None else default
                               for key, default in THRESHOLDS[r["precision"]].items()}
        # one problem per failed check, named; the top-k loss (topk_kl) is reported, never failed
        if not r["top1_agreement"] >= t["min_agreement"]:
            problems.append(f"replay: top-1 agreement {r['top1_agreement']:.4f} below {t['min_agreement']}")
        if not r["replay_kl_mean"] <= t["max_kl"]:
            problems.append(f"replay: mean KL(fresh || cached) over the k + 1 stored bins {r['replay_kl_mean']:.2e} "
                            f"above {t['max_kl']:g}")
        if not r["tail_mass_error_mean"] <= t["max_tail_error"]:
            problems.append(f"replay: mean relative tail-mass error {r['tail_mass_error_mean']:.2e} "
                            f"above {t['max_tail_error']:g}")
    report["ok"] = not problems
    return report


def renderer_comparison(cache: TeacherCache) -> dict:
    """The renderer and libraries that made the cache against those replaying it now: a difference is
    reported (the replay's numbers then say whether the pixels still agree); a renderer version this
    kdcache cannot render was refused when the recipe was read."""
    from kdcache.augment.render import RENDERER_VERSION, library_versions
    made = cache.attrs.get("renderer") or {"version": 1, "libraries": None}   # format 1 recorded neither
    now = library_versions()
    differ = {k: [made["libraries"].get(k), v] for k, v in now.items()
              if made["libraries"] is not None and made["libraries"].get(k) != v}
    # every renderer version is kept, so the replay renders with the cache's own version
    return {"cache_version": made["version"], "replayed_version": made["version"], "current_version": RENDERER_VERSION,
            "cache_libraries": made["libraries"],
            "current_libraries": now, "libraries_differ": differ}


def render_report(r: dict) -> str:
    lines = [f"cache {r['cache']}: {'OK' if r['ok'] else 'PROBLEMS'}",
             f"  seeds {r['seeds']}, complete {r['seeds_complete']}"]
    lines += [f"  problem: {p}" for p in r["problems"]]  # missing units included
    if "replay" in r:
        p, t = r["replay"], r["replay"]["thresholds"]
        lines += [f"  replay {p['views']} views on {p['device']} (dump {', '.join(p['dump_precision'])}: "
                  f"{p['precision']} thresholds)",
                  f"    top-1 agreement {100 * p['top1_agreement']:.2f} % (>= {100 * t['min_agreement']:g} %)",
                  f"    replay KL(fresh || cached), k + 1 bins: mean {p['replay_kl_mean']:.2e} (<= {t['max_kl']:g}), "
                  f"max {p['replay_kl_max']:.2e}",
                  f"    tail-mass relative error: mean {p['tail_mass_error_mean']:.2e} (<= {t['max_tail_error']:g}), "
                  f"max {p['tail_mass_error_max']:.2e}; max |log-prob error| {p['max_abs_logp_error']:.2e}",
                  f"    top-k loss KL(fresh || rebuild), reported only: mean {p['topk_kl_mean']:.2e}, "
                  f"max {p['topk_kl_max']:.2e}"]
        rend = p.get("renderer")
        if rend and (rend["libraries_differ"] or rend["cache_libraries"] is None):
            what = (", ".join(f"{k} {a} -> {b}" for k, a, b in ((k, *v) for k, v in rend["libraries_differ"].items()))
                    or "not recorded (format 1)")
            lines.append(f"    renderer {rend['cache_version']}: the libraries that made this cache differ from the "
                         f"current ones ({what}); the replay above re-rendered every view with the current ones")
    return "\n".join(lines)


def verify_cache(cfg) -> dict:
    """verify() with a kdcache.teacher.config.VerifyConfig: the report `kdcache verify` prints."""
    return verify(cfg.cache, replay=cfg.replay, checkpoint=cfg.teacher_checkpoint, data=cfg.data, device=cfg.device,
                  seed=cfg.replay_seed, min_agreement=cfg.min_agreement, max_kl=cfg.max_kl,
                  max_tail_error=cfg.max_tail_error, teacher_module=cfg.teacher_module)
