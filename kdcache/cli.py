"""The `kdcache` command: parse arguments, call library functions, print. Nothing else lives here."""

import argparse
import json
import sys
from pathlib import Path

from kdcache import __version__
from kdcache.errors import KdcacheError


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="canonical dataset: webdataset shards + FFCV beton + manifest")
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    common.add_argument("--limit", type=int, default=None, help="keep the first N samples of each split")
    common.add_argument("--max-side", type=int, default=None,
                        help="resize so the longest side is at most this (default: 500; Fashion-MNIST: keep 28)")
    common.add_argument("--jpeg-quality", type=int, default=90, help="quality of the one JPEG encode (default 90)")
    common.add_argument("--view-size", type=int, default=None,
                        help="default view size for later commands (default: 32 Fashion-MNIST, 224 otherwise)")
    common.add_argument("--shard-size", type=int, default=10000, help="samples per webdataset shard (default 10000)")
    common.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    common.add_argument("--skip-bad", action="store_true", help="skip bad samples and record them in the manifest")
    common.add_argument("--overwrite", action="store_true", help="replace a dataset prepared from other input")
    f = sources.add_parser("fashion-mnist", parents=[common], help="Debian's dataset-fashion-mnist IDX files")
    f.add_argument("--root", default=None, help="folder with the IDX files (default /usr/share/datasets/fashion-mnist)")
    i = sources.add_parser("imagefolder", parents=[common], help="ROOT/train/<class>/*, ROOT/val/<class>/*")
    i.add_argument("root", help="folder holding train/ and val/")
    w = sources.add_parser("wds", parents=[common], help="timm-style shards, e.g. 'imagenet1k-train-{0000..1023}.tar'")
    w.add_argument("pattern", help="train shards: brace pattern or glob")
    w.add_argument("--val", default=None, help="validation shards: brace pattern or glob")
    w.add_argument("--num-classes", type=int, default=None, help="class count (default: largest train label + 1)")


def _cmd_prepare(args) -> int:
    from kdcache.data import sources
    from kdcache.data.canonical import CanonicalSettings
    from kdcache.data.prepare import prepare
    if args.source == "fashion-mnist":
        src = sources.fashion_mnist(args.root or sources.FASHION_MNIST_DIR, limit=args.limit)
    elif args.source == "imagefolder":
        src = sources.imagefolder(args.root, limit=args.limit)
    else:
        src = sources.wds(args.pattern, val_pattern=args.val, num_classes=args.num_classes, limit=args.limit)
    max_side = args.max_side if args.max_side is not None else src.max_side
    settings = CanonicalSettings(max_side=max_side, jpeg_quality=args.jpeg_quality)
    ds = prepare(src, args.out, settings, shard_size=args.shard_size, workers=args.workers,
                 skip_bad=args.skip_bad, overwrite=args.overwrite, view_size=args.view_size)
    s = ds.summary()
    counts = ", ".join(f"{k} {v['num_samples']}" for k, v in s["splits"].items())
    print(f"prepared {ds.root}: {counts} samples, {ds.num_classes} classes, fingerprint {ds.fingerprint[:16]}")
    return 0


def _cmd_info(args) -> int:
    from kdcache.info import describe, render_text
    info = describe(Path(args.path))
    print(json.dumps(info, indent=1) if args.json else render_text(info))
    return 0


def _cmd_preview(args) -> int:
    from kdcache.augment.preview import preview
    from kdcache.augment.recipe import recipe_from_args
    from kdcache.data.dataset import PreparedDataset
    ds = PreparedDataset.open(args.data)
    recipe = recipe_from_args(args, ds.view_size)
    result = preview(ds.split(args.split), recipe, args.seed, args.samples, args.seeds, args.out)
    print(f"wrote {result['out']}: {result['identical']}/{result['views']} views identical "
          "(teacher-side render vs FFCV replay)")
    return 0 if result["identical"] == result["views"] else 1


def build_parser() -> argparse.ArgumentParser:
    from kdcache.augment.recipe import add_recipe_args
    parser = argparse.ArgumentParser(prog="kdcache", description="kdcache: the teacher once over augmented views; students replay them with cached soft labels.")
    parser.add_argument("--version", action="version", version=f"kdcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    p = sub.add_parser("info", help="describe a prepared dataset (or a cache)")
    p.add_argument("path", help="dataset directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("preview", help="teacher-side and FFCV-side views of the same (i, s), side by side")
    p.add_argument("data", type=Path, help="prepared dataset directory")
    p.add_argument("--split", default="train")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seeds", type=int, default=4, help="augmentation seeds 0..N-1")
    p.add_argument("--seed", type=int, default=0, help="global seed")
    p.add_argument("--out", type=Path, default=Path("views.png"))
    add_recipe_args(p)
    return parser


COMMANDS = {"prepare": _cmd_prepare, "info": _cmd_info, "preview": _cmd_preview}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except KdcacheError as exc:
        print(f"kdcache: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
