"""TrainConfig: everything `kdcache train-student` runs on (what config.json records and --resume reads)."""

from dataclasses import dataclass, field
from typing import List, Optional

from kdcache.cache.schema import MAX_SEED
from kdcache.errors import KdcacheError
from kdcache.student.resolution import DEFAULT_STEP, SizeSchedule

DEFAULT_LR = {"sgd": 0.1, "momentum": 0.1, "nesterov": 0.1, "adamw": 1e-3, "lamb": 5e-3}  # at batch size 256


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str
    epochs: int
    mode: str                                  # cache | online | none
    cache: Optional[str] = None
    teacher: Optional[dict] = None             # ModelSpec fields, for --kd online
    batch_size: int = 256
    opt: str = "sgd"
    lr: Optional[float] = None                 # default: DEFAULT_LR[opt] * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 5e-5
    sched: str = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    ema_decay: float = 0.0                     # 0: no EMA
    drop_path: Optional[float] = None
    amp: str = "auto"                          # bf16 | fp16 | off | auto (bf16 on CUDA, off on CPU)
    channels_last: bool = True
    compile: bool = False
    workers: Optional[int] = None
    device: str = "auto"
    seed: int = 0                              # the student's initialisation and sample order
    view_global_seed: Optional[int] = None     # views: cache mode takes the cache's; none/online default 0 (the dump's default)
    view_seeds: Optional[List[int]] = None     # augmentation seeds cycled over passes (none/online default: one per pass)
    seed_choice: str = "cycle"                 # cache: cycle | per-sample
    recipe: Optional[dict] = None              # none/online: ViewRecipe fields (default: dataset view size);
                                               # cache + mix_labels: the mixing settings to add
    mix_labels: bool = False                   # cache: mix the views in the loader and the cached targets by lambda
    loss: dict = field(default_factory=dict)   # LossConfig fields
    size: Optional[List[int]] = None           # [START, END] training size per epoch (FFCV's ramp; START == END:
                                               # fixed); None: the views' size (the recipe's)
    ramp_start: Optional[int] = None           # default: FFCV's fractions of the epochs (kdcache.student.resolution)
    ramp_end: Optional[int] = None
    size_step: int = DEFAULT_STEP
    val_res: Optional[int] = None              # eval size; default: the last training size
    eval_every: int = 1
    crop_pct: float = 0.875
    log_interval: int = 50
    progress: bool = True

    def validate(self) -> None:
        if self.mode not in ("cache", "online", "none"):
            raise KdcacheError(f"mode must be cache, online or none, got {self.mode!r}")
        if self.mode == "cache" and not self.cache:
            raise KdcacheError("--cache CACHE is required for cached KD")
        if self.mode == "online" and not (self.teacher and (self.teacher.get("checkpoint") or self.teacher.get("module")
                                                            or self.teacher.get("random_init"))):
            raise KdcacheError("--kd online needs the teacher's weights: --teacher NAME --teacher-checkpoint FILE "
                               "(or --teacher-module, or --random-teacher)")
        if self.epochs < 1:
            raise KdcacheError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise KdcacheError(f"--batch-size must be positive, got {self.batch_size}")
        if self.view_seeds is not None:
            bad = [s for s in self.view_seeds if not 0 <= s <= MAX_SEED]
            if bad or not self.view_seeds:
                raise KdcacheError(f"--view-seeds: seeds are integers from 0 to {MAX_SEED}, got "
                                   + (str(bad[0]) if bad else "none"))
        if self.mix_labels and self.mode != "cache":
            raise KdcacheError("--mix-labels mixes cached soft labels: it needs --cache (online/none mix through the recipe)")
        if self.size is not None or self.ramp_start is not None or self.ramp_end is not None:
            self.schedule(self.size[0] if self.size else 1)   # a bad schedule is named before anything is written
        if self.val_res is not None and self.val_res < 1:
            raise KdcacheError(f"--val-res must be positive, got {self.val_res}")

    def schedule(self, view_size: int) -> SizeSchedule:
        """The training size of every epoch (default: the views' size throughout)."""
        return SizeSchedule.build(self.size or [view_size, view_size], self.epochs, self.ramp_start, self.ramp_end,
                                  self.size_step)
