"""Evaluation on the val beton: resize + centre crop, top-1 and top-5."""

import torch

from kdcache.models import Normalize, forward_u8


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, normalize: Normalize, device: torch.device, amp_dtype=None) -> dict:
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for images, labels, _ in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = forward_u8(model, normalize, images, amp_dtype)
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, 1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(1).sum().item()
        total += labels.numel()
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total, "samples": total}
