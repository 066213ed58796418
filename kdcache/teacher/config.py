"""The teacher side's config objects: DumpConfig (`kdcache dump-teacher`), VerifyConfig (`kdcache verify`) and
CopyConfig (`kdcache copy`), each made from its command's options (kdcache.options) by from_options.

from_options is also where options meet files: the view recipe's default size is the dataset's (read here),
never while the options are converted.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from kdcache import options
from kdcache.augment.recipe import ViewRecipe, recipe_from_given
from kdcache.cache.schema import MAX_SEED
from kdcache.errors import KdcacheError
from kdcache.models import ModelSpec


DEFAULT_SAMPLES = 8   # --targets sampled: with the default k = 10, 18 columns


@dataclass
class DumpConfig:
    data: Path
    out: Optional[str]                      # the cache: a path or a URL (s3://...); or None with cache_root
    seeds: List[int]
    topk: int
    teacher: ModelSpec
    recipe: Optional[ViewRecipe] = None     # None: the dataset's view size with default settings
    global_seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    amp: str = "auto"                       # bf16 | fp16 | off | auto (bf16 on CUDA, off on CPU)
    compile: bool = False
    workers: Optional[int] = None           # render threads (default: usable cores)
    values_dtype: str = "uint16"            # top-k log-probabilities: uint16 fixed point or float32
    unit_size: Optional[int] = None         # None: the existing cache's, or DEFAULT_UNIT_SIZE for a new one
    claim_ttl: float = 300.0                # seconds without a heartbeat after which a claim is stale
    progress: bool = True
    split: str = "train"
    cache_root: Optional[str] = None        # find or create the cache of this identity under a cache root
    seeds_per_pass: int = 32                # seeds rendered per decode of a block (and claimed together)
    targets: str = "topk"                   # topk | sampled (kdcache.cache.schema.CacheSpec)
    samples: int = 0                        # sampled: draws from the tail per view (0 given: DEFAULT_SAMPLES)
    sample_temperature: float = 1.0         # sampled: the temperature the target is unbiased at
    add_teacher: bool = False               # score the views of the existing cache with this teacher
    teacher_label: Optional[str] = None     # add_teacher: its label (default: the teacher's name)

    @classmethod
    def from_options(cls, ns: argparse.Namespace) -> "DumpConfig":
        """The DumpConfig of `kdcache dump-teacher` options (parsed, or a recipe table's: kdcache.options).
        A random teacher's weights come from the views' global seed unless --teacher-init-seed is given; the
        recipe's size, unless given, is the dataset's view size (the one file read here)."""
        options.check_needed("dump-teacher", ns)
        values = options.config_values("dump-teacher", ns)
        teacher = values.pop("teacher")
        if teacher["seed"] is None:
            teacher["seed"] = values["global_seed"]
        values["teacher"] = ModelSpec(**teacher)
        if values["targets"] != "topk" and not values["samples"]:
            values["samples"] = DEFAULT_SAMPLES
        given = values.pop("recipe")
        values["recipe"] = recipe_from_given(given, given.get("size") or view_size(ns.data))
        return options.make_config(cls, values)

    def validate(self) -> None:
        """Settings checked before anything is opened or created."""
        if not self.seeds:
            raise KdcacheError("--seeds: no seeds to dump")
        bad = [s for s in self.seeds if not 0 <= s <= MAX_SEED]
        if bad:
            raise KdcacheError(f"--seeds: seeds are integers from 0 to {MAX_SEED}, got {bad[0]}")
        if self.batch_size < 1:
            raise KdcacheError(f"--batch-size must be positive, got {self.batch_size}")
        if self.seeds_per_pass < 1:
            raise KdcacheError(f"--seeds-per-pass must be positive, got {self.seeds_per_pass}")
        if self.claim_ttl <= 0:
            raise KdcacheError(f"--claim-ttl must be positive, got {self.claim_ttl}")


def view_size(data) -> int:
    """The prepared dataset's view size (the recipe's default size)."""
    from kdcache.data.dataset import PreparedDataset
    return PreparedDataset.open(data).view_size


@dataclass
class VerifyConfig:
    """What `kdcache verify` checks: the cache, and with replay > 0 that many views rendered and scored again."""
    cache: str                                  # a directory or s3:// URL
    replay: int = 0                             # views re-rendered and re-run through the teacher
    teacher_checkpoint: Optional[str] = None    # default: the recorded checkpoint
    teacher_module: Optional[str] = None        # the only module verify imports (a cache's own is never imported)
    data: Optional[Path] = None                 # default: the recorded dataset path
    device: str = "auto"
    replay_seed: int = 0                        # which views are drawn for the replay
    min_agreement: Optional[float] = None       # None: kdcache.teacher.verify.THRESHOLDS by precision
    max_kl: Optional[float] = None
    max_tail_error: Optional[float] = None

    @classmethod
    def from_options(cls, ns: argparse.Namespace) -> "VerifyConfig":
        return options.make_config(cls, options.config_values("verify", ns))


@dataclass
class CopyConfig:
    """What `kdcache copy` copies: finished units of `seeds` (None: all) from src to dst (root: dst is a cache
    root, and the copy goes to dst/<cache id>)."""
    src: str
    dst: str
    root: bool = False
    seeds: Optional[List[int]] = None
    workers: int = 8
    progress: bool = True

    @classmethod
    def from_options(cls, ns: argparse.Namespace) -> "CopyConfig":
        return options.make_config(cls, options.config_values("copy", ns))


@dataclass
class DeriveConfig:
    """What `kdcache derive` writes: a smaller cache dst from src (kdcache.cache.derive): top-`topk` (None: the
    source's), the seeds `seeds` (None: the complete ones), the teachers `teachers` by label (None: all)."""
    src: str
    dst: str
    topk: Optional[int] = None
    seeds: Optional[List[int]] = None
    teachers: Optional[List[str]] = None
    workers: int = 4
    progress: bool = True

    @classmethod
    def from_options(cls, ns: argparse.Namespace) -> "DeriveConfig":
        return options.make_config(cls, options.config_values("derive", ns))
