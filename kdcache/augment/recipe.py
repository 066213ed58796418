"""The augmentation recipe of a view: settings named as in timm's train.py, recorded whole in every artefact.

The defaults live here and only here, and so do the declarations of the recipe's flags (recipe_options):
the flags default to None ("not given") and take the dataclass defaults, so a flag that contradicts a
cache's recipe can be told apart from one left alone.
"""

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from kdcache.errors import KdcacheError
from kdcache.option import Option

# Pixels are part of a cache's meaning: a change of any op's output is a new renderer version
# (tests/test_golden_views.py keeps a table per version). kdcache.augment.render implements them:
# 1: FFCV imdecode + resize_crop (OpenCV INTER_AREA) + flip; RandAugment, erasing and pair mixing (docs/views.md).
# 2: as 1, with the crop + area resample + flip of kdcache.augment.area_resize for crops that shrink (2.2x faster
#    crop + resize per 224 px view, BENCHMARKS.md).
# New recipes get RENDERER_VERSION; every version in RENDERER_VERSIONS is kept, so old caches replay as made.
RENDERER_VERSION = 2
RENDERER_VERSIONS = (1, 2)

# 1: RandomResizedCrop + flip only (fields size..hflip; older fields refused unless default).
# 2: RandAugment, random erasing, pair mixing, repeated augmentation, the mixing block and the renderer version.
RECIPE_VERSION = 2
ERASE_MODES = ("const", "rand", "pixel")


@dataclass(frozen=True)
class ViewRecipe:
    """How view (i, s) is drawn and rendered.

    size: side of the square output view, in pixels (both stages render at this size).
    scale, ratio, hflip: timm's --scale, --ratio, --hflip (torchvision RandomResizedCrop + flip).
    aa: timm's --aa RandAugment string, rand-m{M}-n{N}-mstd{S}[-inc1] (docs/views.md).
    reprob, remode, recount: timm's random erasing, applied after RandAugment, in uint8 (docs/views.md).
    mixup, cutmix, mixup_prob, mixup_switch_prob: timm's Mixup in "pair" mode: for seed s, samples are
        paired inside blocks of `mix_block` consecutive indices, and each pair shares one draw.
    aug_repeats: timm's --aug-repeats R: epoch e shows R passes over 1/R of the data, pass r with seed e*R + r.
    renderer: the pixel-producing code's version (kdcache.augment.render.RENDERER_VERSION when made).
    """

    size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mix_block: int = 256
    aug_repeats: int = 0
    renderer: int = RENDERER_VERSION

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        if self.aa in ("", "none"):
            object.__setattr__(self, "aa", None)
        self.validate()

    def validate(self) -> None:
        from kdcache.augment.randaugment import parse_rand_augment
        if not (isinstance(self.size, int) and self.size > 0):
            raise KdcacheError(f"recipe: size must be a positive integer, got {self.size!r}")
        lo, hi = self.scale
        if not (0.0 < lo <= hi <= 1.0):
            raise KdcacheError(f"recipe: --scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        lo, hi = self.ratio
        if not (0.0 < lo <= hi):
            raise KdcacheError(f"recipe: --ratio must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob"):
            if not (0.0 <= getattr(self, name) <= 1.0):
                raise KdcacheError(f"recipe: --{name.replace('_', '-')} must be a probability, got {getattr(self, name)}")
        if self.remode not in ERASE_MODES:
            raise KdcacheError(f"recipe: --remode must be one of {', '.join(ERASE_MODES)}, got {self.remode!r}")
        if not (isinstance(self.recount, int) and 1 <= self.recount <= 8):
            raise KdcacheError(f"recipe: --recount must be an integer in 1..8, got {self.recount!r}")
        if self.mixup < 0 or self.cutmix < 0:
            raise KdcacheError(f"recipe: --mixup and --cutmix are Beta(alpha, alpha) parameters >= 0, "
                               f"got {self.mixup} and {self.cutmix}")
        if not (isinstance(self.mix_block, int) and self.mix_block >= 2 and self.mix_block % 2 == 0):
            raise KdcacheError(f"recipe: --mix-block must be an even integer >= 2, got {self.mix_block!r}")
        if not (isinstance(self.aug_repeats, int) and self.aug_repeats >= 0):
            raise KdcacheError(f"recipe: --aug-repeats must be a non-negative integer, got {self.aug_repeats!r}")
        if self.renderer not in RENDERER_VERSIONS:
            raise KdcacheError(f"recipe: renderer version {self.renderer} is not known to this kdcache "
                               f"(it renders versions {sorted(RENDERER_VERSIONS)}); upgrade kdcache to read this cache")
        parse_rand_augment(self.aa)  # refuses a malformed string by name

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    @property
    def repeats(self) -> int:
        return max(1, self.aug_repeats)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        d["version"] = RECIPE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViewRecipe":
        d = dict(d)
        version = d.pop("version", RECIPE_VERSION)
        if version not in (1, RECIPE_VERSION):
            raise KdcacheError(f"recipe: version {version} is not understood (this kdcache reads 1 and {RECIPE_VERSION})")
        if version == 1:  # format-1 recipes predate the field; their pixels are renderer 1's
            d.setdefault("renderer", 1)
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise KdcacheError(f"recipe: unknown settings {extra}")
        return cls(**d)

    def digest(self) -> str:
        """Short stable hash of the recipe, for names and compatibility checks."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def summary(self) -> str:
        """One line for logs and listings: what a view of this recipe holds."""
        parts = [f"{self.size}px RRC{self.scale[0]:g}-{self.scale[1]:g}", f"flip {self.hflip:g}"]
        if self.aa:
            parts.append(self.aa)
        if self.reprob:
            parts.append(f"erase {self.reprob:g}/{self.remode}/{self.recount}")
        if self.mixing:
            parts.append(f"mixup {self.mixup:g} cutmix {self.cutmix:g} p {self.mixup_prob:g}")
        if self.repeats > 1:
            parts.append(f"repeats {self.repeats}")
        return ", ".join(parts)


DEFAULTS = ViewRecipe.__dataclass_fields__
_FLAG_HELP = {
    "size": "view size in pixels",
    "scale": "RandomResizedCrop area range",
    "ratio": "RandomResizedCrop aspect-ratio range",
    "hflip": "horizontal flip probability",
    "aa": "RandAugment, timm's grammar: rand-m{M}-n{N}-mstd{S}[-inc1], e.g. rand-m7-mstd0.5",
    "reprob": "random erasing probability",
    "remode": "random erasing fill: const | rand | pixel",
    "recount": "random erasing: up to this many boxes",
    "mixup": "mixup Beta(alpha, alpha); 0 = off",
    "cutmix": "cutmix Beta(alpha, alpha); 0 = off",
    "mixup_prob": "probability that a pair is mixed",
    "mixup_switch_prob": "probability of cutmix rather than mixup when both are on",
    "mix_block": "pairs are drawn inside blocks of this many consecutive samples",
    "aug_repeats": "repeated augmentation: R passes over 1/R of the data per epoch, R different views",
    "renderer": "renderer version that makes the pixels: 2 = area resample (new caches), "
                "1 = OpenCV INTER_AREA (caches made before it; docs/views.md)",
}
RECIPE_FLAGS = tuple(_FLAG_HELP)
RECIPE_GROUP = "view recipe (timm names)"
# train-student's --size is the size the student trains at (a fixed size or a ramp, kdcache.student.resolution);
# the views' own size (where their pixel boxes are drawn, what a cache's teacher scored) is --view-size there.
TRAIN_RENAMED = {"size": "view_size"}


def flag_dest(name: str, renamed: Optional[dict] = None) -> str:
    """The argparse dest of recipe field `name` in a command whose recipe flags are renamed by `renamed`."""
    return (renamed or {}).get(name, name)


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(f"{x:g}" for x in value)
    return "none" if value is None else str(value)


def recipe_options(renamed: Optional[dict] = None) -> Dict[str, Option]:
    """The view-recipe flags, timm train.py's names, by dest (renamed: field -> dest of another name). Every
    flag defaults to None, "not given", so that a flag contradicting a cache's recipe can be told apart from
    one left alone; the value then used is the ViewRecipe default, which --help shows."""
    out = {}
    for name in RECIPE_FLAGS:
        default = DEFAULTS[name].default
        kw = dict(type=type(default))
        if name in ("scale", "ratio"):
            kw = dict(type=float, nargs=2, metavar=("MIN", "MAX"))
        elif name in ("aa", "remode"):
            kw = dict(type=str)
        dest = flag_dest(name, renamed)
        out[dest] = Option("--" + dest.replace("_", "-"), help=_FLAG_HELP[name], group=RECIPE_GROUP,
                           field=f"recipe.{name}",
                           default_text="the dataset's view size" if name == "size" else _shown(default), **kw)
    return out


def given_recipe_flags(args: argparse.Namespace, renamed: Optional[dict] = None) -> dict:
    """The recipe flags the user set (not None), by field name."""
    return {n: getattr(args, flag_dest(n, renamed)) for n in RECIPE_FLAGS
            if getattr(args, flag_dest(n, renamed), None) is not None}


def recipe_from_args(args: argparse.Namespace, default_size: int, base: Optional[ViewRecipe] = None,
                     renamed: Optional[dict] = None) -> ViewRecipe:
    """The recipe of the given flags on top of `base` (default: the ViewRecipe defaults at the dataset's size)."""
    return recipe_from_given(given_recipe_flags(args, renamed), default_size, base)


def recipe_from_given(given: dict, default_size: int, base: Optional[ViewRecipe] = None) -> ViewRecipe:
    """The recipe of the given settings (field -> value; None: not given) on top of `base` (default: the
    ViewRecipe defaults at default_size)."""
    base = base or ViewRecipe(size=default_size)
    given = {k: tuple(v) if k in ("scale", "ratio") else v for k, v in given.items() if v is not None}
    return dataclasses.replace(base, **given)


def check_flags_match(args: argparse.Namespace, recipe: ViewRecipe, where: str,
                      allowed: Tuple[str, ...] = (), renamed: Optional[dict] = None) -> None:
    """Cached KD takes the recipe from the cache: a flag that contradicts it is refused, by name."""
    for name, value in given_recipe_flags(args, renamed).items():
        if name in allowed:
            continue
        have = getattr(recipe, name)
        if isinstance(have, tuple):
            value = tuple(float(x) for x in value)
            same = all(abs(a - b) < 1e-9 for a, b in zip(have, value))
        elif name == "aa":
            same = (value in ("", "none") and have is None) or value == have
        else:
            same = value == have
        if not same:
            raise KdcacheError(f"--{flag_dest(name, renamed).replace('_', '-')} {value} contradicts the cache's recipe "
                               f"({name} = {have}) at {where}; the views come from the cache")
