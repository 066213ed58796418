"""`kdcache verify`: is a cache complete and sane, and (with --replay N) does it hold what the teacher says?

Checks per seed: every unit has its marker; no fill values (NaN, -1) in finished units; class indices in
range and distinct among the top k; top-k log-probabilities descending and <= 0; stored probabilities plus
tail mass sum to 1 (format 2); view parameters inside the image. Sampled caches (format 4): the draw
columns' classes are not among the row's top k, ascending, no likelier than the k-th class, and log_tail
(log S) is finite. Replay draws N random views of complete seeds, renders them through the student-side FFCV
replay decoder from the stored parameters, re-runs the teacher (fp32) and compares (docs/cache-format.md,
"Verifying"):
  replay error (fails the check over its threshold), on what the cache holds exactly:
    top1_agreement     fresh argmax == cached top-1 class
    replay_kl          KL(fresh || cached) over k + 1 bins: the k stored classes plus the tail (at T = Td for
                       sampled caches: p^(1/Td) of the top k and S, all stored exactly)
    tail_mass_error    |cached tail mass / fresh tail mass - 1| (sampled: S, the tail's sum of p^(1/Td))
  sampled caches: draw_agreement, the fresh teacher's draws with the same uniforms against the stored classes
  (fails under DRAW_AGREEMENT when both runs are fp32 on the CPU, reported otherwise)
  top-k loss (reported, never failed: it is what a top-k cache gives up by design):
    topk_kl            KL(full fresh distribution || the documented rebuild)
Teachers added over the cache's views (teachers/<label>/) are verified the same way, each on its own units
and with its own teacher, under report["teachers"]; their problems count for the whole cache.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.integrity import DamagedUnit, damaged_units
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.cache.targets import dense_logits, draw_tail, stored_log_bins
from kdcache.data.dataset import PreparedDataset
from kdcache.dist import DistContext, resolve_device
from kdcache.errors import KdcacheError
from kdcache.models import Normalize, build_model, forward_u8, spec_from_info
from kdcache.teacher.runner import draw_uniforms


# Replay thresholds by the precision of both runs. fp32 on the CPU: fresh and dumped logits differ by summation
# order only, so the cache must hold them to its own precision (1e-3 is the format's goal for the tail mass;
# measured: mean tail error 3e-7, replay KL 3e-10). Otherwise (autocast bf16/fp16, or CUDA, whose fp32
# convolutions run in TF32 by default) the logits themselves differ: bf16 rounds a logit near 20 by up to
# 0.06, which moves the tail mass by as much (measured on CPU bf16, logits near 20: mean 3.9 %, max 15 %).
THRESHOLDS = {"fp32": {"min_agreement": 0.999, "max_kl": 1e-4, "max_tail_error": 1e-3},
              "reduced": {"min_agreement": 0.99, "max_kl": 1e-3, "max_tail_error": 0.2}}
# Sampled caches at fp32: a fresh draw differs from the stored one only where summation order moves a class
# boundary of the cumulative distribution across a draw position: about 1e-7 relative, so nearly never
DRAW_AGREEMENT = 0.99
SUM_TOLERANCE = 1e-3  # format 2: k rounded probabilities (each within 2.5e-4 relative) plus the exact tail


def _first(rows: np.ndarray, bad: np.ndarray) -> int:
    return int(rows[np.flatnonzero(bad.reshape(len(rows), -1).any(1))[0]])


def _check_values(s: int, rows, lp, ix, lt, p, num_classes: int, finite_tail: bool) -> list:
    """No NaN/+inf (log_tail: not -inf either when `finite_tail`), class indices in [0, C)."""
    problems = []
    tail_bad = ~np.isfinite(lt) if finite_tail else np.isnan(lt) | np.isposinf(lt)
    # -inf is a legal log-probability (and the tail of k = C); NaN and +inf are not
    checks = [("logp", np.isnan(lp) | np.isposinf(lp)), ("log_tail", tail_bad)]
    if p is not None:   # an added teacher has no params: its views are the main cache's
        checks.append(("params", ~np.isfinite(p)))
    for name, bad in checks:
        if bad.any():
            what = "NaN/inf" if name != "log_tail" or not finite_tail else "a value that is not finite"
            problems.append(f"seed {s}: {int(bad.any(axis=tuple(range(1, bad.ndim))).sum())} rows of {name} hold "
                            f"{what} (first sample {_first(rows, bad)})")
    out = (ix < 0) | (ix >= num_classes)
    if out.any():
        problems.append(f"seed {s}: class indices outside [0, {num_classes}) (first sample {_first(rows, out)})")
    return problems


def _check_top(s: int, rows, lp, ix, lt, exact_tail: bool, tail_is_mass: bool) -> list:
    """The top-k columns: distinct classes, descending, top-1 <= 0, and (format >= 2, when log_tail is the tail
    mass) their probabilities plus the tail summing to 1; else at most 1."""
    problems = []
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
        total = np.exp(lp.astype(np.float64)).sum(1) + (np.exp(lt.astype(np.float64)) if tail_is_mass else 0.0)
        bad = np.abs(total - 1) > SUM_TOLERANCE if tail_is_mass else total > 1 + SUM_TOLERANCE
        if bad.any():
            what = "stored probabilities plus tail mass do not sum to 1" if tail_is_mass else \
                "the top-k probabilities sum to more than 1"
            problems.append(f"seed {s}: {what} in {int(bad.sum())} rows (first sample {_first(rows, bad)}, "
                            f"sum {total[bad][0]:.6f})")
    return problems


def _check_draws(s: int, rows, lp, ix, k: int) -> list:
    """Sampled rows' draw columns: no top-k class, ascending class, no likelier than the k-th stored class (the
    uint16 rounding is monotone, so this holds exactly as stored)."""
    problems = []
    top, draws = ix[:, :k], ix[:, k:]
    for what, bad in (("a draw is one of the row's top-k classes", (draws[:, :, None] == top[:, None, :]).any((1, 2))),
                      ("draws not in ascending class order", (np.diff(draws.astype(np.int64), axis=1) < 0).any(1)),
                      ("a draw more probable than the k-th class", (lp[:, k:] > lp[:, k - 1:k]).any(1))):
        if bad.any():
            problems.append(f"seed {s}: {what} in {int(bad.sum())} rows (first sample {_first(rows, bad)})")
    return problems


def _check_cv_stats(s: int, rows, stats) -> list:
    """sampled-cv rows' tail statistics: log beta finite, log A not NaN or +inf (-inf: a flat tail), and the
    median and the spread within what a tail of sum S allows (beta <= S, A <= 3 S)."""
    log_s, log_beta, log_a = (stats[:, j].astype(np.float64) for j in range(3))
    problems = []
    for what, bad in (("log beta is not finite", ~np.isfinite(log_beta)),
                      ("log A is NaN or +inf", np.isnan(log_a) | np.isposinf(log_a)),
                      ("the median beta exceeds the tail's sum S", log_beta > log_s + 1e-5),
                      ("the spread A exceeds 3 S", log_a > log_s + np.log(3.0) + 1e-5)):
        if bad.any():
            problems.append(f"seed {s}: {what} in {int(bad.sum())} rows (first sample {_first(rows, bad)})")
    return problems


def _check_params(s: int, p) -> list:
    top, left, h, w, flip = (p[:, j] for j in range(5))  # the first five columns: crop box and flip
    eps = 1e-5
    if ((top < -eps) | (left < -eps) | (h <= 0) | (w <= 0) | (top + h > 1 + eps) | (left + w > 1 + eps)).any() \
            or not np.isin(flip, (0.0, 1.0)).all():
        return [f"seed {s}: view parameters outside the image"]
    return []


def _check_rows(slab, rows: np.ndarray, num_classes: int, exact_tail: bool, spec=None) -> list:
    """The scan's row checks of one seed's finished rows (spec: the cache's, for sampled targets' layout)."""
    lp, ix, lt = (a[rows] for a in (slab.logp, slab.indices, slab.log_tail))
    p = slab.params[rows] if slab.params is not None else None
    k = spec.exact_columns if spec is not None else None
    problems = []
    if lt.ndim == 2:   # sampled-cv: (log S, log beta, log A); the generic checks take log S
        problems += _check_cv_stats(slab.seed, rows, lt)
        lt = lt[:, 0]
    problems += _check_values(slab.seed, rows, lp, ix, lt, p, num_classes, finite_tail=k is not None)
    tail_is_mass = k is None or float(spec.sample_temperature) == 1.0   # log S is the tail mass at Td = 1
    problems += _check_top(slab.seed, rows, lp[:, :k], ix[:, :k], lt, exact_tail, tail_is_mass)
    if k is not None:
        problems += _check_draws(slab.seed, rows, lp, ix, k)
    return problems + (_check_params(slab.seed, p) if p is not None else [])


def _replay_teacher(cache: TeacherCache, checkpoint: Optional[str], teacher_module: Optional[str], device: str):
    """(model, normalize, device): the cache's teacher rebuilt from its record, its weights checked."""
    spec = cache.spec
    recorded = spec.teacher.get("module")
    if recorded and not teacher_module:  # a shared cache must not make verify run code of its choosing
        raise KdcacheError(f"{cache.path}: the teacher comes from the module {recorded!r} named in the cache; verify "
                           f"imports no module a cache names: pass --teacher-module {recorded} if you trust it")
    model, info = build_model(spec_from_info(spec.teacher, checkpoint, teacher_module), spec.num_classes, what="teacher")
    if info["sha256"] != spec.teacher["sha256"]:
        raise KdcacheError(f"teacher weights sha256 {info['sha256'][:16]} differ from the cache's "
                           f"{spec.teacher['sha256'][:16]} ({info.get('checkpoint') or 'random init'})")
    dev = resolve_device(device, DistContext())
    return model.to(dev).eval(), Normalize(spec.teacher["mean"], spec.teacher["std"]).to(dev), dev


def _replay_split(spec, data: Optional[Path]):
    ds = PreparedDataset.open(data or spec.dataset["path"])
    split = ds.split(spec.dataset["split"])
    if split.fingerprint != spec.dataset["split_fingerprint"]:
        raise KdcacheError(f"{ds.root}: split {split.name} fingerprint {split.fingerprint[:16]} differs from the "
                           f"cache's {spec.dataset['split_fingerprint'][:16]}")
    return split


def _replay(cache: TeacherCache, seeds: list, n: int, checkpoint: Optional[str], data: Optional[Path],
            device: str, seed: int, teacher_module: Optional[str], views: Optional[TeacherCache] = None) -> dict:
    """Replay n views of `seeds`: their parameters from `views` (the main cache of an added teacher; default
    the cache itself), the targets and the teacher from `cache`."""
    from kdcache.augment.preview import ffcv_side_views, replay_loader
    spec, views = cache.spec, views or cache
    model, normalize, dev = _replay_teacher(cache, checkpoint, teacher_module, device)
    split = _replay_split(spec, data)
    rng = np.random.default_rng(seed)
    picks = sorted(zip(rng.choice(seeds, n).tolist(), rng.choice(spec.num_samples, n, replace=True).tolist()))
    recipe = ViewRecipe.from_dict(spec.recipe)
    loader = replay_loader(split, recipe)
    fresh_logits, cached = [], []
    for s in sorted({s for s, _ in picks}):
        slab = read_slab(cache, s)
        params = slab.params if slab.params is not None else read_slab(views, s).params
        rows = [i for t, i in picks if t == s]
        # the student-side FFCV replay of the stored parameters (mixed views with their partners)
        images = ffcv_side_views(split, sorted(set(rows)), {s: params}, recipe, loader)
        x = torch.from_numpy(np.stack([images[(i, s)] for i in rows])).permute(0, 3, 1, 2).to(dev)
        with torch.inference_mode():
            fresh_logits.append(forward_u8(model, normalize, x).cpu())
        cached.append(tuple(torch.from_numpy(np.asarray(a[rows])) for a in (slab.logp, slab.indices, slab.log_tail)))
    uniforms = None
    if spec.sampled:
        uniforms = torch.from_numpy(draw_uniforms(spec.global_seed, [s for s, _ in picks], [i for _, i in picks]))
    report = compare(torch.cat(fresh_logits), *(torch.cat([c[j] for c in cached]) for j in range(3)),
                     exact=spec.exact_columns, sample_temperature=spec.sample_temperature, uniforms=uniforms,
                     values_dtype=spec.values_dtype)
    # reduced precision on either side widens the replay error (THRESHOLDS)
    markers = [m for s in sorted({s for s, _ in picks}) for m in cache.markers(s).values()]
    fp32 = dev.type == "cpu" and all(m.get("device") == "cpu" and m.get("amp") == "off" for m in markers)
    return dict(report, views=n, device=str(dev), precision="fp32" if fp32 else "reduced",
                dump_precision=sorted({f"{m.get('device', '?')}/{m.get('amp', '?')}" for m in markers}))


def _draw_agreement(fresh: torch.Tensor, indices: torch.Tensor, k: int, td: float, uniforms: torch.Tensor,
                    control_variate: bool, values_dtype: str) -> dict:
    """The fresh teacher's draws, made as the dump made them (its own top k, the same uniforms), against the
    stored draw columns: the fraction of views whose m classes all agree, and of single draws."""
    m = indices.shape[1] - k
    classes = draw_tail(fresh, fresh.topk(k, 1).indices, m, td, uniforms, control_variate, values_dtype)[0]
    same = classes == indices[:, k:]
    return {"draw_agreement": float(same.all(1).double().mean()), "draw_class_agreement": float(same.double().mean())}


def compare(fresh: torch.Tensor, logp: torch.Tensor, indices: torch.Tensor, log_tail: torch.Tensor,
            exact: Optional[int] = None, sample_temperature: float = 1.0,
            uniforms: Optional[torch.Tensor] = None, values_dtype: str = "uint16") -> dict:
    """Fresh teacher logits (B, C) against cached rows: the replay error and the top-k loss, in float64.
    exact, sample_temperature: a sampled cache's k and Td (spec.target_rule()); uniforms: its views' draw offsets
    (kdcache.teacher.runner.draw_uniforms), to redraw with the fresh logits. A sampled-cv cache's (B, 3) log_tail
    is compared by its log S; its draws are redrawn as the dump drew them (values_dtype: the rounding)."""
    control_variate = log_tail.ndim == 2
    if control_variate:
        log_tail = log_tail[:, 0]
    fresh, logp, log_tail, indices = fresh.double(), logp.double(), log_tail.double(), indices.long()
    num_classes = fresh.shape[1]
    k = logp.shape[1] if exact is None else exact
    td = 1.0 if exact is None else float(sample_temperature)
    fresh_logp = torch.log_softmax(fresh, 1)
    top = indices[:, :k]
    fresh_top = fresh_logp.gather(1, top)                      # the fresh teacher on the cache's classes...
    fresh_tail = (torch.logsumexp((fresh_logp / td).scatter(1, top, -torch.inf), 1) if k < num_classes
                  else torch.full_like(log_tail, -torch.inf))  # ...and on all the others (log S at Td)
    # replay error: KL(fresh || cached) over the k + 1 bins the cache holds exactly (no tail bin when k = C): the
    # top k and the tail, as p^(1/Td) normalised (Td = 1: the probabilities and the tail mass)
    bins = k + (k < num_classes)
    log_p = stored_log_bins(fresh_top / td, fresh_tail)[:, :bins]
    log_q = stored_log_bins(logp[:, :k] / td, log_tail)[:, :bins]
    log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True)   # (at Td != 1 the bins are normalised here)
    log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)   # uint16 rounding: the sum is 1 within 2.5e-4
    replay_kl = (log_p.exp() * (log_p - log_q)).sum(1)
    tail_error = (log_tail - fresh_tail).expm1().abs() if k < num_classes else torch.zeros_like(log_tail)
    # top-k loss: KL(full fresh distribution || documented rebuild), reported, never failed; a sampled cache's
    # top k with its tail mass (log S at Td = 1, else 1 - their sum) spread evenly, what top-k targets would give
    tail_mass = log_tail if td == 1.0 else torch.log1p(-logp[:, :k].exp().sum(1).clamp_max(1 - 1e-12))
    rebuilt = torch.log_softmax(dense_logits(logp[:, :k], top, tail_mass, num_classes).double(), 1)
    topk_kl = (fresh_logp.exp() * (fresh_logp - rebuilt)).sum(1)
    out = {"top1_agreement": float((fresh.argmax(1) == indices[:, 0]).double().mean()),
           "replay_kl_mean": float(replay_kl.mean()), "replay_kl_max": float(replay_kl.max()),
           "tail_mass_error_mean": float(tail_error.mean()), "tail_mass_error_max": float(tail_error.max()),
           "max_abs_logp_error": float((fresh_logp.gather(1, indices) - logp).abs().max()),
           "topk_kl_mean": float(topk_kl.mean()), "topk_kl_max": float(topk_kl.max())}
    if exact is not None and uniforms is not None:
        out.update(_draw_agreement(fresh, indices, k, td, uniforms, control_variate, values_dtype))
    return out


def _scan(cache: TeacherCache) -> dict:
    """The report of the checks without replay: units, markers, checksums, rows."""
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
            problems += _check_rows(slab, rows, spec.num_classes, exact_tail=cache.version >= 2, spec=spec)
        if not miss and not bad:
            complete.append(s)
    return {"cache": str(cache.path), "seeds": cache.seeds, "seeds_complete": sorted(complete),
            "complete": not missing, "missing_units": missing, "problems": problems}


def _judge_replay(r: dict, given: dict, problems: list) -> None:
    """Thresholds (given, else by precision) into r["thresholds"]; one named problem per failed check."""
    t = r["thresholds"] = {key: given[key] if given[key] is not None else default
                           for key, default in THRESHOLDS[r["precision"]].items()}
    # the top-k loss (topk_kl) is reported, never failed
    if not r["top1_agreement"] >= t["min_agreement"]:
        problems.append(f"replay: top-1 agreement {r['top1_agreement']:.4f} below {t['min_agreement']}")
    if not r["replay_kl_mean"] <= t["max_kl"]:
        problems.append(f"replay: mean KL(fresh || cached) over the k + 1 stored bins {r['replay_kl_mean']:.2e} "
                        f"above {t['max_kl']:g}")
    if not r["tail_mass_error_mean"] <= t["max_tail_error"]:
        problems.append(f"replay: mean relative tail-mass error {r['tail_mass_error_mean']:.2e} "
                        f"above {t['max_tail_error']:g}")
    if "draw_agreement" in r and r["precision"] == "fp32" and not r["draw_agreement"] >= DRAW_AGREEMENT:
        problems.append(f"replay: the fresh teacher's draws (same uniforms) agree with the stored ones in "
                        f"{r['draw_agreement']:.4f} of the views, below {DRAW_AGREEMENT} (fp32)")


def _verify_one(cache: TeacherCache, replay: int, replay_args: dict, given: dict,
                views: Optional[TeacherCache] = None) -> dict:
    report = _scan(cache)
    if replay:
        complete = report["seeds_complete"]
        if views is not None:   # an added teacher's views are its main cache's
            complete = sorted(set(complete) & set(views.complete_seeds()))
        if not complete:
            raise KdcacheError(f"{cache.path}: no complete seed to replay")
        r = report["replay"] = _replay(cache, complete, replay, views=views, **replay_args)
        r["renderer"] = renderer_comparison(views or cache)
        _judge_replay(r, given, report["problems"])
    report["ok"] = not report["problems"]
    return report


def _module_for(teacher: TeacherCache, given: Optional[str], any_recorded: bool) -> Optional[str]:
    """--teacher-module for one teacher of the cache: the teachers that record a module get it (a renamed path is
    allowed: the weights hash decides); one that records none gets it only when no teacher of the cache records
    one (a timm teacher beside a factory-made one is built by name)."""
    if not given or (not teacher.spec.teacher.get("module") and any_recorded):
        return None
    return given


def _verify_teachers(added: dict, views: TeacherCache, replay: int, replay_args: dict, given: dict,
                     module: Optional[str], report: dict) -> None:
    """Each teacher added over the cache's views: report["teachers"][label], its problems also the cache's.
    Each is replayed with its own recorded teacher (--teacher-checkpoint is the main teacher's)."""
    report["teachers"] = {}
    recorded = any(t.spec.teacher.get("module") for t in (views, *added.values()))
    for label, teacher in added.items():
        args = dict(replay_args, checkpoint=None, teacher_module=_module_for(teacher, module, recorded))
        try:
            sub = _verify_one(teacher, replay, args, given, views=views)
        except KdcacheError as exc:   # e.g. its teacher cannot be rebuilt here: named, the others still verified
            sub = _scan(teacher)
            sub["problems"].append(f"replay: {exc}")
            sub["ok"] = False
        report["teachers"][label] = sub
        report["problems"] += [f"teacher {label}: {p}" for p in sub["problems"]]


def verify(path, replay: int = 0, checkpoint: Optional[str] = None, data: Optional[Path] = None,
           device: str = "auto", seed: int = 0, min_agreement: Optional[float] = None,
           max_kl: Optional[float] = None, max_tail_error: Optional[float] = None,
           teacher_module: Optional[str] = None) -> dict:
    """Thresholds left None are taken from THRESHOLDS by the precision the dump and the replay ran at.
    teacher_module: the 'package.module:factory' to build the teacher with; the one the cache records is
    never imported unless given here (importing runs the module's code). The cache's added teachers are
    verified too (report["teachers"]), each replayed with its own recorded teacher."""
    cache = TeacherCache.open(path)
    if replay and cache.views_of:
        raise KdcacheError(f"{cache.path}: an added teacher's views are its main cache's: verify the main cache (the "
                           "folder that holds teachers/), which verifies and replays every teacher")
    try:
        added, error = (cache.added_teachers() if not cache.views_of else {}), None
    except KdcacheError as exc:   # a teacher folder that is not this cache's: named, the cache still verified
        added, error = {}, str(exc)
    recorded = any(t.spec.teacher.get("module") for t in (cache, *added.values()))
    replay_args = dict(checkpoint=checkpoint, data=data, device=device, seed=seed)
    given = {"min_agreement": min_agreement, "max_kl": max_kl, "max_tail_error": max_tail_error}
    report = _verify_one(cache, replay, dict(replay_args, teacher_module=_module_for(cache, teacher_module, recorded)),
                         given)
    if error:
        report["problems"].append(error)
    if added:
        _verify_teachers(added, cache, replay, replay_args, given, teacher_module, report)
    report["ok"] = not report["problems"]
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


def _replay_lines(p: dict) -> list:
    t = p["thresholds"]
    lines = [f"  replay {p['views']} views on {p['device']} (dump {', '.join(p['dump_precision'])}: "
             f"{p['precision']} thresholds)",
             f"    top-1 agreement {100 * p['top1_agreement']:.2f} % (>= {100 * t['min_agreement']:g} %)",
             f"    replay KL(fresh || cached), k + 1 bins: mean {p['replay_kl_mean']:.2e} (<= {t['max_kl']:g}), "
             f"max {p['replay_kl_max']:.2e}",
             f"    tail-mass relative error: mean {p['tail_mass_error_mean']:.2e} (<= {t['max_tail_error']:g}), "
             f"max {p['tail_mass_error_max']:.2e}; max |log-prob error| {p['max_abs_logp_error']:.2e}",
             f"    top-k loss KL(fresh || rebuild), reported only: mean {p['topk_kl_mean']:.2e}, "
             f"max {p['topk_kl_max']:.2e}"]
    if "draw_agreement" in p:
        bound = f" (>= {100 * DRAW_AGREEMENT:g} %)" if p["precision"] == "fp32" else " (reported only)"
        lines.append(f"    draws redrawn from the fresh teacher: {100 * p['draw_agreement']:.2f} % of views{bound}, "
                     f"{100 * p['draw_class_agreement']:.2f} % of draws agree")
    rend = p.get("renderer")
    if rend and (rend["libraries_differ"] or rend["cache_libraries"] is None):
        what = (", ".join(f"{k} {a} -> {b}" for k, a, b in ((k, *v) for k, v in rend["libraries_differ"].items()))
                or "not recorded (format 1)")
        lines.append(f"    renderer {rend['cache_version']}: the libraries that made this cache differ from the "
                     f"current ones ({what}); the replay above re-rendered every view with the current ones")
    return lines


def render_report(r: dict) -> str:
    lines = [f"cache {r['cache']}: {'OK' if r['ok'] else 'PROBLEMS'}",
             f"  seeds {r['seeds']}, complete {r['seeds_complete']}"]
    lines += [f"  problem: {p}" for p in r["problems"]]  # missing units and added teachers' problems included
    if "replay" in r:
        lines += _replay_lines(r["replay"])
    for label, t in r.get("teachers", {}).items():
        lines += [f"  teacher {label} ({t['cache']}): {'OK' if t['ok'] else 'PROBLEMS'}, seeds {t['seeds']}, "
                  f"complete {t['seeds_complete']}"]
        if "replay" in t:
            lines += ["  " + line for line in _replay_lines(t["replay"])]
    return "\n".join(lines)


def verify_cache(cfg) -> dict:
    """verify() with a kdcache.teacher.config.VerifyConfig: the report `kdcache verify` prints."""
    return verify(cfg.cache, replay=cfg.replay, checkpoint=cfg.teacher_checkpoint, data=cfg.data, device=cfg.device,
                  seed=cfg.replay_seed, min_agreement=cfg.min_agreement, max_kl=cfg.max_kl,
                  max_tail_error=cfg.max_tail_error, teacher_module=cfg.teacher_module)
