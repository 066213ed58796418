"""Run directory files: last.pt (exact resume), best.pt, model.safetensors (timm-loadable weights)."""

import os
import random
from pathlib import Path

import numpy as np
import torch

from kdcache.models import META_CLASSES, META_MEAN, META_MODEL, META_STD


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(path: Path, **state) -> None:
    _atomic_torch_save(dict(state, rng=rng_state()), path)


def load_last(path: Path) -> dict:
    # our own file, with numpy RNG state inside: not a weights-only payload
    return torch.load(path, map_location="cpu", weights_only=False)


def save_best(path: Path, model_state: dict, ema_state, epoch: int, top1: float) -> None:
    _atomic_torch_save({"state_dict": model_state, "state_dict_ema": ema_state, "epoch": epoch, "top1": top1}, path)


def export_safetensors(path: Path, state_dict: dict, model_name: str, num_classes: int, mean, std) -> None:
    """Weights timm's load_checkpoint and `--teacher-checkpoint` read; the metadata carries what
    dump-teacher needs to use them as a teacher (model name, class count, input normalisation)."""
    import json
    import safetensors.torch
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {META_MODEL: model_name, META_CLASSES: str(num_classes), META_MEAN: json.dumps(list(mean)),
            META_STD: json.dumps(list(std))}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
