"""A prepared dataset directory: manifest.json, and per split its shards, beton and index arrays.

    DIR/manifest.json            kind, fingerprint, classes, view size, canonicalisation, per-split summary
    DIR/_info.json               timm's webdataset info file (timm --dataset wds/... reads the shards as they are)
    DIR/<split>/<split>-NNNNNN.tar  webdataset shards (teacher input): <key>.jpg, <key>.cls
    DIR/<split>/<split>.beton    FFCV file (student input): image (same JPEG bytes), label, index
    DIR/<split>/labels.npy       int64 (N,)    label of sample i
    DIR/<split>/sizes.npy        int32 (N, 2)  canonical (height, width) of sample i
    DIR/<split>/jpeg_locations.npy  int64 (N, 3)  (shard number, byte offset, size) of sample i's .jpg member
    DIR/<split>/keys.txt         key of sample i, one per line
"""

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Dict, List

import numpy as np

from kdcache.errors import KdcacheError

MANIFEST = "manifest.json"
DATASET_FORMAT_VERSION = 1


@dataclass
class PreparedSplit:
    name: str
    root: Path
    info: dict

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def num_samples(self) -> int:
        return int(self.info["num_samples"])

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def beton_path(self) -> Path:
        return self.root / self.info["beton"]

    @property
    def shard_paths(self) -> List[Path]:
        return [self.dir / n for n in self.info["shards"]]

    @cached_property
    def labels(self) -> np.ndarray:
        return np.load(self.dir / "labels.npy")

    @cached_property
    def sizes(self) -> np.ndarray:
        return np.load(self.dir / "sizes.npy")

    @cached_property
    def jpeg_locations(self) -> np.ndarray:
        return np.load(self.dir / "jpeg_locations.npy")

    @cached_property
    def keys(self) -> List[str]:
        return (self.dir / "keys.txt").read_text().splitlines()

    def jpeg_reader(self):
        from kdcache.data.shards import JpegReader
        return JpegReader(self.dir, self.info["shards"], self.jpeg_locations)


def _stays_inside(entry) -> bool:
    """A non-empty relative path without '..': joined to a folder, it names something below that folder."""
    return (isinstance(entry, str) and entry != "" and not PurePosixPath(entry).is_absolute()
            and ".." not in PurePosixPath(entry).parts)


def _check_entries_inside(manifest_path: Path, manifest: dict) -> None:
    """Every path a manifest names (split folders, betons, shards) lies inside the dataset directory: a
    dataset may come from anyone, and its manifest must not make kdcache read files elsewhere."""
    for name, info in manifest.get("splits", {}).items():
        for entry in [name, info.get("beton"), *info.get("shards", [])]:
            if not _stays_inside(entry):
                raise KdcacheError(f"{manifest_path}: entry {entry!r} points outside the dataset directory "
                                   f"{manifest_path.parent}")


class PreparedDataset:
    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root) -> "PreparedDataset":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise KdcacheError(f"{root}: not a prepared dataset (no {MANIFEST}; run `kdcache prepare`)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise KdcacheError(f"{path}: unreadable manifest: {exc}") from exc
        if manifest.get("kind") != "dataset":
            raise KdcacheError(f"{path}: kind is {manifest.get('kind')!r}, expected 'dataset'")
        if manifest.get("format_version") != DATASET_FORMAT_VERSION:
            raise KdcacheError(f"{path}: dataset format {manifest.get('format_version')} is not "
                               f"{DATASET_FORMAT_VERSION}; prepare it again with this kdcache")
        _check_entries_inside(path, manifest)
        ds = cls(root, manifest)
        for split in ds.splits.values():
            for p in [split.beton_path, *split.shard_paths]:
                if not p.is_file():
                    raise KdcacheError(f"{p}: missing from prepared dataset {root}")
        return ds

    @property
    def splits(self) -> Dict[str, PreparedSplit]:
        return {name: PreparedSplit(name, self.root, info) for name, info in self.manifest["splits"].items()}

    def split(self, name: str) -> PreparedSplit:
        if name not in self.manifest["splits"]:
            raise KdcacheError(f"{self.root}: no split {name!r} (has {sorted(self.manifest['splits'])})")
        return self.splits[name]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def view_size(self) -> int:
        return int(self.manifest["view_size"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def summary(self) -> dict:
        return {
            "kind": "dataset",
            "path": str(self.root),
            "num_classes": self.num_classes,
            "class_names": self.manifest.get("class_names"),
            "fingerprint": self.fingerprint,
            "view_size": self.view_size,
            "source": self.manifest["source"],
            "canonical": self.manifest["canonical"],
            "splits": {name: {"num_samples": s.num_samples, "num_shards": len(s.info["shards"]),
                              "fingerprint": s.fingerprint, "skipped": len(s.info.get("skipped", []))}
                       for name, s in self.splits.items()},
        }
