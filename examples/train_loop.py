"""Train a timm student from a kdcache cache (cached KD) in a plain PyTorch loop, with kdcache's public names.

Its choices are `kdcache train-student --cache C`'s (timm's SGD, cosine schedule stepped per update, channels_last),
so its per-step losses equal train-student's at the same settings (tests/test_api.py). Prints a JSON line per step.
"""

import argparse
import json

import numpy as np
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from kdcache import ReplayLoader, hard_label_target, kd_loss, open_dataset

p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--data", required=True, help="prepared dataset (kdcache prepare)")
p.add_argument("--cache", required=True, help="teacher cache of its train split (path or URL)")
p.add_argument("--model", default="resnet18", help="timm model name")
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--weight-decay", type=float, default=5e-5)
p.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
p.add_argument("--hard-weight", type=float, default=0.0, help="weight of the (mixed) hard-label CE; 0: KD only")
p.add_argument("--smoothing", type=float, default=0.0, help="label smoothing of the hard-label target")
p.add_argument("--seed", type=int, default=0, help="the student's init and the sample order")
p.add_argument("--workers", type=int, default=None)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--out", default=None, help="save the trained weights here (torch.save)")
args = p.parse_args()

dataset = open_dataset(args.data)
torch.manual_seed(args.seed)
np.random.seed(args.seed)
model = timm.create_model(args.model, pretrained=False, num_classes=dataset.num_classes)
model = model.to(args.device, memory_format=torch.channels_last).train()
loader = ReplayLoader(data=dataset, cache=args.cache, batch_size=args.batch_size, order_seed=args.seed,
                      epochs=args.epochs, workers=args.workers, device=args.device,
                      mean=model.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN),
                      std=model.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD))
optimizer = create_optimizer_v2(model, opt="sgd", lr=args.lr, weight_decay=args.weight_decay, momentum=0.9)
scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, step_on_epochs=False,
                                   updates_per_epoch=len(loader))
soft_ce, step = SoftTargetCrossEntropy(), 0
for epoch in range(args.epochs):
    loader.set_epoch(epoch)
    for batch in loader:
        logits = model(batch.images)
        loss = kd_loss(logits, batch.targets, args.temperature)
        if args.hard_weight:
            target = hard_label_target(batch.labels, dataset.num_classes, args.smoothing, batch.partner, batch.lam)
            loss = loss + args.hard_weight * soft_ce(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        scheduler.step_update(num_updates=step)
        print(json.dumps({"epoch": epoch, "step": step, "loss": loss.item()}), flush=True)
if args.out:
    torch.save(model.state_dict(), args.out)
