"""`kdcache prepare SOURCE` options -> the source to read and the canonical settings, and the run itself."""

import argparse

from kdcache.errors import KdcacheError


def prepare_source(o: argparse.Namespace):
    """(Source, CanonicalSettings) of `kdcache prepare SOURCE ...` (parsed options, or a recipe's [prepare])."""
    from kdcache.data import sources
    from kdcache.data.canonical import CanonicalSettings
    if o.source == "fashion-mnist":
        src = sources.fashion_mnist(o.root or sources.FASHION_MNIST_DIR, limit=o.limit)
    elif o.source == "imagefolder":
        if not o.root:
            raise KdcacheError("prepare imagefolder needs ROOT (the folder holding train/ and val/)")
        src = sources.imagefolder(o.root, limit=o.limit, shuffle_seed=o.shuffle_seed)
    elif o.source == "wds":
        if not o.pattern:
            raise KdcacheError("prepare wds needs the train shards' PATTERN")
        src = sources.wds(o.pattern, val_pattern=o.val, num_classes=o.num_classes, limit=o.limit)
    else:
        raise KdcacheError(f"prepare: unknown source {o.source!r}")
    max_side = o.max_side if o.max_side is not None else src.max_side
    return src, CanonicalSettings(max_side=max_side, jpeg_quality=o.jpeg_quality)


def prepare_dataset(o: argparse.Namespace):
    """Run `kdcache prepare`: the PreparedDataset at o.out."""
    from kdcache.data.prepare import prepare
    src, settings = prepare_source(o)
    return prepare(src, o.out, settings, shard_size=o.shard_size, workers=o.workers, skip_bad=o.skip_bad,
                   overwrite=o.overwrite, view_size=o.view_size)
