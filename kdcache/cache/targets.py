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
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from kdcache.cache.schema import SAMPLED_RULE, TOPK_RULE  # noqa: F401 (the rules' names, with their code here)
LOG_ZERO = -1.0e4   # a probability of 0 as a finite log (exp underflows to 0 in float32; no inf - inf = NaN)


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


@dataclass(frozen=True)
class SparseTargets:
    """The stored teacher answers of a batch of views, as a cache holds them (public: kdcache.SparseTargets).

    indices: (B, n) int64 class indices; logp: (B, n) float32 log-probabilities of those classes;
    log_tail: (B,) float32; num_classes: C. A top-k cache (exact None): n = k, the k most probable classes,
    and log_tail the log of the mass of the C - k others. A sampled cache: the first `exact` columns are
    the top classes, the others draws from the tail, log_tail the log of the tail's sum of p^(1/Td),
    Td = `sample_temperature` (module docstring). The same methods serve both.
    """
    indices: torch.Tensor
    logp: torch.Tensor
    log_tail: torch.Tensor
    num_classes: int
    exact: Optional[int] = None
    sample_temperature: float = 1.0

    @property
    def sampled(self) -> bool:
        return self.exact is not None

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """(B, C) log of the target softened at `temperature` (LOG_ZERO, finite, where a sampled target is 0)."""
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
        """(B, C) teacher probabilities softened at `temperature`."""
        if self.sampled:
            return self.log_probs(temperature).exp()
        return torch.softmax(self.dense_logits() / temperature, dim=1)

    def _like(self, indices, logp, log_tail) -> "SparseTargets":
        return SparseTargets(indices, logp, log_tail, self.num_classes, self.exact, self.sample_temperature)

    def to(self, device, non_blocking: bool = False) -> "SparseTargets":
        return self._like(self.indices.to(device, non_blocking=non_blocking),
                          self.logp.to(device, non_blocking=non_blocking),
                          self.log_tail.to(device, non_blocking=non_blocking))

    def __getitem__(self, rows) -> "SparseTargets":
        return self._like(self.indices[rows], self.logp[rows], self.log_tail[rows])

    def __len__(self) -> int:
        return len(self.log_tail)


def draw_tail(logits: torch.Tensor, top: torch.Tensor, draws: int, sample_temperature: float,
              uniforms: torch.Tensor):
    """Systematic sampling of `draws` classes per row from the tail (the classes not in `top`) with
    probability proportional to p^(1/Td): positions (d + u) / m, d = 0..m-1, one uniform u per row (from
    the counter-based RNG: reproducible, resumable), on the classes' cumulative distribution in class order.

    logits (B, C) the teacher's; top (B, k) its top classes; uniforms (B,) float64 in [0, 1).
    Returns (classes (B, m) int64, ascending; their log-probabilities (B, m) float64; log S (B,) float64, the
    log of the tail's sum of p^(1/Td)). Each class is drawn floor(m q_j) or ceil(m q_j) times, m q_j on average:
    unbiased, with a count variance of at most 1/4 (multinomial draws: m q_j (1 - q_j))."""
    full = logits.double()
    logp = full - torch.logsumexp(full, dim=1, keepdim=True)
    tempered = (logp / sample_temperature).scatter(1, top, -torch.inf)
    log_s = torch.logsumexp(tempered, dim=1)
    q = torch.nan_to_num(torch.exp(tempered - log_s[:, None]), nan=0.0)   # a tail of mass 0: weights 0 anyway
    cdf = torch.cumsum(q, dim=1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-300)     # the last position lands inside the last class
    positions = (torch.arange(draws, dtype=torch.float64, device=full.device)[None, :]
                 + uniforms.to(full.device, torch.float64)[:, None]) / draws
    classes = torch.searchsorted(cdf, positions, right=True).clamp_max(full.shape[1] - 1)
    # a class of probability 0 cannot be hit except by the clamp (all-zero tail): keep the row's draws valid
    return classes, torch.gather(logp, 1, classes), log_s


class LogProbTargets:
    """Targets defined by their log_probs(T) (mixtures of other targets): the rest of SparseTargets' methods."""

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
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

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
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
