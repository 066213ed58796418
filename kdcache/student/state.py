"""What train-student's steps hand each other: the parts a run is built from (Run, made once from the
config) and the progress a checkpoint saves (TrainState, changed by every epoch)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch

from kdcache.augment.params import ParamLayout
from kdcache.augment.recipe import ViewRecipe
from kdcache.models import Normalize


@dataclass
class Student:
    model: torch.nn.Module          # the weights: checkpoints, evaluation, the EMA's source, gradient clipping
    train_model: torch.nn.Module    # what the loop calls: the model, compiled and/or wrapped in DDP
    normalize: Normalize            # the model's input normalisation, applied on the device
    mean: tuple
    std: tuple
    ema: Optional[Any] = None       # timm's ModelEmaV3 with --model-ema-decay > 0


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: Any                  # timm's, stepped every update
    scaler: Optional[torch.amp.GradScaler]   # fp16 only
    lr: float                       # the peak learning rate (--lr, or the default scaled by the global batch)


@dataclass
class TrainData:
    source: Any                     # CachedTeacher | OnlineTeacher | NoTeacher (kdcache.student.soft_labels)
    recipe: ViewRecipe              # the views the student sees
    layout: ParamLayout
    schedule: Any                   # the training size per epoch (kdcache.student.resolution)
    loader: Any                     # kdcache.augment.loader.ReplayLoader
    steps_per_epoch: int            # updates per epoch, all passes
    labels_all: torch.Tensor        # every training label on the device: a mixed view's partner's label
    teacher_info: Optional[dict]    # the teacher's name and sha256 (cache or online), None without one
    val_res: int = 0
    val: Any = None                 # the val loader (resize + centre crop at val_res)


@dataclass
class Run:
    cfg: Any                        # kdcache.student.config.TrainConfig
    ctx: Any                        # kdcache.dist context: rank, world size, barrier
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    amp_name: str
    dataset: Any                    # kdcache.data.dataset.PreparedDataset
    data: TrainData
    student: Student
    optim: Optimization
    criterion: torch.nn.Module      # kdcache.student.losses.StudentLoss
    watch: Any                      # kdcache.student.loss_watch.LossWatch
    causes: List[str]               # what a NaN loss is named with
    final_size: dict                # how much of the run trains at its last size (issue 18)
    out: Path
    log: Any = None                 # MetricsLog of the coordinator once the run directory is open
    lines: Any = None               # ProgressLines: the plain progress lines where no tqdm bar shows


@dataclass
class TrainState:
    """The run's progress: what last.pt carries from one epoch (or one process) to the next."""
    epoch: int = 0                  # the next epoch to train
    step: int = 0                   # updates made
    best_top1: Optional[float] = None
    history: List[dict] = field(default_factory=list)   # one record per epoch trained
    last_loss: Optional[float] = None   # the last logged loss, for the progress lines (not checkpointed)
