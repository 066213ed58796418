"""Distillation and label losses. Teacher logits are dense (B, C): online from the teacher, or rebuilt
from a cache row with the documented top-k rule (kdcache.cache.targets.dense_logits).

    vanilla KD   KL(teacher || student) at temperature T, times T^2, batch mean (Hinton et al. 2015;
                 VanillaKD, Hao et al. 2023; the same expression as timm's LogitDistillationTask)
    DKD          decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD
    hard labels  CE with label smoothing, or BCE (timm's BinaryCrossEntropy, as in VanillaKD's recipe);
                 for a mixed view the target is timm's mixup_target (smoothing included), with timm's
                 SoftTargetCrossEntropy for CE and BinaryCrossEntropy's soft-target path for BCE
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from kdcache.errors import KdcacheError


def vanilla_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2


def dkd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
        alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD: target-class KD on (target, rest) binary distributions, plus non-target KD on the
    distribution over the other classes (the target's logit masked out)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    gt = F.one_hot(labels, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, -1), F.softmax(t, -1)
    bin_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1).clamp_min(1e-12)
    bin_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1).clamp_min(1e-12)
    tckd = F.kl_div(bin_s.log(), bin_t, reduction="batchmean") * temperature ** 2
    masked_s = F.log_softmax(s - 1000.0 * gt, -1)
    masked_t = F.log_softmax(t - 1000.0 * gt, -1)
    nckd = F.kl_div(masked_s, masked_t, reduction="batchmean", log_target=True) * temperature ** 2
    return alpha * tckd + beta * nckd


@dataclass
class LossConfig:
    kd_loss: str = "kd"            # kd | dkd | none (plain supervised)
    kd_weight: float = 1.0
    temperature: float = 1.0
    hard_loss: str = "none"        # none | ce | bce ; with kd_loss none it defaults to ce
    hard_weight: float = 1.0
    smoothing: float = 0.0         # label smoothing of the hard-label term
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0

    def validate(self) -> None:
        if self.kd_loss not in ("kd", "dkd", "none"):
            raise KdcacheError(f"--kd-loss must be kd, dkd or none, got {self.kd_loss!r}")
        if self.hard_loss not in ("none", "ce", "bce"):
            raise KdcacheError(f"--hard-loss must be none, ce or bce, got {self.hard_loss!r}")
        if self.kd_loss == "none" and self.hard_loss == "none":
            raise KdcacheError("no loss: --kd none needs a hard-label loss (--hard-loss ce or bce)")


class StudentLoss(torch.nn.Module):
    def __init__(self, cfg: LossConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.hard_loss == "ce":
            self.hard = LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss()
            self.soft_hard = SoftTargetCrossEntropy()
        elif cfg.hard_loss == "bce":
            self.hard = BinaryCrossEntropy(smoothing=cfg.smoothing)
            self.soft_hard = self.hard   # a target of the logits' shape is used as it is (smoothing is in it)
        else:
            self.hard = self.soft_hard = None

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None,
                hard_target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """hard_target: (B, C) soft label target of mixed views (smoothing included), else labels are used."""
        cfg = self.cfg
        parts = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        if cfg.kd_loss != "none":
            if cfg.kd_loss == "kd":
                parts["kd_loss"] = vanilla_kd(student_logits, teacher_logits, cfg.temperature)
            else:
                parts["kd_loss"] = dkd(student_logits, teacher_logits, labels, cfg.dkd_alpha, cfg.dkd_beta, cfg.temperature)
            total = total + cfg.kd_weight * parts["kd_loss"]
        if self.hard is not None:
            if hard_target is not None:
                parts["hard_loss"] = self.soft_hard(student_logits.float(), hard_target)
            else:
                parts["hard_loss"] = self.hard(student_logits.float(), labels)
            total = total + cfg.hard_weight * parts["hard_loss"]
        parts["loss"] = total
        return parts
