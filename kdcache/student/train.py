"""`kdcache train-student`: one training loop for the three modes (cache, online, none).

The loop is ffcv-imagenet's shape with timm's parts: FFCV replay loader -> normalise on the device ->
student forward (autocast) -> loss (kdcache.student.losses) -> backward, clip, step -> timm scheduler
per update -> EMA; evaluation on the val beton; checkpoints and logs in the run directory.
"""

import dataclasses
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdcache.augment.params import ParamLayout
from kdcache.augment.recipe import ViewRecipe
from kdcache.cache.schema import TeacherCache
from kdcache.data.dataset import PreparedDataset
from kdcache.dist import init_from_env, resolve_amp, resolve_device
from kdcache.errors import KdcacheError
from kdcache.files import write_text_atomic
from kdcache.models import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Normalize, build_model, create_timm_model
from kdcache.progress import ProgressLines, rate_eta
from kdcache.student import checkpoint as ckpt
from kdcache.student.config import DEFAULT_LR, TrainConfig  # noqa: F401 (TrainConfig re-exported)
from kdcache.student.evaluate import evaluate
from kdcache.augment.loader import ReplayLoader, eval_loader
from kdcache.student.loss_watch import LossWatch, likely_causes
from kdcache.student.losses import LossConfig, StudentLoss
from kdcache.student.report import MetricsLog, plot_curves
from kdcache.student.resolution import adaptation_warning, final_size_training
from kdcache.student.soft_labels import CachedTeacher, MixTargets, NoTeacher, OnlineTeacher, mix_labels_recipe
from kdcache.weights import load_into


def _loss_config(cfg: TrainConfig) -> LossConfig:
    lc = LossConfig(**cfg.loss)
    if cfg.mode == "none":
        lc = dataclasses.replace(lc, kd_loss="none", hard_loss=lc.hard_loss if lc.hard_loss != "none" else "ce")
    elif lc.kd_loss == "none":
        raise KdcacheError(f"--kd-loss none contradicts mode {cfg.mode}")
    return lc


def _passes(source, loader: ReplayLoader, epoch: int, passes: int, layout: ParamLayout, device, size: int):
    """The batches of one epoch at the epoch's size: R passes, each with its own views (repeated augmentation),
    and the pass's mixing weights when the recipe mixes. A batch is (images, labels, indices, teacher images
    or None, views, mix)."""
    for r in range(passes):
        views = source.begin_pass(epoch, r)
        loader.set_views(views.params, views.active)
        loader.set_size(size)                          # before iter(): FFCV allocates the epoch's buffers then
        loader.loader.next_epoch = epoch * passes + r   # the order is a function of (seed, pass): resumable
        mix = getattr(source, "mix", None)        # a cached source has them already for this pass
        if mix is None and layout.mixing:
            mix = MixTargets(views.params, layout, device)
        for batch in loader:
            yield (*batch[:3], batch[3] if len(batch) > 3 else None, views, mix)


def _scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """timm's scheduler of the run, stepped every update (step_update)."""
    from timm.scheduler import create_scheduler_v2
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    return scheduler


def _lr_curve(cfg: TrainConfig, lr: float, steps_per_epoch: int, points: int = 4096) -> list:
    """(t, learning rate of update t + 1) of the run's schedule at up to `points` evenly spaced updates: the same
    scheduler stepping a throwaway optimizer, so the run's own keeps its state."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = _scheduler(cfg, opt, steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    out = []
    for t in np.unique(np.linspace(0, total - 1, min(total, points)).astype(np.int64)).tolist():
        scheduler.step_update(num_updates=t)
        out.append((t, opt.param_groups[0]["lr"]))
    return out


def train_student(cfg: TrainConfig, resume: bool = False) -> dict:
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    cfg.validate()
    out = Path(cfg.out)
    ctx = init_from_env(cfg.device)
    device = resolve_device(cfg.device, ctx)
    amp_dtype, amp_name = resolve_amp(cfg.amp, device)
    ds = PreparedDataset.open(cfg.data)
    train_split, val_split = ds.split("train"), ds.split("val")
    loss_cfg = _loss_config(cfg)

    # --- the source of views and soft labels ---------------------------------------------------
    if cfg.mode == "cache":
        cache = TeacherCache.open(cfg.cache)
        if cache.spec.dataset["split_fingerprint"] != train_split.fingerprint:
            raise KdcacheError(f"{cfg.cache}: made for dataset split {cache.spec.dataset['split_fingerprint'][:16]}, "
                               f"but {cfg.data} train is {train_split.fingerprint[:16]} (another dataset or another prepare)")
        if cache.spec.num_classes != ds.num_classes:
            raise KdcacheError(f"{cfg.cache}: {cache.spec.num_classes} teacher classes, the dataset has {ds.num_classes}")
        if cfg.view_global_seed is not None and cfg.view_global_seed != cache.spec.global_seed:
            raise KdcacheError(f"--view-global-seed {cfg.view_global_seed} contradicts the cache's global seed "
                               f"{cache.spec.global_seed}: cached views come from the cache")
        mix_recipe = None
        if cfg.mix_labels:
            mix_recipe = mix_labels_recipe(ViewRecipe.from_dict(cache.spec.recipe), cfg.recipe or {})
        source = CachedTeacher(cache, device, cfg.seed, cfg.seed_choice, seeds=cfg.view_seeds, epochs=cfg.epochs,
                               mix_recipe=mix_recipe)
        recipe = source.recipe
        teacher_info = cache.spec.teacher
    else:
        recipe = ViewRecipe.from_dict(cfg.recipe) if cfg.recipe else ViewRecipe(size=ds.view_size)
        view_seeds = cfg.view_seeds or list(range(cfg.epochs * recipe.repeats))
        common = dict(recipe=recipe, global_seed=cfg.view_global_seed or 0, view_seeds=view_seeds,
                      sizes=train_split.sizes, order_seed=cfg.seed)
        teacher_info = None
        if cfg.mode == "online":
            tmodel, teacher_info = build_model(ModelSpec(**cfg.teacher), ds.num_classes, what="teacher")
            source = OnlineTeacher(tmodel, teacher_info, device, amp_dtype, **common)
        else:
            source = NoTeacher(**common)

    # --- the student ----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    kwargs = {"drop_path_rate": cfg.drop_path} if cfg.drop_path else {}
    model = create_timm_model(cfg.model, ds.num_classes, "model", **kwargs)
    mean, std = model.pretrained_cfg.get("mean", IMAGENET_MEAN), model.pretrained_cfg.get("std", IMAGENET_STD)
    normalize = Normalize(mean, std).to(device)
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.opt, 0.1) * cfg.batch_size * ctx.world_size / 256
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    layout = ParamLayout.of(recipe)
    schedule = cfg.schedule(recipe.size)
    val_res = cfg.val_res or schedule.final
    # Online KD scores the views at the recipe's size, the size a cache holds the teacher's answer for, whatever
    # size the student trains at: a second rendering of each view (docs/training.md).
    teacher_size = recipe.size if cfg.mode == "online" and set(schedule.sizes()) != {recipe.size} else None
    loader = ReplayLoader(train_split.beton_path, train_split.num_samples, schedule.size(0), cfg.batch_size,
                          cfg.workers, order="random", seed=cfg.seed, drop_last=True, distributed=ctx.enabled,
                          layout=layout, repeats=recipe.repeats, view_size=recipe.size, teacher_size=teacher_size)
    passes = recipe.repeats
    steps_per_epoch = len(loader) * passes
    labels_all = torch.from_numpy(train_split.labels).to(device)
    if steps_per_epoch == 0:
        raise KdcacheError(f"--batch-size {cfg.batch_size} exceeds the {train_split.num_samples} training samples")
    scheduler = _scheduler(cfg, optimizer, steps_per_epoch)
    # how much of the run trains at its last size; a ramp that leaves it too little is named (issue 18)
    final_size = final_size_training(schedule, steps_per_epoch, _lr_curve(cfg, lr, steps_per_epoch))
    final_size["warning"] = adaptation_warning(schedule, final_size)
    if final_size["warning"] and ctx.is_coordinator:   # each run's (a fresh registry), filters apply
        warnings.warn_explicit(final_size["warning"], UserWarning, __file__, 0, module=__name__, registry={})
    scaler = torch.amp.GradScaler("cuda") if amp_name == "fp16" else None
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    criterion = StudentLoss(loss_cfg)
    watch = LossWatch(device)
    causes = likely_causes(cfg.mode, cfg.cache, lr, amp_name)
    train_model = torch.compile(model) if cfg.compile else model
    if ctx.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    val = eval_loader(val_split.beton_path, val_res, cfg.batch_size, cfg.workers, crop_ratio=cfg.crop_pct)

    # --- run directory and resume ---------------------------------------------------------------
    start_epoch, step, best_top1, history = 0, 0, None, []
    if ctx.is_coordinator:
        out.mkdir(parents=True, exist_ok=True)
    if resume and not (out / "last.pt").is_file():
        print(f"{out}: no checkpoint yet (interrupted in the first epoch); starting from the beginning", file=sys.stderr)
        resume = False
    if resume:
        state = ckpt.load_last(out / "last.pt")
        load_into(model, state["model"], out / "last.pt", cfg.model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        start_epoch, step, best_top1, history = state["epoch"], state["step"], state["best_top1"], state["history"]
        ckpt.set_rng_state(state["rng"])
    log = MetricsLog(out / "metrics.jsonl", truncate_after_epoch=start_epoch if resume else 0) if ctx.is_coordinator else None
    if ctx.is_coordinator:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    # --- the loop --------------------------------------------------------------------------------
    t_run = time.time()
    # a terminal gets tqdm's bar; a log or a pipe a plain line every 10 s (kdcache.progress)
    lines = ProgressLines(cfg.progress and ctx.is_coordinator)
    epoch_images = steps_per_epoch * cfg.batch_size * ctx.world_size
    value = None
    for epoch in range(start_epoch, cfg.epochs):
        train_model.train()
        source.teacher_seconds = 0.0
        t0 = time.time()
        seen = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, leave=False,
                   disable=lines.tqdm_disabled(cfg.progress and ctx.is_coordinator), mininterval=1.0)
        size = schedule.size(epoch)
        for images, labels, indices, teacher_images, views, mix in _passes(source, loader, epoch, passes, layout,
                                                                           device, size):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if teacher_images is not None:
                teacher_images = teacher_images.to(device, non_blocking=True)
            teacher_logits = source.logits(images if teacher_images is None else teacher_images,
                                           indices) if source.uses_teacher else None
            hard_target = None
            if mix is not None:  # the hard-label term of a mixed view: timm's mixup_target with the same lambda
                hard_target = mix.hard_target(labels_all, indices.to(device), ds.num_classes, loss_cfg.smoothing)
            x = normalize(images)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = train_model(x)
            parts = criterion(logits.float(), labels, teacher_logits, hard_target)
            loss = parts["loss"]
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
            step += 1
            watch.observe(loss, step)
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(model, step=step)
            seen += images.shape[0]
            if step % cfg.log_interval == 0 or step % steps_per_epoch == 0:
                watch.check(steps_per_epoch, cfg.epochs, causes)   # a sync here already: loss.item()
                value = loss.item()
                if log is not None:
                    rec = {"kind": "train", "epoch": epoch, "step": step,
                           "epoch_float": epoch + (step - epoch * steps_per_epoch) / steps_per_epoch,
                           "lr": optimizer.param_groups[0]["lr"], **{k: float(v.detach()) for k, v in parts.items()},
                           "img_per_s": seen * ctx.world_size / (time.time() - t0)}
                    log.write(rec)
                bar.set_postfix_str(f"loss {value:.3f} lr {optimizer.param_groups[0]['lr']:.2e} "
                                    f"{seen * ctx.world_size / (time.time() - t0):.0f} img/s", refresh=False)
            bar.update()
            if lines.due():
                done = seen * ctx.world_size
                left = epoch_images - done + (cfg.epochs - epoch - 1) * epoch_images   # to the end of the run
                lines.line(f"{Path(cfg.out).name}: epoch {epoch + 1}/{cfg.epochs}: {done}/{epoch_images} img, "
                           + rate_eta(done, done + left, time.time() - t0)
                           + (f", loss {value:.3f}" if value is not None else ""))
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.time() - t0
        record = {"kind": "epoch", "epoch": epoch, "seconds": epoch_time, "size": size,
                  "seed": int(views.seeds) if np.isscalar(views.seeds) else "per-sample",
                  "teacher_seconds": source.teacher_seconds, "img_per_s": seen * ctx.world_size / epoch_time}
        if ctx.is_coordinator and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            ev = evaluate(model, val, normalize, device, amp_dtype)
            record.update({"top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["loss"], "val_res": val_res})
            if ema is not None:
                ev_ema = evaluate(ema.module, val, normalize, device, amp_dtype)
                record.update({"ema_top1": ev_ema["top1"], "ema_top5": ev_ema["top5"]})
            log.write(dict(record, kind="eval"))
            if best_top1 is None or ev["top1"] > best_top1:
                best_top1 = ev["top1"]
                ckpt.save_best(out / "best.pt", model.state_dict(), ema.state_dict() if ema else None, epoch, best_top1)
        history.append(record)
        if ctx.is_coordinator:  # checkpoint first: an "epoch" line in metrics.jsonl means last.pt has that epoch
            ckpt.save_last(out / "last.pt", model=model.state_dict(), optimizer=optimizer.state_dict(),
                           scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                           ema=ema.state_dict() if ema else None, epoch=epoch + 1, step=step, best_top1=best_top1,
                           history=history, config=asdict(cfg))
            log.write(record)
            at = f" at {size} px" if size != recipe.size or val_res != recipe.size else ""
            done = (f"{Path(cfg.out).name}: epoch {epoch + 1}/{cfg.epochs}{at}: {epoch_time:.1f} s, "
                    f"{record['img_per_s']:.0f} img/s")
            if "top1" in record:
                done += f", val top-1 {record['top1']:.2f} %" + (f" at {val_res} px" if at else "")
                done += (f" (EMA {record['ema_top1']:.2f} %)" if "ema_top1" in record else "")
            remaining = (cfg.epochs - epoch - 1) * statistics.median([h["seconds"] for h in history])
            print(done + (f", ETA {remaining / 60:.1f} min" if remaining else ""), file=sys.stderr)
        ctx.barrier()

    # --- outputs ---------------------------------------------------------------------------------
    evals = [h for h in history if "top1" in h]
    summary = {
        "mode": cfg.mode, "model": cfg.model, "epochs": cfg.epochs, "device": str(device), "amp": amp_name,
        "final_top1": evals[-1]["top1"] if evals else None, "final_top5": evals[-1]["top5"] if evals else None,
        "best_top1": best_top1, "final_ema_top1": evals[-1].get("ema_top1") if evals else None,
        "epoch_time_s": statistics.median(h["seconds"] for h in history),
        "teacher_forward_s_per_epoch": statistics.median(h["teacher_seconds"] for h in history) if cfg.mode == "online" else 0.0,
        "img_per_s": statistics.median(h["img_per_s"] for h in history),
        "steps": step, "world_size": ctx.world_size, "seconds": time.time() - t_run,
        "teacher": {k: teacher_info.get(k) for k in ("name", "sha256")} if teacher_info else None,
        "cache": str(Path(cfg.cache).resolve()) if cfg.cache else None,
        "recipe": recipe.to_dict(), "dataset_fingerprint": ds.fingerprint,
        "size_schedule": schedule.to_dict(), "val_res": val_res, "final_size": final_size,
    }
    if ctx.is_coordinator:
        ckpt.export_safetensors(out / "model.safetensors", model.state_dict(), cfg.model, ds.num_classes, mean, std)
        if ema is not None:
            ckpt.export_safetensors(out / "model_ema.safetensors", ema.module.state_dict(), cfg.model, ds.num_classes, mean, std)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
        plot_curves(log.records(), out / "curves.png", title=f"{cfg.model} ({cfg.mode})")
    ctx.close()
    return summary
