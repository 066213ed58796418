"""The `kdcache` command: parse arguments, call library functions, print. Nothing else lives here."""

import argparse
import json
import os
import sys
from pathlib import Path

from kdcache import __version__
from kdcache.errors import KdcacheError
from kdcache.options import parse_seeds, parse_size, seed_ranges as _ranges


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
    i.add_argument("--shuffle-seed", type=int, default=None,
                   help="train order: a permutation of the class-sorted listing (needed for mixing recipes, "
                        "which pair consecutive samples; default: class order)")
    w = sources.add_parser("wds", parents=[common], help="timm-style shards, e.g. 'imagenet1k-train-{0000..1023}.tar'")
    w.add_argument("pattern", help="train shards: brace pattern or glob")
    w.add_argument("--val", default=None, help="validation shards: brace pattern or glob")
    w.add_argument("--num-classes", type=int, default=None, help="class count (default: largest train label + 1)")


def _cmd_prepare(args) -> int:
    from kdcache.options import prepare_dataset
    ds = prepare_dataset(args)
    s = ds.summary()
    counts = ", ".join(f"{k} {v['num_samples']}" for k, v in s["splits"].items())
    print(f"prepared {ds.root}: {counts} samples, {ds.num_classes} classes, fingerprint {ds.fingerprint[:16]}")
    return 0


def _cmd_info(args) -> int:
    from kdcache.info import describe, render_text
    info = describe(args.path)
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


def _add_teacher_args(p) -> None:
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default=None, help="timm model name")
    g.add_argument("--teacher-module", default=None,
                   help="'package.module:factory' for a model timm does not have, called as factory(num_classes=C)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--teacher-checkpoint", default=None, help="local weights: .safetensors or torch checkpoint")
    src.add_argument("--random-teacher", action="store_true", help="random weights from the global seed (tests, smoke runs)")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="input mean (default: the model's pretrained_cfg)")
    g.add_argument("--std", type=float, nargs=3, default=None, help="input std (default: the model's pretrained_cfg)")


def _add_dump(sub) -> None:
    from kdcache.augment.recipe import add_recipe_args
    p = sub.add_parser("dump-teacher", help="run the teacher once over views (i, s) and store top-k in a Zarr cache")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset (its train split is dumped)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", default=None, help="the cache: a directory or s3:// URL (created, or extended/resumed)")
    where.add_argument("--cache-root", default=None,
                       help="a directory or s3:// URL holding many caches: the cache of this teacher, data and recipe "
                            "is found there (extended/resumed) or created (kdcache ls ROOT lists them)")
    p.add_argument("--seeds", required=True, type=parse_seeds, help="augmentation seeds A:B (B excluded)")
    p.add_argument("--topk", type=int, default=10, help="teacher outputs kept per view (default 10)")
    _add_teacher_args(p)
    p.add_argument("--seed", type=int, default=0, help="global seed: view parameters and random teacher init")
    p.add_argument("--batch-size", type=int, default=256, help="views per teacher forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (under torchrun: the local GPU)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    p.add_argument("--workers", type=int, default=None, help="render threads (default: usable cores; on a GPU two fewer, for the threads that feed it and write)")
    p.add_argument("--values-dtype", default="uint16", choices=["uint16", "float32"],
                   help="top-k log-probabilities as uint16 fixed point (step 1/2048, default) or float32")
    p.add_argument("--unit-size", type=int, default=None,
                   help="samples per work unit = Zarr shard (default: the existing cache's, else 32768; smaller for "
                        "more parallel writers)")
    p.add_argument("--seeds-per-pass", type=int, default=32,
                   help="seeds rendered per decode of a block and claimed together (default 32)")
    p.add_argument("--claim-ttl", type=float, default=300.0,
                   help="seconds without a heartbeat after which another writer's unit claim is stale (default 300)")
    p.add_argument("--no-progress", action="store_true")
    add_recipe_args(p)


def _cmd_dump(args) -> int:
    from kdcache.options import dump_config
    from kdcache.teacher.dump import dump_teacher
    cfg = dump_config(args)
    s = dump_teacher(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        missing = sorted(set(args.seeds) - set(s["seeds_complete"]))
        rate = f", {s['img_per_s']:.0f} img/s, {s['views_per_s']:.0f} views/s" if s["img_per_s"] else ""
        print(f"dump-teacher: {s['views_written']} views written in {s['seconds']:.1f} s{rate}; "
              f"seeds complete {_ranges(s['seeds_complete'])}"
              + (f"; seeds not complete {_ranges(missing)} (units held by another writer?)" if missing else "")
              + f"; {s['bytes_on_disk'] / 2**20:.1f} MiB on disk -> {s['cache']}")
        return 0 if not missing else 1
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a cache: completeness, fill values, ranges; --replay re-runs the teacher")
    p.add_argument("cache", help="cache directory or s3:// URL")
    p.add_argument("--replay", type=int, default=0, metavar="N", help="re-render N random views and re-run the teacher")
    p.add_argument("--teacher-checkpoint", default=None, help="weights to replay with (default: the recorded checkpoint)")
    p.add_argument("--teacher-module", default=None, metavar="PACKAGE.MODULE:FACTORY",
                   help="the factory of a teacher that came from a module: verify never imports the module a cache "
                        "names (importing runs its code), only this one")
    p.add_argument("--data", type=Path, default=None, help="prepared dataset (default: the recorded path)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="which views are drawn for --replay")
    # defaults by precision (kdcache.teacher.verify.THRESHOLDS): fp32 dump and replay on the CPU, or reduced
    p.add_argument("--min-agreement", type=float, default=None,
                   help="replay passes at this top-1 agreement (default 0.999 fp32 on CPU, else 0.99)")
    p.add_argument("--max-kl", type=float, default=None,
                   help="replay passes at this mean KL(fresh || cached) over the k + 1 stored bins (default 1e-4 fp32 on CPU, else 1e-3)")
    p.add_argument("--max-tail-error", type=float, default=None,
                   help="replay passes at this mean relative tail-mass error (default 1e-3 fp32 on CPU, else 0.2)")
    p.add_argument("--json", action="store_true")


def _cmd_verify(args) -> int:
    from kdcache.teacher.verify import verify, render_report
    report = verify(args.cache, replay=args.replay, checkpoint=args.teacher_checkpoint, data=args.data,
                    device=args.device, seed=args.seed, min_agreement=args.min_agreement, max_kl=args.max_kl,
                    max_tail_error=args.max_tail_error, teacher_module=args.teacher_module)
    print(json.dumps(report, indent=1) if args.json else render_report(report))
    return 0 if report["ok"] else 1


def _add_train(sub) -> None:
    from kdcache.augment.recipe import TRAIN_RENAMED, add_recipe_args
    p = sub.add_parser("train-student", help="train a student: cached KD (--cache), online KD, or no KD")
    p.add_argument("--config", type=Path, default=None,
                   help="TOML recipe: keys are these options' long names (dashes or underscores); flags override it")
    p.add_argument("--resume", type=Path, default=None, metavar="RUNDIR", help="continue an interrupted run")
    p.add_argument("--data", type=Path, help="prepared dataset")
    p.add_argument("--model", help="timm model name of the student")
    p.add_argument("--epochs", type=int)
    p.add_argument("--out", type=Path, help="run directory")
    p.add_argument("--cache", default=None, help="teacher cache (cached KD): a directory or s3:// URL")
    p.add_argument("--cache-root", default=None,
                   help="cached KD from the cache for --data found under this root (kdcache ls ROOT)")
    p.add_argument("--cache-id", default=None, help="with --cache-root: the cache's id, when several match")
    p.add_argument("--teacher-sha256", default=None,
                   help="with --cache-root: the teacher's weights hash (a prefix will do), when several match")
    p.add_argument("--kd", choices=["online", "none"], default=None,
                   help="online: the teacher runs in the loop on the same views; none: plain supervised training")
    _add_teacher_args(p)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--opt", default="sgd", help="timm optimizer name: sgd, adamw, lamb, ...")
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 (sgd), 1e-3 (adamw), 5e-3 (lamb) x batch/256")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--sched", default="cosine", help="timm scheduler name")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--warmup-lr", type=float, default=1e-5)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm")
    p.add_argument("--model-ema-decay", type=float, default=0.0, help="EMA of the weights (timm ModelEmaV3); 0 = off")
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: usable cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="the student's initialisation and sample order (default 0)")
    p.add_argument("--view-global-seed", type=int, default=None,
                   help="global seed of the views: cached KD takes the cache's; --kd online/none default to 0, "
                        "dump-teacher's default, so the baselines see the cache's views")
    p.add_argument("--view-seeds", type=parse_seeds, default=None,
                   help="A:B: augmentation seeds cycled over passes (cache: a subset of its seeds; "
                        "none/online: default one new seed per pass)")
    p.add_argument("--mix-labels", action="store_true",
                   help="cached KD from a cache dumped without mixing: the loader mixes the views (--mixup/--cutmix) "
                        "and the target is the lambda-mix of the two cached distributions (FKD/ReLabel)")
    p.add_argument("--seed-choice", default="cycle", choices=["cycle", "per-sample"],
                   help="cache: epoch e uses seed e mod S (cycle), or each sample draws a stored seed (per-sample)")
    g = p.add_argument_group("loss")
    g.add_argument("--kd-loss", default="kd", choices=["kd", "dkd"], help="vanilla KD (KL) or DKD")
    g.add_argument("--kd-weight", type=float, default=1.0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--hard-loss", default=None, choices=["none", "ce", "bce"],
                   help="hard-label term (default: none with KD, ce without)")
    g.add_argument("--hard-weight", type=float, default=1.0)
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing of the hard-label term")
    g.add_argument("--dkd-alpha", type=float, default=1.0)
    g.add_argument("--dkd-beta", type=float, default=8.0)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--crop-pct", type=float, default=0.875, help="eval: centre crop of this fraction of the short side")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("training size (progressive resizing, FFCV's names and ramp)")
    g.add_argument("--size", type=parse_size, default=None, metavar="N|START:END",
                   help="the student's image size: fixed N, or START up to --ramp-start, then a linear ramp "
                        "(multiples of --size-step) to END at --ramp-end; the views (crop box, augmentations, "
                        "cached teacher answers) stay those of the recipe's size (default: the views' size)")
    g.add_argument("--ramp-start", type=int, default=None,
                   help="last epoch at START, counted from 0 (default: floor(epochs * 65/88) as ffcv-imagenet, "
                        "before --ramp-end)")
    g.add_argument("--ramp-end", type=int, default=None,
                   help="first epoch at END (default: floor(epochs * 76/88), at most the last epoch; a ramp by 1.5x "
                        "or more that trains END for less than half of the epochs is warned about, with the numbers)")
    g.add_argument("--size-step", type=int, default=32,
                   help="ramp sizes are multiples of this (FFCV: 32; e.g. 8 for 32-px images)")
    g.add_argument("--val-res", type=int, default=None,
                   help="evaluation size (centre crop; default: the last training size)")
    add_recipe_args(p, renamed=TRAIN_RENAMED)


def _cmd_train(args) -> int:
    from kdcache.options import train_config
    from kdcache.student.train import TrainConfig, train_student
    if args.resume:
        path = args.resume / "config.json"
        if not path.is_file():
            raise KdcacheError(f"{args.resume}: not a train-student run directory (no config.json)")
        cfg = TrainConfig(**json.loads(path.read_text()))
        s = train_student(cfg, resume=True)
    else:
        s = train_student(train_config(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train-student ({s['mode']}): {s['model']} {s['epochs']} epochs, val top-1 {s['final_top1']:.2f} % "
              f"(best {s['best_top1']:.2f} %), {s['epoch_time_s']:.1f} s/epoch, {s['img_per_s']:.0f} img/s -> "
              f"{args.resume or args.out}")
    return 0


def _load_toml_defaults(parser: argparse.ArgumentParser, argv) -> None:
    """--config FILE: the TOML's keys become defaults of the matching options; flags still win."""
    import tomllib
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    try:
        table = tomllib.loads(known.config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KdcacheError(f"{known.config}: cannot read recipe: {exc}") from exc
    sub = parser._subparsers._group_actions[0].choices["train-student"]
    dests = {a.dest: a for a in sub._actions}
    defaults = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in dests or dest in ("config", "help"):
            raise KdcacheError(f"{known.config}: unknown setting {key!r}")
        action = dests[dest]
        if dest in ("view_seeds",) and isinstance(value, str):
            value = parse_seeds(value)
        elif dest == "size" and value is not None:
            value = parse_size(value)
        elif action.type is Path and value is not None:
            value = Path(value)
        defaults[dest] = value
    sub.set_defaults(**defaults)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a pipeline recipe (prepare, teacher, dump, students, report); resumes")
    p.add_argument("recipe", type=Path, help="pipeline TOML, e.g. pipelines/demo-fashion-mnist.toml")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: the recipe's, under runs/)")
    p.add_argument("--full", action="store_true", help="the recipe's full-size variant (its [full] tables)")
    p.add_argument("--seed", type=int, default=None, help="the students' global seed (default: the recipe's)")
    p.add_argument("--device", default=None, help="device for every step (default: auto)")


def _cmd_run(args) -> int:
    from kdcache.pipeline import run_pipeline
    run_pipeline(args.recipe, out=args.out, full=args.full, seed=args.seed, device=args.device)
    return 0


def _add_sharing(sub) -> None:
    p = sub.add_parser("ls", help="list the caches under a cache root (directory or s3:// URL)")
    p.add_argument("root", help="cache root")
    p.add_argument("--json", action="store_true", help='machine-readable: {"caches": [{"id", "path", "seeds_complete", ...}]}')
    p = sub.add_parser("copy", help="copy a cache between stores (finished units only, checksummed, resumable)")
    p.add_argument("src", help="source cache (directory or s3:// URL)")
    p.add_argument("dst", help="destination cache, or with --root the cache root to put it under")
    p.add_argument("--root", action="store_true", help="DST is a cache root: the copy goes to DST/<cache id>")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="copy only these seeds A:B (default: all)")
    p.add_argument("--workers", type=int, default=8, help="units copied at once (default 8)")
    p.add_argument("--no-progress", action="store_true")


def _cmd_ls(args) -> int:
    from kdcache.cache.catalog import describe, list_caches, render_ls
    unreadable = []
    entries = [describe(c) for c in list_caches(args.root, unreadable)]
    print(json.dumps({"root": str(args.root), "caches": entries, "unreadable": unreadable}, indent=1) if args.json
          else render_ls(entries, unreadable))
    for u in unreadable:
        print(f"kdcache: error: {u['error']}", file=sys.stderr)
    for e in entries:
        for p in e["problems"]:
            print(f"kdcache: error: {p}", file=sys.stderr)
    return 1 if unreadable or any(e["problems"] for e in entries) else 0


def _cmd_copy(args) -> int:
    from kdcache.cache.catalog import cache_id
    from kdcache.cache.copy import copy_cache
    from kdcache.cache.location import Location
    from kdcache.cache.schema import TeacherCache
    dst = args.dst
    if args.root:
        dst = str(Location.of(args.dst).child(cache_id(TeacherCache.open(args.src).spec)))
    s = copy_cache(args.src, dst, seeds=args.seeds, workers=args.workers, progress=not args.no_progress)
    print(f"copy: {s['units_copied']} units ({s['bytes_copied'] / 2**20:.1f} MiB) copied, {s['units_already_there']} "
          f"already there, in {s['seconds']:.1f} s; seeds complete at the destination {_ranges(s['seeds_complete'])} "
          f"-> {s['destination']}")
    for line in s["damaged"]:
        print(f"kdcache: error: {s['source']}: {line}: not copied", file=sys.stderr)
    return 1 if s["damaged"] else 0


def build_parser() -> argparse.ArgumentParser:
    from kdcache.augment.recipe import add_recipe_args
    parser = argparse.ArgumentParser(prog="kdcache", description="kdcache: the teacher once over augmented views; students replay them with cached soft labels.")
    parser.add_argument("--version", action="version", version=f"kdcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_dump(sub)
    _add_verify(sub)
    _add_train(sub)
    _add_run(sub)
    _add_sharing(sub)
    p = sub.add_parser("info", help="describe a prepared dataset or a teacher cache")
    p.add_argument("path", help="dataset or cache directory (or a cache's s3:// URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("preview", help="teacher-side and FFCV-side views of the same (i, s), side by side")
    p.add_argument("data", type=Path, help="prepared dataset directory")
    p.add_argument("--split", default="train")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seeds", type=int, default=4, help="augmentation seeds 0..N-1")
    p.add_argument("--seed", type=int, default=0, help="global seed")
    p.add_argument("--out", type=Path, default=Path("views.png"))
    add_recipe_args(p)
    _show_defaults(parser)
    return parser


class _DefaultsHelp(argparse.HelpFormatter):
    """--help shows every option's default (a default only in config.json once cost a user a whole run),
    unless the help text already says it, or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False)
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _DefaultsHelp
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default not in (None, False):
            action.help = "(default: %(default)s)"  # argparse prints nothing at all for an option without help
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)


COMMANDS = {"ls": _cmd_ls, "copy": _cmd_copy, "prepare": _cmd_prepare, "info": _cmd_info, "preview": _cmd_preview, "dump-teacher": _cmd_dump,
            "verify": _cmd_verify, "train-student": _cmd_train, "run": _cmd_run}


def _one_line_warnings() -> None:
    """Warnings as one line, 'kdcache: warning: ...', without Python's file:line and source-line echo."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"kdcache: warning: {message}", file=file or sys.stderr)
    warnings.showwarning = show


def main(argv=None) -> None:
    _one_line_warnings()
    from kdcache.log import setup_cli_logging
    setup_cli_logging()   # the library logs; the command line shows its records as plain lines
    parser = build_parser()
    try:
        if argv is None:
            argv = sys.argv[1:]
        if argv and argv[0] == "train-student":
            _load_toml_defaults(parser, argv[1:])
        args = parser.parse_args(argv)
        from kdcache.options import check_values
        check_values(args.command, args, getattr(args, "source", None))
        code = COMMANDS[args.command](args)
    except KdcacheError as exc:
        print(f"kdcache: error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:
        if not _is_store_error(exc):
            raise
        # credentials, permissions, an unreachable endpoint: the store's own message says which
        print(f"kdcache: error: object store: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


def run(*args, check: bool = True) -> int:
    """One kdcache command in this process (tools, tests: imports and compiled code shared between commands):
    its exit code; with `check`, a failure raises SystemExit naming the command."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if check and code:
        raise SystemExit(f"kdcache {' '.join(map(str, args))} exited {code}")
    return code


def _is_store_error(exc: Exception) -> bool:
    """An error raised by the object-store client (s3fs, botocore), not a bug of kdcache's."""
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "aiohttp")
