"""Several teachers over one cache's views (train-student --teachers A,B --ensemble mean|weighted|random).

A cache's teachers share its views: the main cache holds the view parameters and its own teacher's targets,
each teacher added with `dump-teacher --add-teacher` holds only its targets (kdcache.cache.schema). Training
reads one slab per chosen teacher and seed and combines the batch's rows with
kdcache.cache.targets.MixedTargets:

    mean       the mean of the teachers' probabilities at the loss's temperature
    weighted   their weighted mean (--teacher-weights, normalised to sum 1)
    random     one teacher per sample (drawn per sample and pass) or per step (one per batch), from a
               generator keyed by (order seed, pass, sample or the batch's first sample): a resumed run
               draws the same teachers

This module: choosing the teachers and the seeds they share, checking the ensemble settings, and the
per-row lambda mix of --mix-labels for targets that are not a single top-k teacher's.
"""

import math
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from kdcache.cache.targets import LOG_ZERO, LogProbTargets, MixedTargets, SparseTargets
from kdcache.errors import KdcacheError

ENSEMBLES = ("mean", "weighted", "random")
DRAWS = ("sample", "step")


def ensemble_weights(count: int, ensemble: str = "mean", weights: Optional[Sequence[float]] = None,
                     draw: str = "sample") -> Optional[List[float]]:
    """The member weights of `count` teachers, summing to 1 (mean: equal; weighted: `weights` normalised), or
    None for --ensemble random. A contradictory combination is refused by its option names."""
    if ensemble not in ENSEMBLES:
        raise KdcacheError(f"--ensemble must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}")
    if draw not in DRAWS:
        raise KdcacheError(f"--ensemble-draw must be one of {', '.join(DRAWS)}, got {draw!r}")
    if draw != "sample" and ensemble != "random":
        raise KdcacheError(f"--ensemble-draw {draw} says how --ensemble random draws; this run has --ensemble {ensemble}")
    if weights is not None and ensemble != "weighted":
        raise KdcacheError(f"--teacher-weights are the weights of --ensemble weighted; this run has --ensemble {ensemble}")
    if ensemble == "random":
        return None
    if ensemble == "mean":
        return [1.0 / count] * count
    if weights is None:
        raise KdcacheError("--ensemble weighted needs --teacher-weights W,W (one weight per teacher of --teachers)")
    w = [float(x) for x in weights]
    if len(w) != count:
        raise KdcacheError(f"--teacher-weights gives {len(w)} weights for {count} teacher(s) (--teachers): one weight "
                           "per teacher, in the order of --teachers")
    if any(not 0 <= x < math.inf for x in w) or not sum(w) > 0:
        raise KdcacheError(f"--teacher-weights {w}: non-negative numbers, not all 0")
    return [x / sum(w) for x in w]


def choose_teachers(cache, labels: Optional[Sequence[str]]) -> Dict[str, object]:
    """label -> TeacherCache of the chosen teachers of `cache` (the main cache: it holds the views), in the
    order given; None: the cache's own teacher. An unknown label is refused with the cache's teachers listed."""
    if cache.views_of:
        raise KdcacheError(f"{cache.path}: an added teacher's cache (no views of its own); give the main cache "
                           f"(its parent's parent) and choose this teacher with --teachers {cache.label}")
    if labels is None:
        return {cache.label: cache}
    available = cache.teachers()
    unknown = [label for label in labels if label not in available]
    if unknown:
        raise KdcacheError(f"{cache.path}: no teacher labelled {unknown[0]!r} in this cache; its teachers: "
                           f"{', '.join(available)} (kdcache info {cache.path})")
    return {label: available[label] for label in labels}


def shared_seeds(cache, members: Dict[str, object], seeds: Optional[Sequence[int]]) -> List[int]:
    """The seeds to train on: `seeds` (each must be complete in the main cache and in every chosen teacher), or
    by default those complete in all of them (a teacher missing some of the others' seeds is warned about)."""
    views = cache.complete_seeds()
    complete = {label: (views if t is cache else t.complete_seeds()) for label, t in members.items()}
    if seeds is not None:
        missing = sorted(set(seeds) - set(views))
        if missing:
            raise KdcacheError(f"{cache.path}: seeds {missing} are not complete in this cache (complete: {views})")
        for label, done in complete.items():
            missing = sorted(set(seeds) - set(done))
            if missing:
                raise KdcacheError(f"{members[label].path}: teacher {label!r}: seed {missing[0]} is not complete "
                                   f"(seeds {missing} missing; complete: {done}); finish it with dump-teacher "
                                   "--add-teacher, or choose other --view-seeds")
        return sorted(seeds)
    common = sorted(set(views).intersection(*map(set, complete.values())))
    added = any(t is not cache for t in members.values())
    if not common and views and added:
        listed = "; ".join(f"{label}: {done}" for label, done in complete.items())
        raise KdcacheError(f"{cache.path}: no seed is complete in every chosen teacher ({listed}, views: {views})")
    dropped = sorted(set().union(views, *map(set, complete.values())) - set(common))
    if dropped and common and added:
        short = [label for label, done in complete.items() if set(done) != set(common)]
        warnings.warn(f"seeds {dropped} are left out: not complete in every chosen teacher ({', '.join(short)} "
                      f"lack some); training on {common}")
    return common


def combine(members: List[SparseTargets], weights: Optional[List[float]], choice: Optional[torch.Tensor]):
    """One teacher's targets as they are; several as MixedTargets (weights, or a choice per row)."""
    if len(members) == 1:
        return members[0]
    if weights is not None:
        return MixedTargets(members, weights=weights)
    return MixedTargets(members, choice=choice)


class LambdaMix(LogProbTargets):
    """--mix-labels for sampled targets or several teachers: row b's target is lam_b · own_b + (1 - lam_b) ·
    partner_b of the two views' targets, each at the loss's temperature (as MixedTargets mixes teachers, with a
    weight per row). A single top-k teacher keeps the mix of its rebuilt distributions at T = 1, softened at T
    (kdcache.student.soft_labels.CachedTeacher.logits: the targets of runs made before several teachers)."""

    def __init__(self, own, partner, lam: torch.Tensor):
        self.own, self.partner, self.lam = own, partner, lam
        self.num_classes = own.num_classes
        self.signed = own.signed or partner.signed

    def signed_probs(self, temperature: float) -> torch.Tensor:
        lam = self.lam.float()[:, None]
        return lam * self.own.probs(temperature) + (1.0 - lam) * self.partner.probs(temperature)

    def unsigned_log_probs(self, temperature: float) -> torch.Tensor:
        lam = self.lam.float()[:, None]
        a = self.own.log_probs(temperature) + lam.clamp_min(1e-12).log()
        b = self.partner.log_probs(temperature) + (1.0 - lam).clamp_min(1e-12).log()
        return torch.logaddexp(a, b).clamp_min(LOG_ZERO)

    def __len__(self) -> int:
        return len(self.lam)


def cat_targets(parts: list):
    """Concatenate the one-row targets of dataset items (kdcache.student.dataset.collate_views) into a batch's:
    SparseTargets with their rule, MixedTargets member by member (their weights, or their choices)."""
    first = parts[0]
    if isinstance(first, SparseTargets):
        return SparseTargets(torch.cat([p.indices for p in parts]), torch.cat([p.logp for p in parts]),
                             torch.cat([p.log_tail for p in parts]), first.num_classes, first.exact,
                             first.sample_temperature, first.control_variate)
    if isinstance(first, MixedTargets):
        members = [cat_targets([p.members[m] for p in parts]) for m in range(len(first.members))]
        if first.choice is not None:
            return MixedTargets(members, choice=torch.cat([p.choice for p in parts]))
        return MixedTargets(members, weights=first.weights)
    raise KdcacheError(f"cannot batch targets of type {type(first).__name__}")
