"""Distillation and label losses (public: kdcache.kd_loss, kdcache.dkd_loss, kdcache.hard_label_target).

A batch's teacher targets are either a cache's stored answers (kdcache.cache.targets.SparseTargets, rebuilt
to dense (B, C) log-probabilities with the cache's rule; sampled-cv ones to signed probabilities) or dense
(B, C) logits (an online teacher).

    vanilla KD   KL(teacher || student) at temperature T, times T^2, batch mean (Hinton et al. 2015;
                 VanillaKD, Hao et al. 2023; the same expression as timm's LogitDistillationTask)
    DKD          decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD
    hard labels  CE with label smoothing, or BCE (timm's BinaryCrossEntropy, as in VanillaKD's recipe);
                 for a mixed view the target is timm's mixup_target (smoothing included), with timm's
                 SoftTargetCrossEntropy for CE and BinaryCrossEntropy's soft-target path for BCE
"""

from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from kdcache.cache.targets import SparseTargets
from kdcache.errors import KdcacheError

Targets = Union[SparseTargets, torch.Tensor]


def as_teacher_logits(targets: Targets, temperature: float = 1.0) -> torch.Tensor:
    """(B, C) teacher logits z of a batch, softmax(z / T) the target at T: dense logits as they are, or
    the stored targets' logits_at(T) (top-k: their dense rebuild at every T; sampled and mixed targets
    depend on T, docs/training.md)."""
    return targets if isinstance(targets, torch.Tensor) else targets.logits_at(temperature)


def vanilla_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2


def signed_kd(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Vanilla KD for a target that may be negative on some classes (sampled-cv): T^2 (sum_{t > 0} t log t -
    sum t log s_T), batch mean. Linear in the target, so an unbiased target gives an unbiased loss and
    gradient T (sum(t) s_T - t); for a target that is a distribution it is the KL of vanilla_kd."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = target_probs.float()
    pos = t.clamp_min(0.0)
    constant = (pos * pos.clamp_min(1e-30).log()).sum(-1)        # does not depend on the student
    return (constant - (t * log_s).sum(-1)).mean() * temperature ** 2


def kd_loss(student_logits: torch.Tensor, targets: Targets, temperature: float = 1.0) -> torch.Tensor:
    """Vanilla KD: KL(teacher || student) of the distributions softened at `temperature`, times T^2, batch mean.

    Parameters
    ----------
    student_logits : torch.Tensor
        (B, C) the student's logits (computed in float32).
    targets : SparseTargets or torch.Tensor
        The batch's teacher answers: a cache's SparseTargets (``Batch.targets``) or (B, C) teacher logits.
    temperature : float
        T > 0; both distributions are softmax(z / T).

    Returns
    -------
    torch.Tensor
        A scalar: the loss `kdcache train-student --kd-loss kd` optimises. Signed targets (a sampled-cv
        cache's) go through signed_kd: the same loss, taken linearly in the target.
    """
    if getattr(targets, "signed", False):
        return signed_kd(student_logits, targets.probs(temperature), temperature)
    return vanilla_kd(student_logits, as_teacher_logits(targets, temperature), temperature)


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


def dkd_loss(student_logits: torch.Tensor, targets: Targets, labels: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD at `temperature`, each times T^2.

    Parameters
    ----------
    student_logits : torch.Tensor
        (B, C) the student's logits.
    targets : SparseTargets or torch.Tensor
        The batch's teacher answers (as for `kd_loss`).
    labels : torch.Tensor
        (B,) int64 ground-truth classes (the "target class" of TCKD).
    alpha, beta : float
        Weights of the target-class and non-target-class terms.
    temperature : float
        T > 0.
    """
    if getattr(targets, "signed", False):
        raise KdcacheError("--kd-loss dkd needs targets that are distributions; this cache's sampled-cv targets are "
                           "signed (DKD renormalises them, which would bias it): use --kd-loss kd, or a cache "
                           "with --targets topk or sampled")
    return dkd(student_logits, as_teacher_logits(targets, temperature), labels, alpha, beta, temperature)


def mixed_one_hot(labels: torch.Tensor, partner_labels: torch.Tensor, num_classes: int, smoothing: float,
                  lam: torch.Tensor) -> torch.Tensor:
    """timm's mixup_target per sample: lam * y(labels) + (1 - lam) * y(partner_labels), y smoothed one-hot."""
    from timm.data.mixup import one_hot
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = one_hot(labels, num_classes, on, off)
    y2 = one_hot(partner_labels, num_classes, on, off)
    lam = lam[:, None]
    return y1 * lam + y2 * (1.0 - lam)


def hard_label_target(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0,
                      partner: Optional[torch.Tensor] = None, lam: Optional[torch.Tensor] = None, *,
                      partner_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (B, C) hard-label target of a batch: smoothed one-hot labels, lambda-mixed with the partner's
    for mixed views (timm's mixup_target, each sample with its own partner and lambda).

    Parameters
    ----------
    labels : torch.Tensor
        (B,) int64 classes of the batch's samples.
    num_classes : int
        C.
    smoothing : float
        Label smoothing: the true class gets 1 - smoothing + smoothing / C, the others smoothing / C.
    partner : torch.Tensor, optional
        (B,) int64 row *in this batch* of each sample's mixing partner (``Batch.partner``; itself when unmixed).
    lam : torch.Tensor, optional
        (B,) float32 each sample's own weight (``Batch.lam``; 1 when unmixed). Give it with `partner` or
        `partner_labels`, or give none of the three.
    partner_labels : torch.Tensor, optional
        (B,) int64 the partners' classes, instead of `partner` (a batch whose partners are global indices,
        such as kdcache.student.dataset's ReplayBatch.partner_labels).

    Returns
    -------
    torch.Tensor
        (B, C) float32, each row summing to 1: the target of timm's SoftTargetCrossEntropy (or of
        BinaryCrossEntropy), what `kdcache train-student` uses for mixed views.
    """
    if partner is not None and partner_labels is not None:
        raise KdcacheError("hard_label_target: give partner (rows of the batch) or partner_labels, not both")
    if (partner is None and partner_labels is None) != (lam is None):
        raise KdcacheError("hard_label_target: give lam with partner or partner_labels (a mixed batch), or none")
    if lam is None:
        lam = torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)
        partner_labels = labels
    elif partner_labels is None:
        partner_labels = labels[partner]
    return mixed_one_hot(labels, partner_labels, num_classes, smoothing, lam)


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
    """The loss `kdcache train-student` optimises: kd_weight * (kd_loss or dkd_loss) + hard_weight * the
    hard-label loss, with each part returned for logging."""

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
                teacher_logits: Optional[Targets] = None,
                hard_target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """teacher_logits: the batch's teacher targets (SparseTargets or dense logits); hard_target: (B, C) soft
        label target of mixed views (hard_label_target, smoothing included), else labels are used."""
        cfg = self.cfg
        parts = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        if cfg.kd_loss != "none":
            if cfg.kd_loss == "kd":
                parts["kd_loss"] = kd_loss(student_logits, teacher_logits, cfg.temperature)
            else:
                parts["kd_loss"] = dkd_loss(student_logits, teacher_logits, labels, cfg.dkd_alpha, cfg.dkd_beta,
                                            cfg.temperature)
            total = total + cfg.kd_weight * parts["kd_loss"]
        if self.hard is not None:
            if hard_target is not None:
                parts["hard_loss"] = self.soft_hard(student_logits.float(), hard_target)
            else:
                parts["hard_loss"] = self.hard(student_logits.float(), labels)
            total = total + cfg.hard_weight * parts["hard_loss"]
        parts["loss"] = total
        return parts
