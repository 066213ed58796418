"""Teacher distributions rebuilt from a cache row (docs/cache-format.md, "Targets").

Top-k caches, rule "uniform-tail-v2": the k stored classes keep their log-probabilities; each of the C - k
other classes gets the same one,

    z_tail = log_tail - log(C - k)

so at temperature 1 the stored classes have their teacher probabilities and the tail mass is spread
evenly over the other classes (FKD's "marginal smoothing", ml-dr's "smooth"). A tempered target is
softmax(z / T) of these log-probabilities. With k = C the rebuild is exact at any T.

Sampled caches, rule "importance-tail-v1" (Anshumann et al. 2025, "Sparse Logit Sampling"): the k most
probable classes exactly, then m draws from the other classes R with probability q_j = p_j^(1/Td) / S,
S = sum_{j in R} p_j^(1/Td) (Td: the sampling temperature, stored as the cache's sample_temperature; the
row's log_tail is log S). At temperature T the slots get the log-weights

    top class c:  logp_c / T              draw d of class j:  log S - log m + (1/T - 1/Td) logp_j

and the target is their softmax, each class the sum of its slots. At T = Td the normaliser is exact
(sum_top p^(1/Td) + S) and the expected weight of every tail class is its tempered probability: the target
is unbiased class by class. At other T the draws are importance-weighted and the normaliser estimated:
consistent, with a bias of order 1/m.

Sampled caches, rule "median-control-variate-v1" (--targets sampled-cv): the same top k, then m draws from
the tail with probability q_j = |r_j - beta| / A, where r_j = p_j^(1/Td) of the stored (rounded) logp_j,
beta the median of r over the tail R and A = sum_{j in R} |r_j - beta|; log_tail holds (log S, log beta,
log A). At temperature T every tail class starts from the baseline b = beta^(Td/T) and each draw of class j
adds the control-variate correction

    (p_j^(1/T) - b) A / (m |r_j - beta|)        (at T = Td: sign(r_j - beta) A / m)

so a tail class's expected weight is its p_j^(1/T) (any baseline that does not depend on the draws keeps
that; the median minimises A and so the variance). At T = Td the normaliser is exact (sum_top p^(1/Td) + S)
and the target unbiased class by class; at other T it is estimated (consistent). The target can be negative
on a drawn class below the baseline: it has probabilities (probs), not logs (`signed` is True), and the
losses take it linearly (kdcache.student.losses). When the tail is flat, A -> 0 and the target becomes exact.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from kdcache.cache.schema import CV_RULE, LOGP_MAX, LOGP_SCALE, SAMPLED_RULE, TOPK_RULE  # noqa: F401 (rules' names)
from kdcache.errors import KdcacheError
LOG_ZERO = -1.0e4   # a probability of 0 as a finite log (exp underflows to 0 in float32; no inf - inf = NaN)
SIGNED_HAS_NO_LOG = ("sampled-cv targets are signed (a drawn class below the baseline gets a negative weight): "
                     "they have probs(T), not log_probs or logits; kd_loss takes them (dkd_loss does not)")


def dense_logits(logp: torch.Tensor, indices: torch.Tensor, log_tail: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, k) log-probabilities, (B, k) class indices, (B,) log tail mass -> (B, C) float32 log-probabilities
    (usable as logits: softmax is shift-invariant)."""
    logp = logp.float()
    k = logp.shape[1]
    if k == num_classes:
        out = torch.empty(logp.shape[0], num_classes, dtype=torch.float32, device=logp.device)
        return out.scatter_(1, indices.long(), logp)
    z_tail = log_tail.float() - math.log(num_classes - k)
    out = z_tail[:, None].expand(-1, num_classes).contiguous()
    return out.scatter_(1, indices.long(), logp)


def stored_log_bins(logp: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
    """(B, k + 1) log-probabilities of what the cache holds exactly: the k stored classes, then the tail mass
    (-inf when k = C)."""
    return torch.cat([logp, log_tail[:, None]], 1)


def sampled_log_probs(logp: torch.Tensor, indices: torch.Tensor, log_tail: torch.Tensor, num_classes: int,
                      exact: int, sample_temperature: float, temperature: float) -> torch.Tensor:
    """(B, C) float32 log of the "importance-tail-v1" target at `temperature` (LOG_ZERO where it is 0):
    (B, k + m) stored log-probabilities (k exact, then m draws), their classes, (B,) log S."""
    lp = logp.float()
    draws = lp.shape[1] - exact
    slots = torch.empty_like(lp)
    slots[:, :exact] = lp[:, :exact] / temperature
    if draws:
        slots[:, exact:] = (log_tail.float()[:, None] - math.log(draws)
                            + (1.0 / temperature - 1.0 / sample_temperature) * lp[:, exact:])
    slot_p = torch.softmax(slots, dim=1)
    idx = indices.long()
    probs = torch.zeros(lp.shape[0], num_classes, dtype=torch.float32, device=lp.device).scatter_add_(1, idx, slot_p)
    # the log of the stored classes only: a dense log of mostly zeros is the slow part at 21k classes
    return torch.full_like(probs, LOG_ZERO).scatter_(1, idx, probs.gather(1, idx).log().clamp_min(LOG_ZERO))


def control_variate_probs(logp: torch.Tensor, indices: torch.Tensor, tail_stats: torch.Tensor, num_classes: int,
                          exact: int, sample_temperature: float, temperature: float) -> torch.Tensor:
    """(B, C) float32 "median-control-variate-v1" target at `temperature` (module docstring), negative where a
    drawn class's correction outweighs the baseline: (B, k + m) stored log-probabilities (k exact, then m
    draws), their classes, (B, 3) (log S, log beta, log A)."""
    lp = logp.double()
    stats = tail_stats.double()
    log_s, log_beta, log_a = stats[:, 0:1], stats[:, 1:2], stats[:, 2:3]
    draws = lp.shape[1] - exact
    td, t = float(sample_temperature), float(temperature)
    # every term relative to the row's largest (its top class at T): no overflow, no underflow of the sums
    top = lp[:, :exact] / t
    shift = top.max(1, keepdim=True).values
    top_w = torch.exp(top - shift)
    log_b = log_beta * (td / t) - shift                      # baseline b = beta^(Td/T), shifted
    b = torch.exp(log_b)
    d = lp[:, exact:]
    if t == td:
        sign = torch.sign(d / td - log_beta)                 # r_j against beta, in logs: robust to the rounding
        corr = sign * torch.exp(log_a - shift) / draws
        tail_total = torch.exp(log_s - shift)                # exact
    else:
        r = torch.exp(d / td - log_beta)                     # r_j / beta
        num = torch.exp(d / t - shift) - b
        corr = num * torch.exp(log_a - log_beta) / (draws * (r - 1.0).abs().clamp_min(1e-300))
        tail_total = ((num_classes - exact) * b + corr.sum(1, keepdim=True)).clamp_min(0.0)
    # a tail of zero spread (A = 0, log A = -inf) was never drawn from: its corrections are 0
    corr = torch.where(torch.isfinite(log_a), corr, torch.zeros_like(corr))
    z = top_w.sum(1, keepdim=True) + tail_total
    out = (b / z).expand(-1, num_classes).contiguous()
    idx = indices.long()
    out.scatter_(1, idx[:, :exact], top_w / z)
    out.scatter_add_(1, idx[:, exact:], corr / z)
    return out.float()


def round_like_stored(logp: torch.Tensor, values_dtype: str) -> torch.Tensor:
    """float64 log-probabilities as a cache stores and decodes them (kdcache.cache.schema.encode_logp and
    decode_logp): uint16 steps of 1/LOGP_SCALE nat clamped at LOGP_MAX, or float32."""
    if values_dtype == "uint16":
        return -torch.clamp(torch.round(-logp * LOGP_SCALE), 0, LOGP_MAX) / LOGP_SCALE
    return logp.to(getattr(torch, values_dtype)).double()


@dataclass(frozen=True)
class SparseTargets:
    """The stored teacher answers of a batch of views, as a cache holds them (public: kdcache.SparseTargets).

    indices: (B, n) int64 class indices; logp: (B, n) float32 log-probabilities of those classes;
    log_tail: (B,) float32; num_classes: C. A top-k cache (exact None): n = k, the k most probable classes,
    and log_tail the log of the mass of the C - k others. A sampled cache: the first `exact` columns are
    the top classes, the others draws from the tail, log_tail the log of the tail's sum of p^(1/Td),
    Td = `sample_temperature` (module docstring); with `control_variate` (a sampled-cv cache) log_tail is
    (B, 3): log S, log beta, log A, and the target is signed (probs; log_probs refuses). The same methods
    serve all three.
    """
    indices: torch.Tensor
    logp: torch.Tensor
    log_tail: torch.Tensor
    num_classes: int
    exact: Optional[int] = None
    sample_temperature: float = 1.0
    control_variate: bool = False

    @property
    def sampled(self) -> bool:
        return self.exact is not None

    @property
    def signed(self) -> bool:
        """True when the target may be negative on some classes (sampled-cv): it has no log."""
        return self.control_variate

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """(B, C) log of the target softened at `temperature` (LOG_ZERO, finite, where a sampled target is 0)."""
        if self.signed:
            raise KdcacheError(SIGNED_HAS_NO_LOG)
        if self.sampled:
            return sampled_log_probs(self.logp, self.indices, self.log_tail, self.num_classes, self.exact,
                                     self.sample_temperature, temperature)
        return torch.log_softmax(self.dense_logits() / temperature, dim=1)

    def logits_at(self, temperature: float) -> torch.Tensor:
        """(B, C) logits z with softmax(z / T) the target at T = `temperature` (what the losses take).
        Top-k: dense_logits() at every T; sampled: T times the target's log."""
        if self.sampled:
            return self.log_probs(temperature) * temperature
        return self.dense_logits()

    def dense_logits(self) -> torch.Tensor:
        """(B, C) log-probabilities of the target at T = 1 (top-k: the "uniform-tail-v2" rebuild)."""
        if self.sampled:
            return self.log_probs(1.0)
        return dense_logits(self.logp, self.indices, self.log_tail, self.num_classes)

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """(B, C) teacher probabilities softened at `temperature` (sampled-cv: signed)."""
        if self.signed:
            return control_variate_probs(self.logp, self.indices, self.log_tail, self.num_classes, self.exact,
                                         self.sample_temperature, temperature)
        if self.sampled:
            return self.log_probs(temperature).exp()
        return torch.softmax(self.dense_logits() / temperature, dim=1)

    def _like(self, indices, logp, log_tail) -> "SparseTargets":
        return SparseTargets(indices, logp, log_tail, self.num_classes, self.exact, self.sample_temperature,
                             self.control_variate)

    def to(self, device, non_blocking: bool = False) -> "SparseTargets":
        return self._like(self.indices.to(device, non_blocking=non_blocking),
                          self.logp.to(device, non_blocking=non_blocking),
                          self.log_tail.to(device, non_blocking=non_blocking))

    def __getitem__(self, rows) -> "SparseTargets":
        return self._like(self.indices[rows], self.logp[rows], self.log_tail[rows])

    def __len__(self) -> int:
        return len(self.log_tail)


def draw_tail(logits: torch.Tensor, top: torch.Tensor, draws: int, sample_temperature: float,
              uniforms: torch.Tensor, control_variate: bool = False, values_dtype: str = "uint16"):
    """Systematic sampling of `draws` classes per row from the tail (the classes not in `top`): positions
    (d + u) / m, d = 0..m-1, one uniform u per row (from the counter-based RNG: reproducible, resumable), on
    the classes' cumulative distribution in class order.

    logits (B, C) the teacher's; top (B, k) its top classes; uniforms (B,) float64 in [0, 1).
    Importance sampling ("importance-tail-v1"): q_j ~ p^(1/Td). Returns (classes (B, m) int64, ascending;
    their log-probabilities (B, m) float64; log S (B,) float64, the log of the tail's sum of p^(1/Td)).
    With `control_variate` ("median-control-variate-v1"): every quantity from the logp as the cache stores them
    (`values_dtype`: rounded, so a reader sees the very values the draws were made from), q_j ~ |r_j - beta|,
    r_j = p_j^(1/Td), beta their median over the tail (its float32 value: the one stored); the third result
    is (B, 3): log S, log beta, log A (module docstring).
    Each class is drawn floor(m q_j) or ceil(m q_j) times, m q_j on average: unbiased, with a count variance
    of at most 1/4 (multinomial draws: m q_j (1 - q_j))."""
    full = logits.double()
    logp, q, stats = tail_proposal(full, top, sample_temperature, control_variate, values_dtype)
    cdf = torch.cumsum(q, dim=1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-300)     # the last position lands inside the last class
    positions = (torch.arange(draws, dtype=torch.float64, device=full.device)[None, :]
                 + uniforms.to(full.device, torch.float64)[:, None]) / draws
    classes = torch.searchsorted(cdf, positions, right=True).clamp_max(full.shape[1] - 1)
    # a class of probability 0 cannot be hit except by the clamp (all-zero tail): keep the row's draws valid
    return classes, torch.gather(logp, 1, classes), stats


def tail_proposal(logits: torch.Tensor, top: torch.Tensor, sample_temperature: float, control_variate: bool = False,
                  values_dtype: str = "uint16"):
    """What draw_tail samples from: (logp (B, C) float64, rounded as stored for the control variate; q (B, C) the
    proposal over the tail, 0 on the top classes, summing to 1; log S (B,), or (B, 3) log S, log beta, log A)."""
    full = logits.double()
    logp = full - torch.logsumexp(full, dim=1, keepdim=True)
    if control_variate:
        logp = round_like_stored(logp, values_dtype)
    tempered = (logp / sample_temperature).scatter(1, top, -torch.inf)
    log_s = torch.logsumexp(tempered, dim=1)
    q = torch.nan_to_num(torch.exp(tempered - log_s[:, None]), nan=0.0)   # a tail of mass 0: weights 0 anyway
    if not control_variate:
        return logp, q, log_s
    tail = torch.ones_like(q, dtype=torch.bool).scatter_(1, top, False)
    median = torch.where(tail, q, torch.nan).nanmedian(dim=1).values      # beta / S
    log_beta = (median.log() + log_s).float().double()                    # as stored (float32)
    beta = torch.exp(log_beta - log_s)[:, None]
    spread = torch.where(tail, (q - beta).abs(), torch.zeros_like(q))
    a = spread.sum(1)
    # a flat tail (A = 0) is exact without draws: draw anything of the tail, its corrections are 0
    q = torch.where((a > 0)[:, None], spread / a.clamp_min(1e-300)[:, None], tail.double() / tail.sum(1, keepdim=True))
    return logp, q, torch.stack([log_s, log_beta, a.log() + log_s], 1)


class LogProbTargets:
    """Targets defined by their log_probs(T) (mixtures of other targets; subclasses give unsigned_log_probs): the
    rest of SparseTargets' methods. A mixture with a signed member (sampled-cv) is signed: it mixes probabilities
    (`signed_probs`) instead, and log_probs refuses it."""

    signed = False

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        if self.signed:
            raise KdcacheError(SIGNED_HAS_NO_LOG)
        return self.unsigned_log_probs(temperature)

    def unsigned_log_probs(self, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def signed_probs(self, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        if self.signed:
            return self.signed_probs(temperature)
        return self.log_probs(temperature).exp()

    def logits_at(self, temperature: float) -> torch.Tensor:
        return self.log_probs(temperature) * temperature

    def dense_logits(self) -> torch.Tensor:
        return self.log_probs(1.0)


class MixedTargets(LogProbTargets):
    """Several teachers' targets of one batch, combined (train-student --teachers A,B --ensemble ...).

    members: each teacher's targets (SparseTargets, or anything with log_probs(T)); either `weights` (one per
    member, summing to 1: the weighted mean of the members' probabilities at each T) or `choice` ((B,) int64:
    row b takes member choice[b]'s target). Same methods as SparseTargets, so the losses take either."""

    def __init__(self, members: Sequence, weights: Optional[Sequence[float]] = None,
                 choice: Optional[torch.Tensor] = None):
        if (weights is None) == (choice is None):
            raise ValueError("MixedTargets needs weights or choice, not both")
        self.members, self.choice = list(members), choice
        self.weights = None if weights is None else [float(w) for w in weights]
        self.num_classes = self.members[0].num_classes
        self.signed = any(getattr(m, "signed", False) for m in self.members)

    def signed_probs(self, temperature: float) -> torch.Tensor:
        probs = torch.stack([m.probs(temperature) for m in self.members])         # (n, B, C)
        if self.choice is not None:
            return probs[self.choice.to(probs.device), torch.arange(probs.shape[1], device=probs.device)]
        return sum(w * p for w, p in zip(self.weights, probs))

    def unsigned_log_probs(self, temperature: float) -> torch.Tensor:
        logs = torch.stack([m.log_probs(temperature) for m in self.members])     # (n, B, C)
        if self.choice is not None:
            rows = torch.arange(logs.shape[1], device=logs.device)
            return logs[self.choice.to(logs.device), rows]
        w = torch.tensor(self.weights, dtype=logs.dtype, device=logs.device).log()[:, None, None]
        return torch.logsumexp(logs + w, dim=0).clamp_min(LOG_ZERO)

    def __len__(self) -> int:
        return len(self.members[0])


def teacher_choice(num_rows: int, teachers: int, key: Sequence[int], per_step: bool) -> torch.Tensor:
    """(B,) which teacher each row takes for --ensemble random: drawn per sample, or one for the whole batch
    (per step), from a generator keyed by `key` (order seed, pass, batch): the same on a resumed run."""
    rng = np.random.default_rng([int(k) for k in key] + [0x7EAC])
    if per_step:
        return torch.full((num_rows,), int(rng.integers(teachers)), dtype=torch.int64)
    return torch.from_numpy(rng.integers(0, teachers, num_rows).astype(np.int64))
