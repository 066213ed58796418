"""Teacher distributions rebuilt from a cache row: top-k log-probabilities, their classes, the tail mass.

Rule "uniform-tail-v2" (docs/cache-format.md): the k stored classes keep their log-probabilities; each
of the C - k other classes gets the same one,

    z_tail = log_tail - log(C - k)

so at temperature 1 the stored classes have their teacher probabilities and the tail mass is spread
evenly over the other classes (FKD's "marginal smoothing", ml-dr's "smooth"). A tempered target is
softmax(z / T) of these log-probabilities. With k = C the rebuild is exact at any T.
"""

import math
from dataclasses import dataclass

import torch


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


@dataclass(frozen=True)
class SparseTargets:
    """The stored teacher answers of a batch of views, as a cache holds them (public: kdcache.SparseTargets).

    indices: (B, k) int64 class indices; logp: (B, k) float32 log-probabilities of those classes;
    log_tail: (B,) float32 log of the probability mass of the C - k other classes; num_classes: C.
    """
    indices: torch.Tensor
    logp: torch.Tensor
    log_tail: torch.Tensor
    num_classes: int

    def dense_logits(self) -> torch.Tensor:
        """(B, C) log-probabilities by the "uniform-tail-v2" rule (usable as teacher logits at T = 1)."""
        return dense_logits(self.logp, self.indices, self.log_tail, self.num_classes)

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """(B, C) teacher probabilities softened at `temperature`: softmax(dense_logits / T)."""
        return torch.softmax(self.dense_logits() / temperature, dim=1)

    def to(self, device, non_blocking: bool = False) -> "SparseTargets":
        return SparseTargets(self.indices.to(device, non_blocking=non_blocking),
                             self.logp.to(device, non_blocking=non_blocking),
                             self.log_tail.to(device, non_blocking=non_blocking), self.num_classes)

    def __getitem__(self, rows) -> "SparseTargets":
        return SparseTargets(self.indices[rows], self.logp[rows], self.log_tail[rows], self.num_classes)

    def __len__(self) -> int:
        return len(self.log_tail)
