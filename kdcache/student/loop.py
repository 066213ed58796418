"""One training epoch of train-student (timm's train_one_epoch): the epoch's R passes of replayed views,
one update per batch (forward under autocast, the loss, backward, clip, step, scheduler, EMA), a
metrics.jsonl "train" record every --log-interval updates, and the progress bar or lines."""

import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from tqdm import tqdm

from kdcache.progress import rate_eta
from kdcache.student.soft_labels import PassBatch, epoch_passes
from kdcache.student.state import Run, TrainState


def train_step(run: Run, batch: PassBatch) -> Dict[str, torch.Tensor]:
    """One update on one batch; returns the loss and its parts (kd_loss, hard_loss) as device tensors."""
    device, source, student = run.device, run.data.source, run.student
    images = batch.images.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    teacher_images = batch.teacher_images
    if teacher_images is not None:
        teacher_images = teacher_images.to(device, non_blocking=True)
    teacher_logits = source.logits(images if teacher_images is None else teacher_images,
                                   batch.indices) if source.uses_teacher else None
    hard_target = None
    if batch.mix is not None:  # the hard-label term of a mixed view: timm's mixup_target with the same lambda
        hard_target = batch.mix.hard_target(run.data.labels_all, batch.indices.to(device), run.dataset.num_classes,
                                            run.criterion.cfg.smoothing)
    x = student.normalize(images)
    if run.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        logits = student.train_model(x)
    parts = run.criterion(logits.float(), labels, teacher_logits, hard_target)
    _update(run, parts["loss"])
    return parts


def _update(run: Run, loss: torch.Tensor) -> None:
    """Backward, gradient clipping (--clip-grad), optimizer step; through the gradient scaler with fp16."""
    optimizer, scaler, clip = run.optim.optimizer, run.optim.scaler, run.cfg.clip_grad
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(run.student.model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(run.student.model.parameters(), clip)
        optimizer.step()


def train_one_epoch(run: Run, state: TrainState, epoch: int) -> dict:
    """Train epoch `epoch` (from 0); returns its "epoch" record (time, size, seed, teacher time, img/s)."""
    cfg, ctx, data = run.cfg, run.ctx, run.data
    run.student.train_model.train()
    data.source.teacher_seconds = 0.0
    t0 = time.time()
    seen = 0
    bar = tqdm(total=data.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, leave=False,
               disable=run.lines.tqdm_disabled(cfg.progress and ctx.is_coordinator), mininterval=1.0)
    size = data.schedule.size(epoch)
    views = None
    for batch in epoch_passes(data.source, data.loader, epoch, data.recipe.repeats, data.layout, run.device, size):
        parts = train_step(run, batch)
        state.step += 1
        run.watch.observe(parts["loss"], state.step)
        run.optim.scheduler.step_update(num_updates=state.step)
        if run.student.ema is not None:
            run.student.ema.update(run.student.model, step=state.step)
        seen += batch.images.shape[0]
        views = batch.views
        if state.step % cfg.log_interval == 0 or state.step % data.steps_per_epoch == 0:
            _log_step(run, state, epoch, parts, seen, t0, bar)
        bar.update()
        if run.lines.due():
            _progress_line(run, state, epoch, seen, t0)
    bar.close()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    epoch_time = time.time() - t0
    return {"kind": "epoch", "epoch": epoch, "seconds": epoch_time, "size": size,
            "seed": int(views.seeds) if np.isscalar(views.seeds) else "per-sample",
            "teacher_seconds": data.source.teacher_seconds, "img_per_s": seen * ctx.world_size / epoch_time}


def _log_step(run: Run, state: TrainState, epoch: int, parts: Dict[str, torch.Tensor], seen: int, t0: float,
              bar) -> None:
    """A "train" record of this update: its own loss and loss parts (not an average over the interval), the
    learning rate of the next update, the epoch's img/s so far. Stops first if a loss so far was not finite."""
    steps_per_epoch, world_size = run.data.steps_per_epoch, run.ctx.world_size
    run.watch.check(steps_per_epoch, run.cfg.epochs, run.causes)   # a sync here already: loss.item()
    state.last_loss = parts["loss"].item()
    lr = run.optim.optimizer.param_groups[0]["lr"]
    if run.log is not None:
        run.log.write({"kind": "train", "epoch": epoch, "step": state.step,
                       "epoch_float": epoch + (state.step - epoch * steps_per_epoch) / steps_per_epoch,
                       "lr": lr, **{k: float(v.detach()) for k, v in parts.items()},
                       "img_per_s": seen * world_size / (time.time() - t0)})
    bar.set_postfix_str(f"loss {state.last_loss:.3f} lr {lr:.2e} "
                        f"{seen * world_size / (time.time() - t0):.0f} img/s", refresh=False)


def _progress_line(run: Run, state: TrainState, epoch: int, seen: int, t0: float) -> None:
    cfg = run.cfg
    epoch_images = run.data.steps_per_epoch * cfg.batch_size * run.ctx.world_size
    done = seen * run.ctx.world_size
    left = epoch_images - done + (cfg.epochs - epoch - 1) * epoch_images   # to the end of the run
    run.lines.line(f"{Path(cfg.out).name}: epoch {epoch + 1}/{cfg.epochs}: {done}/{epoch_images} img, "
                   + rate_eta(done, done + left, time.time() - t0)
                   + (f", loss {state.last_loss:.3f}" if state.last_loss is not None else ""))
