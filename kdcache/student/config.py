"""TrainConfig: everything `kdcache train-student` runs on (what config.json records and --resume reads),
made from the command's options (kdcache.options) by TrainConfig.from_options.

from_options is also where options meet files: a cache found under --cache-root, recipe flags checked against
the cache's recipe, the dataset's view size; never while the options are converted.
"""

import argparse
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from kdcache import options
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
    teachers: Optional[List[str]] = None       # cache: the teachers by label (None: the cache's own)
    ensemble: str = "mean"                     # several teachers: mean | weighted | random
    teacher_weights: Optional[List[float]] = None   # ensemble weighted: one per teacher
    ensemble_draw: str = "sample"              # ensemble random: a teacher per sample | per step
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

    @classmethod
    def from_options(cls, ns: argparse.Namespace) -> "TrainConfig":
        """The TrainConfig of `kdcache train-student` options (parsed, or a recipe table's). Cached KD: the
        recipe flags must agree with the cache's; a random online teacher's weights come from --seed unless
        --teacher-init-seed is given."""
        from kdcache.models import ModelSpec
        options.check_needed("train-student", ns)
        cache = resolve_cache(ns)
        if cache and ns.kd:
            raise KdcacheError("--cache and --kd are exclusive (cached KD uses the cache's teacher)")
        mode = "cache" if cache else ns.kd
        if mode is None:
            raise KdcacheError("choose a mode: --cache CACHE, --kd online (with --teacher), or --kd none")
        values = options.config_values("train-student", ns)
        teacher = values.pop("teacher")
        if teacher["seed"] is None:
            teacher["seed"] = values["seed"]
        # TrainConfig.validate checks that an online teacher has weights
        values["teacher"] = asdict(ModelSpec(**teacher)) if mode == "online" else None
        values["recipe"] = _recipe(mode, cache, values.pop("recipe"), ns)
        loss = values["loss"]
        if mode == "none":
            loss["kd_loss"] = "none"
        loss["hard_loss"] = loss["hard_loss"] or ("ce" if mode == "none" else "none")
        values.update(mode=mode, cache=cache)
        return options.make_config(cls, values)

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
        self._check_teachers()
        if self.mix_labels and self.mode != "cache":
            raise KdcacheError("--mix-labels mixes cached soft labels: it needs --cache (online/none mix through the recipe)")
        if self.size is not None or self.ramp_start is not None or self.ramp_end is not None:
            self.schedule(self.size[0] if self.size else 1)   # a bad schedule is named before anything is written
        if self.val_res is not None and self.val_res < 1:
            raise KdcacheError(f"--val-res must be positive, got {self.val_res}")

    def _check_teachers(self) -> None:
        """--teachers and the ensemble settings agree (the labels themselves are checked against the cache)."""
        from kdcache.student.ensemble import ensemble_weights
        given = self.teachers is not None or self.teacher_weights is not None or self.ensemble != "mean" \
            or self.ensemble_draw != "sample"
        if given and self.mode != "cache":
            raise KdcacheError("--teachers, --ensemble, --teacher-weights and --ensemble-draw choose among a cache's "
                               "teachers: they need --cache")
        if self.teachers is not None and not self.teachers:
            raise KdcacheError("--teachers: give at least one teacher label")
        ensemble_weights(len(self.teachers or [None]), self.ensemble, self.teacher_weights, self.ensemble_draw)

    def schedule(self, view_size: int) -> SizeSchedule:
        """The training size of every epoch (default: the views' size throughout)."""
        return SizeSchedule.build(self.size or [view_size, view_size], self.epochs, self.ramp_start, self.ramp_end,
                                  self.size_step)


def resolve_cache(ns: argparse.Namespace) -> Optional[str]:
    """--cache, or the cache for --data's train split found under --cache-root (narrowed by --cache-id,
    --teacher-sha256)."""
    if not ns.cache_root:
        return str(ns.cache) if ns.cache else None
    if ns.cache:
        raise KdcacheError("--cache and --cache-root are exclusive")
    from kdcache.cache.reader import open_cache
    return str(open_cache(ns.data, root=ns.cache_root, cache_id=ns.cache_id, teacher_sha256=ns.teacher_sha256).path)


MIXING_FLAGS = ("mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mix_block")


def _recipe(mode: str, cache: Optional[str], given: dict, ns: argparse.Namespace) -> Optional[dict]:
    """TrainConfig.recipe: cached KD takes the cache's (flags that contradict it are refused; with --mix-labels
    the mixing flags are what the loader adds); none/online: the given flags at the dataset's view size."""
    from kdcache.augment.recipe import TRAIN_RENAMED, ViewRecipe, check_flags_match, recipe_from_given
    given = {k: v for k, v in given.items() if v is not None}
    if mode == "cache":
        from kdcache.cache.schema import TeacherCache
        cache_recipe = ViewRecipe.from_dict(TeacherCache.open(cache).spec.recipe)
        check_flags_match(ns, cache_recipe, cache, allowed=MIXING_FLAGS if ns.mix_labels else (),
                          renamed=TRAIN_RENAMED)
        return {k: v for k, v in given.items() if k in MIXING_FLAGS} if ns.mix_labels else None
    if not given:
        return None
    from kdcache.data.dataset import PreparedDataset
    return recipe_from_given(given, given.get("size") or PreparedDataset.open(ns.data).view_size).to_dict()
