#!/usr/bin/env python
"""A student's epoch time alone and with a second training process on the same machine, with OpenMP's
threads waiting passively (kdcache's default) or spinning (OpenMP's own default), side by side in one run.

On a 2-core machine the FFCV loader's threads and torch's OpenMP threads spin while they wait for work; a
second process's threads then burn each other's time slices and the epoch time grows far beyond 2x.

    kdcache prepare fashion-mnist --limit 4096 --out /tmp/fm4096
    python tools/bench_shared_cores.py --data /tmp/fm4096
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def train(data: str, out: Path, env: dict, model: str, epochs: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kdcache", "train-student", "--data", data, "--model", model, "--epochs", str(epochs),
           "--kd", "none", "--batch-size", "128", "--out", str(out), "--no-progress", "--eval-every", str(epochs)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def epoch_time(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["epoch_time_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-cores-"))
    rows = {}
    for policy in ("PASSIVE", "ACTIVE"):
        env = dict(os.environ, OMP_WAIT_POLICY=policy)
        alone = train(args.data, tmp / f"{policy}-alone", env, args.model, args.epochs)
        alone.wait()
        pair = [train(args.data, tmp / f"{policy}-pair{i}", env, args.model, args.epochs) for i in range(2)]
        for proc in pair:
            proc.wait()
        a = epoch_time(tmp / f"{policy}-alone")
        b = max(epoch_time(tmp / f"{policy}-pair{i}") for i in range(2))
        rows[policy] = (a, b)
        print(f"OMP_WAIT_POLICY={policy}: epoch alone {a:.2f} s, with a second training process {b:.2f} s "
              f"({b / a:.2f}x)", flush=True)
    print(f"passive / active epoch time alone: {rows['PASSIVE'][0] / rows['ACTIVE'][0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
