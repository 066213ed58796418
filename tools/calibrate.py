#!/usr/bin/env python
"""Compute calibration printed next to absolute times: milliseconds per training step of timm's resnet10t at
batch 128, 32 px, fp32 on the CPU (forward, backward, SGD step), median of 20 after 3 warm-up steps.
Machines of the same kind differ by 4x (AVX-512 or not); divide a time by this number to compare machines.

    python tools/calibrate.py
"""

import statistics
import time

import timm
import torch


def main():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times = []
    for step in range(23):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - t)
    print(f"calibration: resnet10t train step, batch 128, 32 px, fp32, {torch.get_num_threads()} threads: "
          f"{1000 * statistics.median(times):.1f} ms")


if __name__ == "__main__":
    main()
