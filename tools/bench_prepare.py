#!/usr/bin/env python
"""`kdcache prepare fashion-mnist` over the whole real dataset (what the README's demo prepares), timed, and
checked: 60,000 train / 10,000 val samples, 10 classes of 6,000 / 1,000. This ran in the test suite until
issue 11 (20-35 s of it on the 2-core machine); the suite now reads the full source without preparing it
(tests/test_prepare.py::test_full_fashion_mnist_real_files) and prepares subsets only.

    python tools/bench_prepare.py [--workers 2] [--keep DIR]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="prepare into this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    tmp = None if args.keep else Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    out = args.keep or tmp / "fm"
    try:
        # the real entry point, as a user runs it (interpreter start-up included in the time)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kdcache", "prepare", "fashion-mnist", "--workers", str(args.workers),
                        "--out", str(out)], check=True, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t
        info = json.loads(subprocess.run([sys.executable, "-m", "kdcache", "info", str(out), "--json"], check=True,
                                         capture_output=True, text=True).stdout)
        from kdcache.data.dataset import PreparedDataset
        ds = PreparedDataset.open(out)
        assert info["num_classes"] == 10
        assert info["splits"]["train"]["num_samples"] == 60000 and info["splits"]["val"]["num_samples"] == 10000
        assert np.bincount(ds.split("train").labels).tolist() == [6000] * 10
        assert np.bincount(ds.split("val").labels).tolist() == [1000] * 10
        print(f"prepare fashion-mnist (70,000 images, {args.workers} workers): {seconds:.1f} s, "
              f"{70000 / seconds:,.0f} img/s; counts and classes checked")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
