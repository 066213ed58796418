"""Stop training when the loss stops being a number, naming where and why it likely happened."""

from typing import List

import torch

from kdcache.errors import KdcacheError


class LossWatch:
    """Keeps, on the device, the first update whose loss was NaN or infinite: no device->host sync per step.
    `check` reads it where the loop syncs already (each log interval and every epoch's last step, before
    that step is logged or the epoch checkpointed), so a diverged run never reaches metrics or last.pt."""

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_value = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        first = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_value = torch.where(first, loss, self.first_value)

    def check(self, steps_per_epoch: int, epochs: int, causes: List[str]) -> None:
        step = int(self.first_step)
        if step < 0:
            return
        epoch = (step - 1) // steps_per_epoch + 1
        likely = ", ".join(causes[:-1]) + (", or " if len(causes) > 1 else "") + causes[-1]
        raise KdcacheError(f"loss is {float(self.first_value)} at epoch {epoch}/{epochs}, step {step}: {likely}")


def likely_causes(mode: str, cache, lr: float, amp: str) -> List[str]:
    causes = [f"a damaged or incomplete cache (kdcache verify {cache})"] if mode == "cache" else []
    causes.append(f"a learning rate too high (--lr {lr:g})")
    if amp == "fp16":
        causes.append("fp16 overflow (--amp bf16)")
    return causes
