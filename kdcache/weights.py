"""Reading checkpoints and weights files: weights-only, and refused in one line that names the file.

Run directories and teacher weights may be shared, and a full unpickle of a file can run code, so torch
files are loaded with `weights_only=True`; a state dict for another architecture than the model is
described in one line (how many tensors differ, the first of each kind) instead of torch's pages.
"""

import pickle
import re

import numpy as np
import torch

from kdcache.errors import KdcacheError

# last.pt files written before kdcache stored its RNG states as plain values hold NumPy's state as an
# ndarray; NumPy arrays run no code when unpickled, so those still load (a run interrupted across the upgrade resumes)
_NUMPY_CORE = getattr(np, "_core", None) or np.core   # NumPy 2 renamed core to _core
_NUMPY_ARRAY_GLOBALS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _refusal(path, exc: Exception) -> KdcacheError:
    # torch names the first callable ("GLOBAL builtins.exec"); timm re-raises it as "Unsupported globals: ..."
    found = re.search(r"(?:GLOBAL|Unsupported globals:) ([\w.]+)", str(exc))
    what = found.group(1).rstrip(".") if found else "something other than tensors and plain values"
    return KdcacheError(f"{path}: refused: loading it would call {what} (checkpoints are read as tensors, "
                        "numbers, strings, lists and dicts only)")


def torch_load(path) -> object:
    """torch.load, weights-only: a file that would call anything when unpickled is refused, by name."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise KdcacheError(f"{path}: cannot read checkpoint: {str(exc).splitlines()[0]}") from None


def read_state_dict(path) -> dict:
    """The weights in a .safetensors file or a torch checkpoint, as timm picks them (EMA weights first,
    then 'state_dict' or 'model'; a 'module.' prefix removed)."""
    import timm
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except Exception as exc:  # safetensors, zip and pickle errors: a damaged or foreign file
        if "weights_only" in str(exc):
            raise _refusal(path, exc) from None
        first_line = (str(exc).splitlines() or [""])[0]
        raise KdcacheError(f"{path}: cannot read weights: {type(exc).__name__}: {first_line}") from None


def _shape(t) -> list:
    return list(t.shape)


def load_into(model: torch.nn.Module, state_dict: dict, source, arch: str) -> None:
    """model.load_state_dict(state_dict, strict=True), after checking in one pass that the names and shapes
    are the model's: a checkpoint of another architecture is one line naming the first difference of each kind."""
    own = model.state_dict()
    differ = [k for k in own if k in state_dict and _shape(state_dict[k]) != _shape(own[k])]
    missing = [k for k in own if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in own)   # a file's order is its writer's: sort
    if differ or missing or unexpected:
        parts = []
        if differ:
            k = differ[0]
            parts.append(f"{len(differ)} tensors differ in shape, first {k} "
                         f"(checkpoint {_shape(state_dict[k])} vs model {_shape(own[k])})")
        counts = [f"{len(names)} {what} (first {names[0]})"
                  for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
        if counts:
            parts.append(", ".join(counts))
        raise KdcacheError(f"checkpoint {source} is for another architecture than {arch}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
