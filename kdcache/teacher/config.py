"""DumpConfig: everything `kdcache dump-teacher` runs on."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.schema import MAX_SEED
from kdcache.errors import KdcacheError
from kdcache.models import ModelSpec


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
