"""`kdcache train-student`: one training loop for the three modes (cache, online, none).

The shape of timm's train.py: build the run from its config (build_run: the source of views and soft labels,
the student, optimizer, scheduler, loaders, loss), open its directory and resume (open_run_dir), then per
epoch train (kdcache.student.loop.train_one_epoch), evaluate (evaluate_epoch), checkpoint (save_checkpoint),
and at the end the summary and the exported weights (summarize, write_outputs). The parts travel in a Run,
the progress in a TrainState (kdcache.student.state).

The loop is ffcv-imagenet's shape with timm's parts: FFCV replay loader -> normalise on the device ->
student forward (autocast) -> loss (kdcache.student.losses) -> backward, clip, step -> timm scheduler
per update -> EMA; evaluation on the val beton; checkpoints and logs in the run directory.
"""

import json
import logging
import statistics
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from kdcache.augment.loader import eval_loader
from kdcache.data.dataset import PreparedDataset
from kdcache.dist import init_from_env, resolve_amp, resolve_device
from kdcache.files import atomic_write
from kdcache.progress import ProgressLines
from kdcache.student import checkpoint as ckpt
from kdcache.student.build import (build_source, build_student_model, build_train_data, create_scheduler,
                                   loss_config, lr_curve, peak_lr)
from kdcache.student.config import TrainConfig  # noqa: F401 (TrainConfig re-exported)
from kdcache.student.evaluate import evaluate
from kdcache.student.loop import train_one_epoch
from kdcache.student.loss_watch import LossWatch, likely_causes
from kdcache.student.losses import StudentLoss
from kdcache.student.report import MetricsLog, plot_curves
from kdcache.student.resolution import adaptation_warning, final_size_training
from kdcache.student.state import Optimization, Run, Student, TrainState
from kdcache.weights import load_into

log = logging.getLogger(__name__)
_lr_curve = lr_curve   # the name tools/ and tests/ import


def train_student(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train a student as `cfg` says into cfg.out; `resume`: go on from cfg.out/last.pt. Returns the summary
    (summary.json's content)."""
    cfg.validate()
    run = build_run(cfg)
    state = open_run_dir(run, resume)
    t_run = time.time()
    # a terminal gets tqdm's bar; a log or a pipe a plain line every 10 s (kdcache.progress)
    run.lines = ProgressLines(cfg.progress and run.ctx.is_coordinator, logger=log)
    for epoch in range(state.epoch, cfg.epochs):
        record = train_one_epoch(run, state, epoch)
        if run.ctx.is_coordinator and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            evaluate_epoch(run, state, epoch, record)
        state.history.append(record)
        state.epoch = epoch + 1
        if run.ctx.is_coordinator:  # checkpoint first: an "epoch" line in metrics.jsonl means last.pt has that epoch
            save_checkpoint(run, state)
            run.log.write(record)
            log.info(epoch_line(run, state, record))
        run.ctx.barrier()
    summary = summarize(run, state, t_run)
    if run.ctx.is_coordinator:
        write_outputs(run, summary)
    run.ctx.close()
    return summary


def build_run(cfg: TrainConfig) -> Run:
    """Every part of the run, made from its config in the order that fixes its random state (the student is
    initialised from --seed after the source is made); nothing is written yet."""
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    ctx = init_from_env(cfg.device)
    device = resolve_device(cfg.device, ctx)
    amp_dtype, amp_name = resolve_amp(cfg.amp, device)
    ds = PreparedDataset.open(cfg.data)
    train_split, val_split = ds.split("train"), ds.split("val")
    loss_cfg = loss_config(cfg)
    source, recipe, teacher_info = build_source(cfg, ds, train_split, device, amp_dtype)
    model, normalize, mean, std = build_student_model(cfg, ds.num_classes, device)
    lr = peak_lr(cfg, ctx.world_size)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    data = build_train_data(cfg, ctx, train_split, source, recipe, teacher_info, device)
    scheduler = create_scheduler(cfg, optimizer, data.steps_per_epoch)
    final_size = _final_size(cfg, ctx, data, lr)
    scaler = torch.amp.GradScaler("cuda") if amp_name == "fp16" else None
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    criterion, watch = StudentLoss(loss_cfg), LossWatch(device)
    train_model = torch.compile(model) if cfg.compile else model
    if ctx.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    data.val = eval_loader(val_split.beton_path, data.val_res, cfg.batch_size, cfg.workers, crop_ratio=cfg.crop_pct)
    return Run(cfg=cfg, ctx=ctx, device=device, amp_dtype=amp_dtype, amp_name=amp_name, dataset=ds, data=data,
               student=Student(model, train_model, normalize, mean, std, ema),
               optim=Optimization(optimizer, scheduler, scaler, lr), criterion=criterion,
               watch=watch, causes=likely_causes(cfg.mode, cfg.cache, lr, amp_name),
               final_size=final_size, out=Path(cfg.out))


def _final_size(cfg: TrainConfig, ctx, data, lr: float) -> dict:
    """How much of the run trains at its last size; a ramp that leaves it too little is named (issue 18)."""
    steps = data.steps_per_epoch
    final_size = final_size_training(data.schedule, steps, lr_curve(cfg, lr, steps))
    final_size["warning"] = adaptation_warning(data.schedule, final_size)
    if final_size["warning"] and ctx.is_coordinator:   # each run's (a fresh registry), filters apply
        warnings.warn_explicit(final_size["warning"], UserWarning, __file__, 0, module=__name__, registry={})
    return final_size


def open_run_dir(run: Run, resume: bool) -> TrainState:
    """Make the run directory (coordinator), resume from its last.pt when asked and there is one, open
    metrics.jsonl (cut back to the checkpoint's epochs) and write config.json (what --resume reads back)."""
    out, ctx = run.out, run.ctx
    if ctx.is_coordinator:
        out.mkdir(parents=True, exist_ok=True)
    if resume and not (out / "last.pt").is_file():
        log.info(f"{out}: no checkpoint yet (interrupted in the first epoch); starting from the beginning")
        resume = False
    state = resume_from(run, out / "last.pt") if resume else TrainState()
    if ctx.is_coordinator:
        run.log = MetricsLog(out / "metrics.jsonl", truncate_after_epoch=state.epoch)
        atomic_write(out / "config.json", json.dumps(asdict(run.cfg), indent=1))
    return state


def resume_from(run: Run, path: Path) -> TrainState:
    """Load last.pt into the run's parts (weights, optimizer, scheduler, scaler, EMA, random state): the run
    goes on exactly where the checkpoint left it."""
    saved = ckpt.load_last(path)
    student, optim = run.student, run.optim
    load_into(student.model, saved["model"], path, run.cfg.model)
    optim.optimizer.load_state_dict(saved["optimizer"])
    optim.scheduler.load_state_dict(saved["scheduler"])
    if optim.scaler is not None and saved.get("scaler"):
        optim.scaler.load_state_dict(saved["scaler"])
    if student.ema is not None and saved.get("ema"):
        student.ema.load_state_dict(saved["ema"])
    ckpt.set_rng_state(saved["rng"])
    return TrainState(epoch=saved["epoch"], step=saved["step"], best_top1=saved["best_top1"],
                      history=saved["history"])


def evaluate_epoch(run: Run, state: TrainState, epoch: int, record: dict) -> None:
    """Val top-1/top-5 of the model (and its EMA) into the epoch's record and an "eval" line; best.pt when the
    model's top-1 is the best so far."""
    student, data = run.student, run.data
    ev = evaluate(student.model, data.val, student.normalize, run.device, run.amp_dtype)
    record.update({"top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["loss"], "val_res": data.val_res})
    if student.ema is not None:
        ev_ema = evaluate(student.ema.module, data.val, student.normalize, run.device, run.amp_dtype)
        record.update({"ema_top1": ev_ema["top1"], "ema_top5": ev_ema["top5"]})
    run.log.write(dict(record, kind="eval"))
    if state.best_top1 is None or ev["top1"] > state.best_top1:
        state.best_top1 = ev["top1"]
        ckpt.save_best(run.out / "best.pt", student.model.state_dict(),
                       student.ema.state_dict() if student.ema else None, epoch, state.best_top1)


def save_checkpoint(run: Run, state: TrainState) -> None:
    """last.pt: everything an exact resume needs, after state.epoch epochs."""
    student, optim = run.student, run.optim
    ckpt.save_last(run.out / "last.pt", model=student.model.state_dict(), optimizer=optim.optimizer.state_dict(),
                   scheduler=optim.scheduler.state_dict(), scaler=optim.scaler.state_dict() if optim.scaler else None,
                   ema=student.ema.state_dict() if student.ema else None, epoch=state.epoch, step=state.step,
                   best_top1=state.best_top1, history=state.history, config=asdict(run.cfg))


def epoch_line(run: Run, state: TrainState, record: dict) -> str:
    """'run: epoch 2/3 at 24 px: 3.1 s, 650 img/s, val top-1 71.00 % at 32 px (EMA 70.50 %), ETA 0.1 min'."""
    cfg, recipe_size, val_res = run.cfg, run.data.recipe.size, run.data.val_res
    size, epoch = record["size"], record["epoch"]
    at = f" at {size} px" if size != recipe_size or val_res != recipe_size else ""
    done = (f"{Path(cfg.out).name}: epoch {epoch + 1}/{cfg.epochs}{at}: {record['seconds']:.1f} s, "
            f"{record['img_per_s']:.0f} img/s")
    if "top1" in record:
        done += f", val top-1 {record['top1']:.2f} %" + (f" at {val_res} px" if at else "")
        done += (f" (EMA {record['ema_top1']:.2f} %)" if "ema_top1" in record else "")
    remaining = (cfg.epochs - epoch - 1) * statistics.median([h["seconds"] for h in state.history])
    return done + (f", ETA {remaining / 60:.1f} min" if remaining else "")


def summarize(run: Run, state: TrainState, t_run: float) -> dict:
    """summary.json's content: the run's settings, final and best accuracy, and its speed (medians of epochs)."""
    cfg, history, data = run.cfg, state.history, run.data
    evals = [h for h in history if "top1" in h]
    return {
        "mode": cfg.mode, "model": cfg.model, "epochs": cfg.epochs, "device": str(run.device), "amp": run.amp_name,
        "final_top1": evals[-1]["top1"] if evals else None, "final_top5": evals[-1]["top5"] if evals else None,
        "best_top1": state.best_top1, "final_ema_top1": evals[-1].get("ema_top1") if evals else None,
        "epoch_time_s": statistics.median(h["seconds"] for h in history),
        "teacher_forward_s_per_epoch": statistics.median(h["teacher_seconds"] for h in history) if cfg.mode == "online" else 0.0,
        "img_per_s": statistics.median(h["img_per_s"] for h in history),
        "steps": state.step, "world_size": run.ctx.world_size, "seconds": time.time() - t_run,
        "teacher": {k: data.teacher_info.get(k) for k in ("name", "sha256")} if data.teacher_info else None,
        **_teachers_record(cfg, data.source),
        "cache": (cfg.cache if "://" in cfg.cache else str(Path(cfg.cache).resolve())) if cfg.cache else None,
        "recipe": data.recipe.to_dict(), "dataset_fingerprint": run.dataset.fingerprint,
        "size_schedule": data.schedule.to_dict(), "val_res": data.val_res, "final_size": run.final_size,
    }


def _teachers_record(cfg, source) -> dict:
    """Cached KD from several teachers (or another than the cache's own): which, and how they were combined."""
    if cfg.mode != "cache" or cfg.teachers is None:
        return {}
    teachers = [{"label": label, "name": c.spec.teacher.get("name"), "sha256": c.spec.teacher.get("sha256")}
                for label, c in source.members.items()]
    return {"teachers": teachers, "ensemble": cfg.ensemble if len(teachers) > 1 else None}


def write_outputs(run: Run, summary: dict) -> None:
    """The run's results: model(.ema).safetensors (timm-loadable), summary.json, curves.png."""
    cfg, student, out, classes = run.cfg, run.student, run.out, run.dataset.num_classes
    ckpt.export_safetensors(out / "model.safetensors", student.model.state_dict(), cfg.model, classes,
                            student.mean, student.std)
    if student.ema is not None:
        ckpt.export_safetensors(out / "model_ema.safetensors", student.ema.module.state_dict(), cfg.model, classes,
                                student.mean, student.std)
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    plot_curves(run.log.records(), out / "curves.png", title=f"{cfg.model} ({cfg.mode})")
