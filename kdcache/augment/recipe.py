"""The augmentation recipe of a view: settings named as in timm's train.py, recorded whole in every artefact."""

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Optional, Tuple

from kdcache.errors import KdcacheError

RECIPE_VERSION = 1


@dataclass(frozen=True)
class ViewRecipe:
    """How view (i, s) is drawn and rendered.

    size: side of the square output view, in pixels (both stages render at this size).
    scale, ratio, hflip: timm's --scale, --ratio, --hflip (torchvision RandomResizedCrop + flip).
    The remaining fields are timm's stronger augmentations. They are part of the recipe's identity so
    that a cache records them, but views do not carry them yet: a non-default value is refused rather
    than silently ignored.
    """

    size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    aa: Optional[str] = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    aug_repeats: int = 0

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        self.validate()

    def validate(self) -> None:
        if not (isinstance(self.size, int) and self.size > 0):
            raise KdcacheError(f"recipe: size must be a positive integer, got {self.size!r}")
        lo, hi = self.scale
        if not (0.0 < lo <= hi <= 1.0):
            raise KdcacheError(f"recipe: --scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        lo, hi = self.ratio
        if not (0.0 < lo <= hi):
            raise KdcacheError(f"recipe: --ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not (0.0 <= self.hflip <= 1.0):
            raise KdcacheError(f"recipe: --hflip must be a probability, got {self.hflip}")
        unsupported = {
            "aa": self.aa not in (None, "", "none"),
            "mixup": self.mixup != 0.0,
            "cutmix": self.cutmix != 0.0,
            "aug_repeats": self.aug_repeats not in (0, 1),
        }
        named = [k for k, bad in unsupported.items() if bad]
        if named:
            raise KdcacheError(
                f"recipe: {', '.join('--' + n.replace('_', '-') for n in named)} not supported by views yet "
                "(only RandomResizedCrop and horizontal flip are replayed); leave them at their defaults"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        d["version"] = RECIPE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViewRecipe":
        d = dict(d)
        version = d.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise KdcacheError(f"recipe: version {version} is not understood (this kdcache reads {RECIPE_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise KdcacheError(f"recipe: unknown settings {extra}")
        return cls(**d)

    def digest(self) -> str:
        """Short stable hash of the recipe, for names and compatibility checks."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """timm train.py names for the view recipe; --size defaults to the dataset's view size."""
    g = parser.add_argument_group("view recipe (timm names)")
    g.add_argument("--size", type=int, default=None, help="view size in pixels (default: the dataset's view size)")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (default 0.08 1.0)")
    g.add_argument("--ratio", type=float, nargs=2, default=(3.0 / 4.0, 4.0 / 3.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop aspect-ratio range (default 3/4 4/3)")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default 0.5)")


def recipe_from_args(args: argparse.Namespace, default_size: int) -> ViewRecipe:
    return ViewRecipe(size=args.size or default_size, scale=tuple(args.scale), ratio=tuple(args.ratio),
                      hflip=args.hflip)
