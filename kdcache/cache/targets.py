"""Teacher distributions rebuilt from a cache row: top-k logits, their classes, and the log-sum-exp.

Rule "uniform-logit-tail-v1" (docs/cache-format.md): the k stored classes keep their logits; each of the
C - k other classes gets the same logit

    z_tail = lse + log(r / (C - k)),   r = max(1 - sum_j exp(v_j - lse), 1e-12)

so at temperature 1 the stored classes have exactly their teacher probabilities and the remaining
mass r is spread evenly over the other classes (FKD's "marginal smoothing", ml-dr's "smooth"). A
tempered target is softmax(z / T) of these logits. With k = C the rebuild is exact at any T.
"""

import torch

TAIL_FLOOR = 1e-12


def dense_logits(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, k) logits, (B, k) class indices, (B,) log-sum-exp -> (B, C) float32 logits."""
    values = values.float()
    lse = lse.float()
    k = values.shape[1]
    if k == num_classes:
        out = torch.empty(values.shape[0], num_classes, dtype=torch.float32, device=values.device)
        return out.scatter_(1, indices.long(), values)
    stored = torch.exp(values - lse[:, None]).sum(1)
    tail = torch.clamp(1.0 - stored, min=TAIL_FLOOR)
    z_tail = lse + torch.log(tail / (num_classes - k))
    out = z_tail[:, None].expand(-1, num_classes).contiguous()
    return out.scatter_(1, indices.long(), values)


def stored_bins(values: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(B, k + 1) probabilities: the k stored classes, then the remaining mass (what the cache holds exactly)."""
    p = torch.exp(values.float() - lse.float()[:, None])
    rest = torch.clamp(1.0 - p.sum(1, keepdim=True), min=0.0)
    return torch.cat([p, rest], 1)
