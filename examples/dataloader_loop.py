#!/usr/bin/env python
"""Train a student from a kdcache cache with a plain torch DataLoader (no FFCV in this process).

    python examples/dataloader_loop.py --data DATA --cache CACHE --model resnet18 --epochs 10
"""
import argparse

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdcache import PairBatchSampler, ReplayDataset, collate_views


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset (kdcache prepare)")
    p.add_argument("--cache", required=True, help="teacher cache of its train split (kdcache dump-teacher)")
    p.add_argument("--model", default="resnet18", help="timm student model (default resnet18)")
    p.add_argument("--epochs", type=int, default=1, help="epochs; epoch e shows the cache's seed e mod S (default 1)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size, even for mixing recipes (default 128)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    dataset = ReplayDataset(args.data, args.cache)       # the cache's views and its top-k teacher targets
    sampler = PairBatchSampler(dataset, args.batch_size, drop_last=True)   # mixing pairs stay in one batch
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_views, num_workers=args.workers)
    device, T = torch.device(args.device), args.temperature
    model = timm.create_model(args.model, num_classes=dataset.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-5)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    losses = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)                         # the epoch's order and its cached seed
        model.train()
        for step, batch in enumerate(loader):
            if args.max_steps is not None and step >= args.max_steps:
                break
            batch = batch.to(device, non_blocking=True)
            logits = model((batch.images.float() - mean) / std)
            # vanilla KD against the cached teacher answer of exactly this (mixed) view
            teacher = batch.targets.dense_logits() / T
            loss = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(teacher, 1), reduction="batchmean",
                            log_target=True) * T * T
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            print(f"epoch {epoch} step {step} seed {dataset.view_seed} loss {losses[-1]:.5f}", flush=True)
    return losses


if __name__ == "__main__":
    main()
