"""`kdcache info`: what a path holds (a prepared dataset; later also a teacher cache), as JSON or text."""

from pathlib import Path

from kdcache.data.dataset import MANIFEST, PreparedDataset
from kdcache.errors import KdcacheError


def describe(path: Path) -> dict:
    if (path / MANIFEST).is_file():
        return PreparedDataset.open(path).summary()
    raise KdcacheError(f"{path}: neither a prepared dataset nor a kdcache cache")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def render_text(info: dict) -> str:
    if info["kind"] == "dataset":
        lines = [f"dataset   {info['path']}",
                 f"classes   {info['num_classes']}" + (f" ({', '.join(info['class_names'][:6])}"
                                                       f"{', ...' if len(info['class_names']) > 6 else ''})"
                                                       if info.get("class_names") else ""),
                 f"view size {info['view_size']}",
                 f"canonical max side {info['canonical']['max_side']}, JPEG quality {info['canonical']['jpeg_quality']}",
                 f"fingerprint {info['fingerprint']}",
                 f"size on disk {_dir_size(Path(info['path'])) / 2**20:.1f} MiB"]
        for name, s in info["splits"].items():
            lines.append(f"  {name:<6} {s['num_samples']:>9} samples in {s['num_shards']} shards"
                         + (f", {s['skipped']} skipped" if s["skipped"] else ""))
        return "\n".join(lines)
    raise KdcacheError(f"unknown kind {info['kind']!r}")
