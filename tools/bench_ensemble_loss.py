#!/usr/bin/env python
"""What a second teacher adds to a cached-KD step (issue 20), measured where machine noise cannot hide it.

A cached-KD step with two teachers (--teachers A,B --ensemble mean) differs from one with one teacher only in
the loss: the targets of both are rebuilt (SparseTargets.log_probs at T), mixed (MixedTargets: log-sum-exp of
the members' log-probabilities) and the KD loss taken, forward and backward. (The slab of the second teacher is
read once per pass, in the background, like the first's.) This times that loss for one teacher and for two,
interleaved call by call, against the student's whole train step (forward, loss, backward, SGD) at the same
batch, on the same thread count train-student uses here (all usable cores):

    python tools/bench_ensemble_loss.py [--batch-size 256] [--classes 10 1000] [--topk 10] [--model resnet10t]

Prints, per class count, the median of each and (two-teacher loss - one-teacher loss) / step: the epoch-time
ratio of two teachers over one, as far as the loss can make it.
"""

import argparse
import statistics
import sys
import time

import torch


def _targets(batch: int, classes: int, k: int, gen: torch.Generator):
    from kdcache import SparseTargets
    logits = torch.randn(batch, classes, generator=gen) * 3
    logp = torch.log_softmax(logits, 1)
    top, idx = logp.topk(min(k, classes), 1)
    rest = logp.scatter(1, idx, -torch.inf)
    tail = torch.logsumexp(rest, 1) if k < classes else torch.full((batch,), -torch.inf)
    return SparseTargets(idx, top, tail, classes)


def _timed(fn, repeats: int):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    from kdcache import build_model, ModelSpec, kd_loss
    from kdcache.cache.targets import MixedTargets
    from kdcache.option import usable_cores
    torch.set_num_threads(usable_cores())   # as train-student's FFCV Loader sets them
    gen = torch.Generator().manual_seed(0)
    b, T = args.batch_size, args.temperature
    print(f"batch {b}, T = {T:g}, top-{args.topk}, student {args.model} at {args.size} px, "
          f"{torch.get_num_threads()} torch threads; medians of {args.repeats} interleaved calls")
    print("| classes | loss, one teacher (ms) | loss, two teachers, mean (ms) | student step (ms) | "
          "two / one teacher, per step |\n|---|---|---|---|---|")
    for classes in args.classes:
        model, _ = build_model(ModelSpec(name=args.model, random_init=True), classes)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(b, 3, args.size, args.size, generator=gen)
        one = _targets(b, classes, args.topk, gen)
        two = MixedTargets([one, _targets(b, classes, args.topk, gen)], weights=[0.5, 0.5])
        logits = torch.randn(b, classes, generator=gen, requires_grad=True)

        def loss_of(targets):
            def run():
                loss = kd_loss(logits, targets, T)
                loss.backward()
                logits.grad = None
            return run

        def step():
            opt.zero_grad(set_to_none=True)
            kd_loss(model(images), one, T).backward()
            opt.step()

        for fn in (loss_of(one), loss_of(two), step):   # warm-up
            fn()
        t_one, t_two, t_step = [], [], []
        for _ in range(args.repeats):
            t_one += _timed(loss_of(one), 1)
            t_two += _timed(loss_of(two), 1)
            t_step += _timed(step, 1)
        m_one, m_two, m_step = (statistics.median(t) * 1e3 for t in (t_one, t_two, t_step))
        print(f"| {classes:,} | {m_one:.2f} | {m_two:.2f} | {m_step:.1f} | {1 + (m_two - m_one) / m_step:.4f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
