"""The `kdcache` command: parse arguments, call library functions, print. Nothing else lives here."""

import argparse
import json
import os
import sys
from pathlib import Path

from kdcache import __version__
from kdcache.errors import KdcacheError
from kdcache.seeds import seed_ranges as _ranges

HELP = {
    "prepare": "canonical dataset: webdataset shards + FFCV beton + manifest",
    "fashion-mnist": "Debian's dataset-fashion-mnist IDX files",
    "imagefolder": "ROOT/train/<class>/*, ROOT/val/<class>/*",
    "wds": "timm-style shards, e.g. 'imagenet1k-train-{0000..1023}.tar'",
    "dump-teacher": "run the teacher once over views (i, s) and store top-k in a Zarr cache",
    "verify": "check a cache: completeness, fill values, ranges; --replay re-runs the teacher",
    "train-student": "train a student: cached KD (--cache), online KD, or no KD",
    "run": "run a pipeline recipe (prepare, teacher, dump, students, report); resumes",
    "ls": "list the caches under a cache root (directory, s3:// URL, or a published http(s):// root)",
    "copy": "copy a cache between stores (finished units only, checksummed, resumable)",
    "derive": "write a smaller cache from a cache: a smaller k (exact), some seeds, some teachers",
    "publish": "write a cache root's index (sizes, CRC32C) so that it can be served read-only over HTTP(S)",
    "plan": "before a dump: its time, the cache's bytes, and after how many students it pays for itself",
    "info": "describe a prepared dataset or a teacher cache",
    "preview": "teacher-side and FFCV-side views of the same (i, s), side by side",
}


class _FormerSpelling(argparse.Action):
    """A former spelling of an option: its value goes to the option, with a one-line warning."""

    def __init__(self, option_strings, dest, new: str = "", command: str = "", **kw):
        super().__init__(option_strings, dest, **kw)
        self.new, self.command = new, command

    def __call__(self, parser, namespace, values, option_string=None):
        from kdcache.option import deprecated
        deprecated(option_string, self.new, self.command)
        setattr(namespace, self.dest, values)


def _argument(opt) -> dict:
    """argparse's keywords for one declared option (kdcache.option.Option)."""
    kw = dict(help=opt.help_text() or None)
    if opt.type is bool:
        return dict(kw, action="store_true")
    if opt.type is not str:
        kw["type"] = opt.type
    if not opt.positional:
        kw["default"] = opt.default
        if opt.required and not opt.exclusive:
            kw["required"] = True
    for name in ("choices", "nargs", "metavar"):
        if getattr(opt, name) is not None:
            kw[name] = list(opt.choices) if name == "choices" else getattr(opt, name)
    return kw


def add_options(parser: argparse.ArgumentParser, command: str, declared: dict) -> None:
    """The parser's arguments, made from the declarations (kdcache.options): groups, exclusive sets, and each
    former spelling, hidden from --help, warning when used."""
    from functools import partial
    groups, exclusive = {}, {}
    for opt in declared.values():
        where = parser
        if opt.group:
            where = groups.get(opt.group) or groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        if opt.exclusive:
            if opt.exclusive not in exclusive:
                exclusive[opt.exclusive] = where.add_mutually_exclusive_group(required=opt.required)
            where = exclusive[opt.exclusive]
        where.add_argument(opt.flag, **_argument(opt))
        for old in opt.old:
            kw = {k: v for k, v in _argument(opt).items() if k in ("type", "nargs", "metavar")}
            parser.add_argument(old, dest=opt.dest, action=partial(_FormerSpelling, new=opt.flag, command=command),
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def _add_command(sub, command: str) -> argparse.ArgumentParser:
    from kdcache.options import PREPARE_SOURCES, options
    p = sub.add_parser(command, help=HELP[command])
    if command == "prepare":
        sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
        for source in PREPARE_SOURCES:
            add_options(sources.add_parser(source, help=HELP[source]), command, options(command, source))
    else:
        add_options(p, command, options(command))
    return p


def _cmd_prepare(args) -> int:
    from kdcache.data.config import prepare_dataset
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
    result = preview(ds.split(args.split), recipe, args.view_global_seed, args.samples, args.num_seeds, args.out)
    print(f"wrote {result['out']}: {result['identical']}/{result['views']} views identical "
          "(teacher-side render vs FFCV replay)")
    return 0 if result["identical"] == result["views"] else 1


def _cmd_dump(args) -> int:
    from kdcache import DumpConfig, dump_teacher
    cfg = DumpConfig.from_options(args)
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


def _cmd_verify(args) -> int:
    from kdcache import VerifyConfig, verify_cache, verify_report_text
    report = verify_cache(VerifyConfig.from_options(args))
    print(json.dumps(report, indent=1) if args.json else verify_report_text(report))
    return 0 if report["ok"] else 1


def _cmd_train(args) -> int:
    from kdcache import TrainConfig, train_student
    if args.resume:
        path = args.resume / "config.json"
        if not path.is_file():
            raise KdcacheError(f"{args.resume}: not a train-student run directory (no config.json)")
        cfg = TrainConfig(**json.loads(path.read_text()))
        s = train_student(cfg, resume=True)
    else:
        s = train_student(TrainConfig.from_options(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train-student ({s['mode']}): {s['model']} {s['epochs']} epochs, val top-1 {s['final_top1']:.2f} % "
              f"(best {s['best_top1']:.2f} %), {s['epoch_time_s']:.1f} s/epoch, {s['img_per_s']:.0f} img/s -> "
              f"{args.resume or args.out}")
    return 0


def _load_toml_defaults(parser: argparse.ArgumentParser, argv) -> None:
    """--config FILE: the TOML's keys become defaults of the matching options; flags still win."""
    import tomllib
    from kdcache.options import table_values
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    try:
        table = tomllib.loads(known.config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KdcacheError(f"{known.config}: cannot read recipe: {exc}") from exc
    values = table_values("train-student", table, str(known.config),
                          reserved={"config": "a recipe does not name another recipe"})
    parser._subparsers._group_actions[0].choices["train-student"].set_defaults(**values)


def _cmd_run(args) -> int:
    from kdcache.pipeline import run_pipeline
    run_pipeline(args.recipe, out=args.out, full=args.full, seed=args.seed, device=args.device)
    return 0


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
    from kdcache import CopyConfig, copy_cache
    if args.publish and not args.root:
        raise KdcacheError("copy --publish publishes the cache root DST: give --root too")
    s = copy_cache(CopyConfig.from_options(args))
    print(f"copy: {s['units_copied']} units ({s['bytes_copied'] / 2**20:.1f} MiB) copied, {s['units_already_there']} "
          f"already there, in {s['seconds']:.1f} s; seeds complete at the destination {_ranges(s['seeds_complete'])} "
          f"-> {s['destination']}")
    for line in s["damaged"]:
        print(f"kdcache: error: {s['source']}: {line}: not copied", file=sys.stderr)
    if args.publish:
        from kdcache import PublishConfig, publish_root
        published = publish_root(PublishConfig(root=str(args.dst), progress=not args.no_progress))
        return max(1 if s["damaged"] else 0, _report_publish(published, as_json=False))
    return 1 if s["damaged"] else 0


def _cmd_derive(args) -> int:
    from kdcache import DeriveConfig, derive_cache
    s = derive_cache(DeriveConfig.from_options(args))
    print(f"derive: {s['units_written']} units written, {s['units_already_there']} already there, in "
          f"{s['seconds']:.1f} s; teachers {', '.join(s['teachers'])}, {s['targets']}, seeds complete "
          f"{_ranges(s['seeds_complete'])} -> {s['destination']}")
    for line in s["damaged"]:
        print(f"kdcache: error: {s['source']}: {line}: not derived", file=sys.stderr)
    return 1 if s["damaged"] else 0


def _cmd_publish(args) -> int:
    from kdcache import PublishConfig, publish_root
    return _report_publish(publish_root(PublishConfig.from_options(args)), args.json)


def _report_publish(s: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(s, indent=1))
    else:
        print(f"publish: generation {s['generation']}: {len(s['caches'])} caches, {s['units']} units, {s['objects']} "
              f"objects ({s['bytes'] / 2**20:.1f} MiB); {s['hashed']} checksums computed ({s['hashed_bytes'] / 2**20:.1f} "
              f"MiB read), {s['reused']} kept from the previous index, in {s['seconds']:.1f} s -> {s['index']}")
    for line in s["damaged"] + s["unreadable"]:
        print(f"kdcache: error: {line}", file=sys.stderr)
    return 1 if s["damaged"] or s["unreadable"] else 0


def _cmd_plan(args) -> int:
    from kdcache import PlanConfig, plan_cache, plan_report_text
    result = plan_cache(PlanConfig.from_options(args))
    print(json.dumps(result, indent=1) if args.json else plan_report_text(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The kdcache command's parser, every subcommand's arguments made from kdcache.options' declarations."""
    parser = argparse.ArgumentParser(prog="kdcache", description="kdcache: the teacher once over augmented views; students replay them with cached soft labels.")
    parser.add_argument("--version", action="version", version=f"kdcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in ("prepare", "dump-teacher", "verify", "train-student", "run", "ls", "copy", "derive", "publish",
                    "plan", "info", "preview"):
        _add_command(sub, command)
    return parser


COMMANDS = {"ls": _cmd_ls, "copy": _cmd_copy, "derive": _cmd_derive, "publish": _cmd_publish, "plan": _cmd_plan, "prepare": _cmd_prepare, "info": _cmd_info, "preview": _cmd_preview, "dump-teacher": _cmd_dump,
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
