"""torchrun integration: rank and world size from the environment, one process group, barriers."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.errors import KdcacheError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str) -> DistContext:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = DistContext(rank=int(os.environ.get("RANK", "0")), world_size=world,
                      local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return ctx


def resolve_device(device: str, ctx: DistContext) -> torch.device:
    """'auto' -> cuda if available; 'cuda' under torchrun -> this process's local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and ctx.enabled:
        device = f"cuda:{ctx.local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def resolve_amp(amp: str, device: torch.device):
    """--amp setting -> (autocast dtype or None, resolved name); auto is bf16 on CUDA, off on CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp not in ("bf16", "fp16", "off"):
        raise KdcacheError(f"--amp must be bf16, fp16 or off, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise KdcacheError("--amp fp16 needs a CUDA device (use bf16 or off on CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp], amp
