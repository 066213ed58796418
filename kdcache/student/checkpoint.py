"""Run directory files: last.pt (exact resume), best.pt, model.safetensors (timm-loadable weights).

Checkpoints hold only tensors, numbers, strings, lists, tuples and dicts, and are loaded with
`weights_only=True`: a run directory may be shared, and a full unpickle of a file in it can run code.
"""

import random
from pathlib import Path

import numpy as np
import torch

from kdcache.files import atomic_file
from kdcache.models import META_CLASSES, META_MEAN, META_MODEL, META_STD
from kdcache.weights import torch_load


def plain(obj):
    """obj with NumPy scalars and arrays and Paths turned into what a weights-only load accepts; any other
    type is a programming error, refused here rather than when a resume needs the file."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.Size, torch.dtype)):
        return obj
    raise TypeError(f"a checkpoint holds only tensors and plain values, not {type(obj).__name__}")


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(plain(obj), tmp)


def rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)   # a dict; its MT19937 key as a list, not an ndarray
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = dict(numpy_state, state=dict(numpy_state["state"],
                                                   key=np.asarray(numpy_state["state"]["key"], np.uint32)))
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(path: Path, **state) -> None:
    _atomic_torch_save(dict(state, rng=rng_state()), path)


def load_last(path: Path) -> dict:
    return torch_load(path)   # weights-only: the run directory may be shared


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
    with atomic_file(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
