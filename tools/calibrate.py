#!/usr/bin/env python
"""Compute calibration printed next to absolute times: milliseconds per training step of timm's resnet10t at
batch 128, 32 px, fp32 on the CPU (forward, backward, SGD step), median of 20 after 3 warm-up steps.
Machines of the same kind differ by 4x (AVX-512 or not); divide a time by this number to compare machines.

    python tools/calibrate.py
    python tools/calibrate.py --avx2-env    # prints the environment that emulates an AVX2-only machine here:
    eval "$(python tools/calibrate.py --avx2-env)"; python tools/calibrate.py; kdcache run ...
"""

import statistics
import sys
import time

import timm
import torch


# An AVX2-only machine of this kind, emulated on an AVX-512 one: oneDNN's AVX2 kernels (most of the gap for
# convolutions), numba code for Haswell, OpenCV and numpy without their AVX-512 paths (the pip OpenCV has no
# AVX-512 dispatch: it says "unknown CPU feature" and runs as before). Measured on CPU-2, uncontended: 2.2-2.4x
# the plain calibration (BENCHMARKS.md, "The demo"); the real machines were about 4x slower.
AVX2_ENV = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",     # torch's own vectorised kernels (oneDNN's limit does not reach them)
    "NUMBA_CPU_NAME": "haswell",
    "OPENCV_CPU_DISABLE": "AVX512_SKX,AVX512_COMMON,AVX512_ICL,AVX512_CLX,AVX512_CNL,AVX512_KNL,AVX512_KNM",
    "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR "
                                "AVX512_KNL AVX512_KNM",
}


def main():
    if "--avx2-env" in sys.argv[1:]:
        print("\n".join(f"export {k}='{v}'" for k, v in AVX2_ENV.items()))
        return
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
