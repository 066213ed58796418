"""The parts train-student makes from its config before it trains (timm train.py's set-up): the loss
settings, the source of views and soft labels, the student, the training loader, the learning-rate schedule."""

import dataclasses
import warnings

import numpy as np
import torch

from kdcache.augment.loader import ReplayLoader
from kdcache.augment.params import ParamLayout
from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.schema import TeacherCache
from kdcache.errors import KdcacheError
from kdcache.models import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Normalize, build_model, create_timm_model
from kdcache.student.config import DEFAULT_LR, TrainConfig
from kdcache.student.losses import LossConfig
from kdcache.student.soft_labels import CachedTeacher, NoTeacher, OnlineTeacher, mix_labels_recipe
from kdcache.student.state import TrainData


def loss_config(cfg: TrainConfig) -> LossConfig:
    lc = LossConfig(**cfg.loss)
    if cfg.mode == "none":
        lc = dataclasses.replace(lc, kd_loss="none", hard_loss=lc.hard_loss if lc.hard_loss != "none" else "ce")
    elif lc.kd_loss == "none":
        raise KdcacheError(f"--kd-loss none contradicts mode {cfg.mode}")
    return lc


def _cached_source(cfg: TrainConfig, ds, train_split, device: torch.device) -> CachedTeacher:
    """The cache's views and soft labels, once the cache is shown to be of this dataset."""
    cache = TeacherCache.open(cfg.cache)
    cache.check_made_for(ds, train_split.name)
    if cfg.view_global_seed is not None and cfg.view_global_seed != cache.spec.global_seed:
        raise KdcacheError(f"--view-global-seed {cfg.view_global_seed} contradicts the cache's global seed "
                           f"{cache.spec.global_seed}: cached views come from the cache")
    mix_recipe = None
    if cfg.mix_labels:
        mix_recipe = mix_labels_recipe(ViewRecipe.from_dict(cache.spec.recipe), cfg.recipe or {})
    source = CachedTeacher(cache, device, cfg.seed, cfg.seed_choice, seeds=cfg.view_seeds, epochs=cfg.epochs,
                           mix_recipe=mix_recipe, teachers=cfg.teachers, ensemble=cfg.ensemble,
                           teacher_weights=cfg.teacher_weights, ensemble_draw=cfg.ensemble_draw)
    _check_sampled_targets(source.members, loss_config(cfg))
    return source


def _check_sampled_targets(members: dict, loss: LossConfig) -> None:
    """Sampled targets are unbiased only at the temperature they were drawn at (docs/training.md); sampled-cv
    targets are signed, which DKD cannot take."""
    if loss.kd_loss == "none":
        return
    for label, teacher in members.items():
        spec = teacher.spec
        if spec.targets == "sampled-cv" and loss.kd_loss == "dkd":
            raise KdcacheError(f"--kd-loss dkd: teacher {label}'s sampled-cv targets are signed (a drawn class below "
                               "the baseline weighs less than 0), and DKD renormalises its targets: use --kd-loss kd, "
                               "or a cache with --targets topk or sampled")
        if spec.sampled and spec.sample_temperature != loss.temperature:
            warnings.warn(f"teacher {label}'s sampled targets are unbiased at T = {spec.sample_temperature:g} (its "
                          f"--sample-temperature), this run distils at --temperature {loss.temperature:g}: consistent "
                          "only, with a bias of order 1/m (BENCHMARKS.md, \"Sparse targets\")")


def build_source(cfg: TrainConfig, ds, train_split, device: torch.device, amp_dtype):
    """(source, recipe, teacher info) of the mode: the views and their soft labels from a cache, from a teacher
    run in the loop (online), or views alone (none)."""
    if cfg.mode == "cache":
        source = _cached_source(cfg, ds, train_split, device)
        first = next(iter(source.members.values()))   # the cache's own teacher unless --teachers says otherwise
        return source, source.recipe, first.spec.teacher
    recipe = ViewRecipe.from_dict(cfg.recipe) if cfg.recipe else ViewRecipe(size=ds.view_size)
    view_seeds = cfg.view_seeds or list(range(cfg.epochs * recipe.repeats))
    common = dict(recipe=recipe, global_seed=cfg.view_global_seed or 0, view_seeds=view_seeds,
                  sizes=train_split.sizes, order_seed=cfg.seed)
    if cfg.mode == "online":
        tmodel, teacher_info = build_model(ModelSpec(**cfg.teacher), ds.num_classes, what="teacher")
        return OnlineTeacher(tmodel, teacher_info, device, amp_dtype, **common), recipe, teacher_info
    return NoTeacher(**common), recipe, None


def build_student_model(cfg: TrainConfig, num_classes: int, device: torch.device):
    """(model on the device, its normalisation, mean, std): timm's model, initialised from --seed."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    kwargs = {"drop_path_rate": cfg.drop_path} if cfg.drop_path else {}
    model = create_timm_model(cfg.model, num_classes, "model", **kwargs)
    mean, std = model.pretrained_cfg.get("mean", IMAGENET_MEAN), model.pretrained_cfg.get("std", IMAGENET_STD)
    normalize = Normalize(mean, std).to(device)
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    return model, normalize, mean, std


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """--lr, or the optimizer's default for a global batch of 256 scaled to the run's global batch."""
    return cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.opt, 0.1) * cfg.batch_size * world_size / 256


def build_train_data(cfg: TrainConfig, ctx, train_split, source, recipe: ViewRecipe, teacher_info,
                     device) -> TrainData:
    """The replay loader and the sizes of the run; the val loader is added last (TrainData.val)."""
    layout = ParamLayout.of(recipe)
    schedule = cfg.schedule(recipe.size)
    # Online KD scores the views at the recipe's size, the size a cache holds the teacher's answer for, whatever
    # size the student trains at: a second rendering of each view (docs/training.md).
    teacher_size = recipe.size if cfg.mode == "online" and set(schedule.sizes()) != {recipe.size} else None
    loader = ReplayLoader(train_split.beton_path, train_split.num_samples, schedule.size(0), cfg.batch_size,
                          cfg.workers, order="random", seed=cfg.seed, drop_last=True, distributed=ctx.enabled,
                          layout=layout, repeats=recipe.repeats, view_size=recipe.size, teacher_size=teacher_size)
    steps_per_epoch = len(loader) * recipe.repeats
    labels_all = torch.from_numpy(train_split.labels).to(device)
    if steps_per_epoch == 0:
        raise KdcacheError(f"--batch-size {cfg.batch_size} exceeds the {train_split.num_samples} training samples")
    return TrainData(source=source, recipe=recipe, layout=layout, schedule=schedule, loader=loader,
                     steps_per_epoch=steps_per_epoch, labels_all=labels_all, teacher_info=teacher_info,
                     val_res=cfg.val_res or schedule.final)


def create_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """timm's scheduler of the run, stepped every update (step_update)."""
    from timm.scheduler import create_scheduler_v2
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    return scheduler


def lr_curve(cfg: TrainConfig, lr: float, steps_per_epoch: int, points: int = 4096) -> list:
    """(t, learning rate of update t + 1) of the run's schedule at up to `points` evenly spaced updates: the same
    scheduler stepping a throwaway optimizer, so the run's own keeps its state."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = create_scheduler(cfg, opt, steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    out = []
    for t in np.unique(np.linspace(0, total - 1, min(total, points)).astype(np.int64)).tolist():
        scheduler.step_update(num_updates=t)
        out.append((t, opt.param_groups[0]["lr"]))
    return out
