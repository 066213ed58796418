"""`kdcache prepare`: canonical shards + beton + manifest, written to a temporary directory and renamed
into place when complete, so a half-written directory is never taken for a dataset."""

import datetime
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
from tqdm import tqdm

from kdcache import __version__
from kdcache.data.beton import write_beton
from kdcache.data.canonical import CanonicalSettings, canonicalize
from kdcache.data.dataset import DATASET_FORMAT_VERSION, MANIFEST, PreparedDataset
from kdcache.data.orphans import children_die_with_this_process
from kdcache.data.shards import JpegReader, ShardSink, jpeg_locations
from kdcache.data.sources import Source
from kdcache.errors import KdcacheError
from kdcache.files import atomic_file, atomic_write
from kdcache.progress import ProgressLines, duration, rate_eta


log = logging.getLogger(__name__)


class IncompatibleDataset(KdcacheError):
    """The output directory holds a dataset prepared from another source or other settings."""


def _canonicalize_sample(job):
    """Pool worker: (raw sample, settings) -> (key, label, origin, CanonicalImage or None, error or None)."""
    raw, settings = job
    if raw.error:
        return raw.key, raw.label, raw.origin, None, raw.error
    try:
        payload = raw.payload.read_bytes() if isinstance(raw.payload, Path) else raw.payload
        return raw.key, raw.label, raw.origin, canonicalize(payload, settings), None
    except Exception as exc:  # corrupt, truncated or unreadable image: reported with its file and key
        return raw.key, raw.label, raw.origin, None, f"cannot read image: {type(exc).__name__}: {exc}"


def _canonicalized(samples, settings: CanonicalSettings, pool):
    jobs = ((raw, settings) for raw in samples)
    if pool is None:
        return map(_canonicalize_sample, jobs)
    return pool.imap(_canonicalize_sample, jobs, chunksize=64)


def split_fingerprint(info: dict, num_classes: int, canonical: dict) -> str:
    blob = json.dumps({"num_samples": info["num_samples"], "shard_counts": info["shard_counts"],
                       "num_classes": num_classes, "keys_labels_sha256": info["keys_labels_sha256"],
                       "content_sha256": info["content_sha256"], "canonical": canonical}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def dataset_fingerprint(split_fingerprints: dict) -> str:
    return hashlib.sha256(json.dumps(split_fingerprints, sort_keys=True).encode()).hexdigest()


def _write_split(split: str, samples, out: Path, settings: CanonicalSettings, num_classes: Optional[int],
                 shard_size: int, skip_bad: bool, pool, workers: int, total: Optional[int] = None) -> dict:
    split_dir = out / split
    split_dir.mkdir(parents=True)
    sink = ShardSink(split_dir, split, shard_size)
    keys: List[str] = []
    first_origin = {}
    labels, sizes, skipped = [], [], []
    kl_hash, content_hash = hashlib.sha256(), hashlib.sha256()
    lines = ProgressLines()   # not a terminal: a plain line every 10 s instead of the bar
    bar = tqdm(desc=f"prepare {split}", unit="img", total=total, file=sys.stderr, mininterval=1.0,
               disable=lines.tqdm_disabled())
    t0 = time.time()
    for key, label, origin, image, error in _canonicalized(samples, settings, pool):
        if error is None and key in first_origin:
            error = f"duplicate key (first seen at {first_origin[key]})"
        if error is None and (label < 0 or (num_classes is not None and label >= num_classes)):
            error = f"label {label} out of range [0, {num_classes if num_classes is not None else 'inf'})"
        if error is not None:
            if not skip_bad:
                raise KdcacheError(f"{origin}: sample {key!r}: {error} (pass --skip-bad to skip and record it)")
            skipped.append({"key": key, "origin": origin, "reason": error})
            continue
        first_origin[key] = origin
        sink.add(key, label, image)
        keys.append(key)
        labels.append(label)
        sizes.append((image.height, image.width))
        kl_hash.update(f"{key}\t{label}\n".encode())
        content_hash.update(len(image.jpeg).to_bytes(8, "little"))
        content_hash.update(image.jpeg)
        bar.update()
        if lines.due():
            lines.line(f"prepare {split}: {len(keys)}" + (f"/{total}" if total else "") + " img, "
                       + rate_eta(len(keys) + len(skipped), total, time.time() - t0))
    bar.close()
    t_beton = time.time()
    names, counts = sink.close()
    if not keys:
        raise KdcacheError(f"split {split!r}: the source has no usable samples"
                           + (f" ({len(skipped)} skipped)" if skipped else ""))
    labels = np.asarray(labels, np.int64)
    sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
    locations = jpeg_locations(split_dir, names, keys)
    for name, array in (("labels.npy", labels), ("sizes.npy", sizes), ("jpeg_locations.npy", locations)):
        _save_npy(split_dir / name, array)
    atomic_write(split_dir / "keys.txt", "".join(k + "\n" for k in keys))
    beton = split_dir / f"{split}.beton"
    write_beton(beton, JpegReader(split_dir, names, locations), labels, sizes, workers)
    if lines.active:
        lines.line(f"prepare {split}: {len(keys)} img in {duration(time.time() - t0)} "
                   f"({len(keys) / max(t_beton - t0, 1e-9):.0f} img/s; FFCV beton {duration(time.time() - t_beton)})")
    return {"num_samples": len(keys), "shards": names, "shard_counts": counts,
            "beton": f"{split}/{beton.name}", "keys_labels_sha256": kl_hash.hexdigest(),
            "content_sha256": content_hash.hexdigest(), "max_label": int(labels.max()), "skipped": skipped}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)


def _same_input(manifest: dict, source: Source, settings: CanonicalSettings, shard_size: int) -> bool:
    return (manifest.get("format_version") == DATASET_FORMAT_VERSION
            and manifest.get("source") == source.description
            and manifest.get("canonical") == settings.to_dict()
            and manifest.get("shard_size") == shard_size)


def _set_view_size(out: Path, manifest: dict, view_size: int) -> None:
    atomic_write(out / MANIFEST, json.dumps(dict(manifest, view_size=int(view_size)), indent=1))


def _remove_stale_temporaries(out: Path) -> None:
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _existing(out: Path, source: Source, settings: CanonicalSettings, shard_size: int, overwrite: bool,
              view_size: Optional[int]) -> Optional[PreparedDataset]:
    """The dataset already at `out` when it is the one asked for (its default view size updated); None when
    `out` is to be (re)written; an error when `out` holds something else."""
    if (out / MANIFEST).is_file():
        existing = PreparedDataset.open(out)
        if _same_input(existing.manifest, source, settings, shard_size) and not overwrite:
            if view_size and view_size != existing.view_size:
                # The view size is only the later commands' default (in no fingerprint): no re-encode.
                _set_view_size(out, existing.manifest, view_size)
                log.info(f"{out}: already prepared from the same source and settings; default view size "
                         f"{existing.view_size} -> {view_size}")
                return PreparedDataset.open(out)
            log.info(f"{out}: already prepared from the same source and settings; nothing to do")
            return existing
        if not overwrite:
            raise IncompatibleDataset(f"{out}: holds a dataset prepared from another source or settings; "
                                      "pass --overwrite to replace it")
    elif out.exists() and any(out.iterdir()):
        raise KdcacheError(f"{out}: exists and is not a prepared dataset; choose another --out")
    return None


def _write_dataset(source: Source, tmp: Path, out_name: str, settings: CanonicalSettings, shard_size: int,
                   skip_bad: bool, workers: int, view_size: Optional[int]) -> None:
    """Every split, then the manifest (last: a directory with a manifest is a complete dataset)."""
    canonical = settings.to_dict()
    num_classes = source.num_classes
    # the pool's workers and FFCV's beton writers: none outlives a killed prepare (orphans.py)
    with children_die_with_this_process():
        pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
        try:
            splits = {}
            for split, make_iter in source.splits.items():
                splits[split] = _write_split(split, make_iter(), tmp, settings, num_classes, shard_size,
                                             skip_bad, pool, workers, (source.counts or {}).get(split))
                if num_classes is None:  # shards without a class count: train's labels define it
                    num_classes = splits[split]["max_label"] + 1
        finally:
            if pool is not None:
                pool.terminate()
    for info in splits.values():
        info["fingerprint"] = split_fingerprint(info, num_classes, canonical)
    manifest = {
        "kind": "dataset",
        "format_version": DATASET_FORMAT_VERSION,
        "kdcache_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source.description,
        "num_classes": num_classes,
        "class_names": source.class_names,
        "view_size": int(view_size or source.view_size),
        "canonical": canonical,
        "shard_size": shard_size,
        "fingerprint": dataset_fingerprint({s: i["fingerprint"] for s, i in splits.items()}),
        "splits": splits,
    }
    atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
    timm_info = {"name": out_name, "splits": {s: {"name": s, "num_samples": i["num_samples"],
                                                  "filenames": [f"{s}/{n}" for n in i["shards"]],
                                                  "shard_lengths": i["shard_counts"]}
                                              for s, i in splits.items()}}
    atomic_write(tmp / "_info.json", json.dumps(timm_info, indent=1))


def _move_into_place(tmp: Path, out: Path) -> None:
    # A rename of the whole directory, not atomic_write: a dataset is many files that must appear together,
    # and a directory cannot be renamed over a non-empty one, so an old dataset is moved aside first.
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def prepare(source: Source, out, settings: Optional[CanonicalSettings] = None, shard_size: int = 10000,
            workers: Optional[int] = None, skip_bad: bool = False, overwrite: bool = False,
            view_size: Optional[int] = None) -> PreparedDataset:
    """Write the canonical dataset of `source` to `out`. An existing dataset of the same input and
    settings is left as it is (returned); another one is replaced only with overwrite=True."""
    out = Path(out)
    settings = settings or CanonicalSettings(max_side=source.max_side)
    workers = workers or len(os.sched_getaffinity(0))
    if shard_size < 1:
        raise KdcacheError(f"--shard-size must be positive, got {shard_size}")
    existing = _existing(out, source, settings, shard_size, overwrite, view_size)
    if existing is not None:
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_dataset(source, tmp, out.name, settings, shard_size, skip_bad, workers, view_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, out)
    return PreparedDataset.open(out)
