"""Models for both stages: timm by name, weights from a local file, a user factory, or a deterministic
random init; the input normalisation that goes with them; a content hash of the weights."""

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from kdcache.errors import KdcacheError
from kdcache.weights import load_into, read_state_dict

# safetensors metadata keys kdcache writes next to trained weights (model.safetensors)
META_MODEL, META_CLASSES, META_MEAN, META_STD = "kdcache.model", "kdcache.num_classes", "kdcache.mean", "kdcache.std"


@dataclass
class ModelSpec:
    """What to build: an architecture (timm name or factory) and its weights (a checkpoint, the factory's
    own, or an explicitly requested random init)."""

    name: Optional[str] = None            # timm model name
    checkpoint: Optional[str] = None      # local .safetensors or torch checkpoint
    module: Optional[str] = None          # "pkg.module:factory", called as factory(num_classes=C)
    random_init: bool = False             # random weights from torch.manual_seed(seed)
    seed: int = 0
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes, in name order): same weights, same hash."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _safetensors_metadata(path: str) -> dict:
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as exc:
        raise KdcacheError(f"{path}: cannot read weights: {exc}") from None


def _from_factory(module: str, num_classes: int) -> torch.nn.Module:
    mod_name, _, fn_name = module.partition(":")
    if not fn_name:
        raise KdcacheError(f"--teacher-module {module!r}: expected 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise KdcacheError(f"--teacher-module {module!r}: {exc}") from exc
    return factory(num_classes=num_classes)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # when a model's pretrained_cfg has none


def create_timm_model(name: str, num_classes: int, what: str = "model", **kwargs) -> torch.nn.Module:
    """A timm model with random weights (no hub: weights only ever come from a local file)."""
    import timm
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model"
        raise KdcacheError(f"--{what} {name!r}: {exc}") from exc


def build_model(spec: ModelSpec, num_classes: int, what: str = "model") -> Tuple[torch.nn.Module, dict]:
    """(model in eval mode on CPU, info) where info records name, sha256, class count, mean, std, source."""
    if spec.checkpoint and spec.random_init:
        raise KdcacheError(f"{what}: a checkpoint and random weights at once")
    if not (spec.checkpoint or spec.module or spec.random_init):
        raise KdcacheError(f"{what}: give a weights file (--{what}-checkpoint), a factory (--{what}-module) "
                           f"or ask for random weights (--random-{what}) explicitly")
    meta = {}
    if spec.checkpoint:
        if not Path(spec.checkpoint).is_file():
            raise KdcacheError(f"{spec.checkpoint}: {what} checkpoint not found")
        meta = _safetensors_metadata(spec.checkpoint)
        if meta.get(META_CLASSES) and int(meta[META_CLASSES]) != num_classes:
            raise KdcacheError(f"{spec.checkpoint}: weights are for {meta[META_CLASSES]} classes, the dataset has {num_classes}")
    name = spec.name or meta.get(META_MODEL)
    torch.manual_seed(spec.seed)  # random init (and any init the checkpoint then overwrites) is deterministic
    if spec.module:
        model = _from_factory(spec.module, num_classes)
        name = name or spec.module
    else:
        if not name:
            raise KdcacheError(f"{what}: no model name given (--{what} NAME)")
        model = create_timm_model(name, num_classes, what)
    if spec.checkpoint:
        load_into(model, read_state_dict(spec.checkpoint), spec.checkpoint, name)
    model.eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = spec.mean or (json.loads(meta[META_MEAN]) if META_MEAN in meta else None) or cfg.get("mean") or IMAGENET_MEAN
    std = spec.std or (json.loads(meta[META_STD]) if META_STD in meta else None) or cfg.get("std") or IMAGENET_STD
    info = {"name": name, "sha256": weights_sha256(model), "num_classes": num_classes,
            "mean": [float(x) for x in mean], "std": [float(x) for x in std],
            "checkpoint": str(Path(spec.checkpoint).resolve()) if spec.checkpoint else None,
            "module": spec.module, "random_init": bool(spec.random_init), "init_seed": spec.seed,
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, info


def spec_from_info(info: dict, checkpoint: Optional[str] = None, module: Optional[str] = None) -> ModelSpec:
    """Rebuild the spec of a recorded teacher (for verify), optionally from another copy of the weights.
    The recorded module is never used: importing a module runs its code, so only the user names one."""
    return ModelSpec(name=info["name"] if not module else None, checkpoint=checkpoint or info.get("checkpoint"),
                     module=module, random_init=info.get("random_init", False) and not checkpoint,
                     seed=info.get("init_seed", 0), mean=info["mean"], std=info["std"])


class Normalize(torch.nn.Module):
    """uint8 NCHW -> float, scaled to [0, 1] and normalised; the same code for teacher and student."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        return (images_u8.float() - self.mean) / self.std


def forward_u8(model: torch.nn.Module, normalize: Normalize, images_u8: torch.Tensor, amp_dtype=None) -> torch.Tensor:
    """uint8 NCHW views -> float32 logits (normalise, channels_last, autocast): one path for the teacher in
    the dump, in verify and in online KD, and for evaluation, so every stage scores a view the same way."""
    x = normalize(images_u8).contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(x).float()
