"""Run logs: metrics.jsonl (one JSON object per log interval and per evaluation) and curves.png."""

import json
from pathlib import Path
from typing import List

from kdcache.files import atomic_file, atomic_write


class MetricsLog:
    def __init__(self, path: Path, truncate_after_epoch: int = None):
        self.path = Path(path)
        if truncate_after_epoch is not None and self.path.exists():  # resume: drop lines of the unfinished epoch
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("epoch", 0) < truncate_after_epoch]
            atomic_write(self.path, "".join(k + "\n" for k in keep))   # a kill here leaves the old log whole

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> List[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l] if self.path.exists() else []


def plot_curves(records: List[dict], out: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        a.plot([r["epoch_float"] for r in train], [r["loss"] for r in train], lw=1)
    a.set_xlabel("epoch")
    a.set_ylabel("train loss")
    a.grid(alpha=0.3)
    if evals:
        b.plot([r["epoch"] + 1 for r in evals], [r["top1"] for r in evals], marker="o", label="model")
        if any("ema_top1" in r for r in evals):
            b.plot([r["epoch"] + 1 for r in evals if "ema_top1" in r], [r["ema_top1"] for r in evals if "ema_top1" in r],
                   marker="s", label="EMA")
        b.legend()
    b.set_xlabel("epoch")
    b.set_ylabel("val top-1 (%)")
    b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)
