"""Command options -> library inputs, in one place for the command line and for `kdcache run`.

`kdcache prepare`, `dump-teacher` and `train-student` take options; the functions here turn them into
what the library runs on: a data source and canonical settings (prepare_dataset), a DumpConfig
(dump_config), a TrainConfig (train_config). cli.py calls them with its parsed arguments; kdcache.pipeline
with the tables of a recipe, made into the same namespace by table_options (keys: the long option
names, dashes or underscores). So a recipe table means exactly what the same options mean on the
command line.

OPTIONS lists every option of those commands with its default, type and choices: the namespace a recipe
table becomes. It must match the parsers in cli.py (tests/test_options.py checks that): an option added
to a parser is added here too.
"""

import argparse
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from kdcache.errors import KdcacheError
from kdcache.student.resolution import parse_size   # (numpy only: cheap to import with the parser)


def parse_seeds(text: str):
    """'A:B' -> [A, B) ; 'A' -> [A]. Checked here, while parsing, so that a bad range creates nothing; a
    KdcacheError (one line) rather than argparse's usage text, also for a seed range from a TOML recipe."""
    try:
        a, b = (int(x) for x in text.split(":")) if ":" in text else (int(text), int(text) + 1)
    except ValueError:
        raise KdcacheError(f"seed range {text!r}: expected A:B (the seeds A to B - 1) or one seed A") from None
    if b <= a:
        raise KdcacheError(f"seed range {text!r} is empty: A:B is the seeds A to B - 1, so B must be greater than A")
    from kdcache.cache.schema import MAX_SEED
    if a < 0 or b - 1 > MAX_SEED:
        raise KdcacheError(f"seed range {text!r}: seeds are integers from 0 to {MAX_SEED} "
                           "(the cache names each with 6 digits)")
    return list(range(a, b))


def seed_ranges(seeds) -> str:
    """[0, 1, 2, 5] -> '0:3,5'."""
    seeds = sorted(seeds)
    if not seeds:
        return "none"
    out, start, prev = [], seeds[0], seeds[0]
    for s in seeds[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}" if start == prev else f"{start}:{prev + 1}")
        if s is not None:
            start = prev = s
    return ",".join(out)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Range:
    """An option's valid values: lo <= v <= hi (strict where *_open), finite; hi may be the usable cores."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    hi_is_cores: bool = False

    def bounds(self):
        return self.lo, (usable_cores() if self.hi_is_cores else self.hi)

    def text(self) -> str:
        lo, hi = (None if v is None else int(v) if float(v).is_integer() else v for v in self.bounds())
        cores = " (the usable cores)" if self.hi_is_cores else ""
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}{cores}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "a finite number"

    def contains(self, v) -> bool:
        lo, hi = self.bounds()
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((lo is None or (v > lo if self.lo_open else v >= lo))
                and (hi is None or (v < hi if self.hi_open else v <= hi)))


SEED = Range(0, 2**32 - 1)      # seeds go to numpy, torch and the 64-bit view hash: all take 32 bits
POSITIVE = Range(1)             # counts and sizes
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, hi_open=True)
PROBABILITY = Range(0, 1)
CORES = Range(1, hi_is_cores=True)


@dataclass(frozen=True)
class Option:
    default: Any = None
    type: Callable = str               # int, float, str, Path, bool (a flag), parse_seeds
    choices: Optional[Tuple] = None
    nargs: Optional[int] = None
    valid: Optional[Range] = None      # numbers: checked before anything is created (check_values)


def _recipe_options(renamed: Optional[dict] = None) -> Dict[str, Option]:
    """The view-recipe flags (kdcache.augment.recipe.add_recipe_args): all default to None, "not given"."""
    from kdcache.augment.recipe import DEFAULTS, RECIPE_FLAGS, flag_dest
    out = {}
    for name in RECIPE_FLAGS:
        default = DEFAULTS[name].default
        dest = flag_dest(name, renamed)
        if name in ("scale", "ratio"):
            out[dest] = Option(None, float, nargs=2)
        elif name in ("aa", "remode"):
            out[dest] = Option(None, str)
        else:
            out[dest] = Option(None, type(default))
    return out


AMP = ("auto", "bf16", "fp16", "off")
_PREPARE_COMMON = {
    "out": Option(None, Path), "limit": Option(None, int, valid=POSITIVE), "max_side": Option(None, int, valid=POSITIVE),
    "jpeg_quality": Option(90, int, valid=Range(1, 100)), "view_size": Option(None, int, valid=POSITIVE),
    "shard_size": Option(10000, int, valid=POSITIVE), "workers": Option(None, int, valid=POSITIVE),
    "skip_bad": Option(False, bool), "overwrite": Option(False, bool),
}
PREPARE_SOURCES = {
    "fashion-mnist": {"root": Option(None, str)},
    "imagefolder": {"root": Option(None, str), "shuffle_seed": Option(None, int, valid=SEED)},
    "wds": {"pattern": Option(None, str), "val": Option(None, str),
            "num_classes": Option(None, int, valid=Range(1, 2**31 - 1))},
}
_TEACHER = {
    "teacher": Option(None, str), "teacher_module": Option(None, str), "teacher_checkpoint": Option(None, str),
    "random_teacher": Option(False, bool), "mean": Option(None, float, nargs=3, valid=Range()),
    "std": Option(None, float, nargs=3, valid=Range(0, lo_open=True)),
}
_DUMP = {
    "data": Option(None, Path), "out": Option(None, str), "cache_root": Option(None, str),
    "seeds": Option(None, parse_seeds),
    "topk": Option(10, int, valid=POSITIVE), **_TEACHER, "seed": Option(0, int, valid=SEED),
    "batch_size": Option(256, int, valid=POSITIVE),
    "device": Option("auto", str), "amp": Option("auto", str, AMP), "compile": Option(False, bool),
    "workers": Option(None, int, valid=CORES), "values_dtype": Option("uint16", str, ("uint16", "float32")),
    "unit_size": Option(None, int, valid=POSITIVE), "seeds_per_pass": Option(32, int, valid=POSITIVE),
    # the heartbeat rewrites a claim every max(0.2 s, ttl / 6) (kdcache.cache.ledger): at 1 s five beats
    # still fit in a TTL; shorter ones would let a slow store's write make a live claim look stale
    "claim_ttl": Option(300.0, float, valid=Range(1)),
    "no_progress": Option(False, bool),
}
_TRAIN = {
    "config": Option(None, Path), "resume": Option(None, Path), "data": Option(None, Path),
    "model": Option(None, str), "epochs": Option(None, int, valid=POSITIVE), "out": Option(None, Path),
    "cache": Option(None, str),
    "cache_root": Option(None, str), "cache_id": Option(None, str), "teacher_sha256": Option(None, str),
    "kd": Option(None, str, ("online", "none")), **_TEACHER, "batch_size": Option(256, int, valid=POSITIVE),
    "opt": Option("sgd", str), "lr": Option(None, float, valid=NON_NEGATIVE), "momentum": Option(0.9, float, valid=FRACTION),
    "weight_decay": Option(5e-5, float, valid=NON_NEGATIVE), "sched": Option("cosine", str),
    "warmup_epochs": Option(0, int, valid=NON_NEGATIVE), "warmup_lr": Option(1e-5, float, valid=NON_NEGATIVE),
    "min_lr": Option(0.0, float, valid=NON_NEGATIVE), "clip_grad": Option(None, float, valid=Range(0, lo_open=True)),
    "model_ema_decay": Option(0.0, float, valid=FRACTION), "drop_path": Option(None, float, valid=FRACTION),
    "amp": Option("auto", str, AMP),
    "no_channels_last": Option(False, bool), "compile": Option(False, bool), "workers": Option(None, int, valid=CORES),
    "device": Option("auto", str), "seed": Option(0, int, valid=SEED), "view_global_seed": Option(None, int, valid=SEED),
    "view_seeds": Option(None, parse_seeds), "mix_labels": Option(False, bool),
    "seed_choice": Option("cycle", str, ("cycle", "per-sample")),
    "kd_loss": Option("kd", str, ("kd", "dkd")), "kd_weight": Option(1.0, float, valid=NON_NEGATIVE),
    "temperature": Option(1.0, float, valid=Range(0, lo_open=True)),
    "hard_loss": Option(None, str, ("none", "ce", "bce")), "hard_weight": Option(1.0, float, valid=NON_NEGATIVE),
    "smoothing": Option(0.0, float, valid=FRACTION), "dkd_alpha": Option(1.0, float, valid=NON_NEGATIVE),
    "dkd_beta": Option(8.0, float, valid=NON_NEGATIVE),
    "eval_every": Option(1, int, valid=POSITIVE), "crop_pct": Option(0.875, float, valid=Range(0, 1, lo_open=True)),
    "log_interval": Option(50, int, valid=POSITIVE),
    "no_progress": Option(False, bool), "size": Option(None, parse_size), "ramp_start": Option(None, int, valid=NON_NEGATIVE),
    "ramp_end": Option(None, int, valid=NON_NEGATIVE), "size_step": Option(32, int, valid=POSITIVE),
    "val_res": Option(None, int, valid=POSITIVE),
}
# the commands that have no recipe table: declared here too, so that every option's range is checked
_VERIFY = {
    "cache": Option(None, str), "replay": Option(0, int, valid=NON_NEGATIVE), "teacher_checkpoint": Option(None, str),
    "teacher_module": Option(None, str), "data": Option(None, Path), "device": Option("auto", str),
    "seed": Option(0, int, valid=SEED), "min_agreement": Option(None, float, valid=PROBABILITY),
    "max_kl": Option(None, float, valid=NON_NEGATIVE), "max_tail_error": Option(None, float, valid=NON_NEGATIVE),
    "json": Option(False, bool),
}
_PREVIEW = {
    "data": Option(None, Path), "split": Option("train", str), "samples": Option(8, int, valid=Range(1, 1024)),
    "seeds": Option(4, int, valid=Range(1, 64)), "seed": Option(0, int, valid=SEED), "out": Option(Path("views.png"), Path),
}
_OTHERS = {
    "run": {"recipe": Option(None, Path), "out": Option(None, Path), "full": Option(False, bool),
            "seed": Option(None, int, valid=SEED), "device": Option(None, str)},
    "ls": {"root": Option(None, str), "json": Option(False, bool)},
    "copy": {"src": Option(None, str), "dst": Option(None, str), "root": Option(False, bool),
             "seeds": Option(None, parse_seeds), "workers": Option(8, int, valid=Range(1, 256)),
             "no_progress": Option(False, bool)},
    "info": {"path": Option(None, str), "json": Option(False, bool)},
}


def options(command: str, source: Optional[str] = None) -> Dict[str, Option]:
    """The options of `kdcache COMMAND` (prepare: of `kdcache prepare SOURCE`), by argparse dest."""
    if command == "prepare":
        if source not in PREPARE_SOURCES:
            raise KdcacheError(f"prepare: source must be one of {', '.join(PREPARE_SOURCES)}, got {source!r}")
        return {**_PREPARE_COMMON, **PREPARE_SOURCES[source]}
    if command == "dump-teacher":
        return {**_DUMP, **_recipe_options()}
    if command == "train-student":
        from kdcache.augment.recipe import TRAIN_RENAMED
        return {**_TRAIN, **_recipe_options(TRAIN_RENAMED)}
    if command == "verify":
        return dict(_VERIFY)
    if command == "preview":
        return {**_PREVIEW, **_recipe_options()}
    if command in _OTHERS:
        return dict(_OTHERS[command])
    raise KeyError(command)


def check_values(command: str, ns: argparse.Namespace, source: Optional[str] = None, where: str = "") -> None:
    """Every numeric option of `kdcache COMMAND` within its declared range (Option.valid): one line naming
    the option, the value and the range, before anything is created."""
    for dest, opt in options(command, source).items():
        value = getattr(ns, dest, None)
        if opt.valid is None or value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if not opt.valid.contains(v):
                flag = "--" + dest.replace("_", "-")
                raise KdcacheError(f"{where + ' ' if where else ''}{flag} {v!r}: must be {opt.valid.text()}")


def _convert(opt: Option, value, where: str):
    """A TOML value -> what argparse would have made of the same option on the command line."""
    def bad(expected):
        return KdcacheError(f"{where}: expected {expected}, got {value!r}")

    def scalar(v, kind):
        if isinstance(v, bool) and kind is not bool:
            raise bad(kind.__name__)
        if kind is bool:
            if not isinstance(v, bool):
                raise bad("true or false")
            return v
        if kind is Path:
            if not isinstance(v, str):
                raise bad("a path")
            return Path(v)
        if kind is str:
            if isinstance(v, (list, dict)):
                raise bad("a string")
            return str(v)
        try:
            if kind is int and isinstance(v, float) and not v.is_integer():
                raise ValueError
            return kind(v)
        except (TypeError, ValueError):
            raise bad("an integer" if kind is int else "a number") from None

    if opt.type is parse_size:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise bad("a size N or 'START:END'")
        return parse_size(value)
    if opt.type is parse_seeds:
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
            return list(value)
        if not isinstance(value, str):
            raise bad("seeds as 'A:B' (B excluded), 'A' or a list of integers")
        try:
            return parse_seeds(value)
        except KdcacheError as exc:
            raise bad(f"seeds as 'A:B' (B excluded), 'A' or a list of integers ({exc})") from None
    if opt.nargs:
        if not isinstance(value, list) or len(value) != opt.nargs:
            raise bad(f"a list of {opt.nargs} values")
        return [scalar(v, opt.type) for v in value]
    value = scalar(value, opt.type)
    if opt.choices and value not in opt.choices:
        raise KdcacheError(f"{where}: expected one of {', '.join(map(str, opt.choices))}, got {value!r}")
    return value


def table_options(command: str, table: dict, where: str, source: Optional[str] = None,
                  reserved: Optional[Dict[str, str]] = None) -> argparse.Namespace:
    """A recipe table -> the namespace the command's parser would give for the same options: every option
    at its default, then the table's values (keys: long option names, dashes or underscores). An unknown
    key, or one in `reserved` (dest -> why it may not be set here), is an error naming `where` and the key."""
    known = options(command, source)
    reserved = reserved or {}
    values = {dest: opt.default for dest, opt in known.items()}
    seen: Dict[str, str] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest in seen:
            raise KdcacheError(f"{where}: {seen[dest]!r} and {key!r} are the same setting; keep one")
        seen[dest] = key
        if dest in reserved:
            raise KdcacheError(f"{where}: {key!r} cannot be set here: {reserved[dest]}")
        if dest not in known:
            raise KdcacheError(f"{where}: unknown setting {key!r} (not an option of kdcache {command}"
                               + (f" {source}" if source else "") + ")")
        values[dest] = _convert(known[dest], value, f"{where} {key}")
    ns = argparse.Namespace(**values)
    if source is not None:
        ns.source = source
    check_values(command, ns, source, where)
    return ns


# ---- options -> library inputs -------------------------------------------------------------------
def teacher_spec(o):
    """--teacher, --teacher-checkpoint, ... -> kdcache.models.ModelSpec (the global seed inits a random teacher)."""
    from kdcache.models import ModelSpec
    return ModelSpec(name=o.teacher, checkpoint=o.teacher_checkpoint, module=o.teacher_module,
                     random_init=o.random_teacher, seed=o.seed, mean=o.mean, std=o.std)


def prepare_source(o):
    """(Source, CanonicalSettings) of `kdcache prepare SOURCE ...`."""
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


def prepare_dataset(o):
    """Run `kdcache prepare`: the PreparedDataset at o.out."""
    from kdcache.data.prepare import prepare
    src, settings = prepare_source(o)
    return prepare(src, o.out, settings, shard_size=o.shard_size, workers=o.workers, skip_bad=o.skip_bad,
                   overwrite=o.overwrite, view_size=o.view_size)


def dump_config(o):
    """The DumpConfig of `kdcache dump-teacher ...` (the recipe's default size: the dataset's view size)."""
    from kdcache.augment.recipe import recipe_from_args
    from kdcache.data.dataset import PreparedDataset
    from kdcache.teacher.dump import DumpConfig
    missing = [n for n in ("data", "seeds") if getattr(o, n) is None]
    if o.out is None and o.cache_root is None:
        missing.insert(1, "out (or --cache-root)")
    if missing:
        raise KdcacheError("dump-teacher needs " + ", ".join("--" + m for m in missing))
    if o.out is not None and o.cache_root is not None:
        raise KdcacheError("--out and --cache-root are exclusive")
    ds = PreparedDataset.open(o.data)
    return DumpConfig(data=o.data, out=o.out, seeds=o.seeds, topk=o.topk, teacher=teacher_spec(o),
                      recipe=recipe_from_args(o, ds.view_size), global_seed=o.seed, batch_size=o.batch_size,
                      device=o.device, amp=o.amp, compile=o.compile, workers=o.workers,
                      values_dtype=o.values_dtype, unit_size=o.unit_size, claim_ttl=o.claim_ttl,
                      progress=not o.no_progress, cache_root=o.cache_root, seeds_per_pass=o.seeds_per_pass)


def train_config(o):
    """The TrainConfig of `kdcache train-student ...` (cached KD: recipe flags must agree with the cache's)."""
    from kdcache.student.train import TrainConfig
    missing = [n for n in ("data", "model", "epochs", "out") if getattr(o, n) is None]
    if missing:
        raise KdcacheError("train-student needs " + ", ".join("--" + m for m in missing))
    if o.cache_root:
        if o.cache:
            raise KdcacheError("--cache and --cache-root are exclusive")
        from kdcache.cache.catalog import find_cache
        from kdcache.data.dataset import PreparedDataset
        split = PreparedDataset.open(o.data).split("train")
        o.cache = find_cache(o.cache_root, split.fingerprint, o.cache_id, o.teacher_sha256).path
    if o.cache and o.kd:
        raise KdcacheError("--cache and --kd are exclusive (cached KD uses the cache's teacher)")
    mode = "cache" if o.cache else o.kd
    if mode is None:
        raise KdcacheError("choose a mode: --cache CACHE, --kd online (with --teacher), or --kd none")
    teacher = None
    if mode == "online":  # TrainConfig.validate checks that the teacher has weights
        teacher = asdict(teacher_spec(o))
    from kdcache.augment.recipe import (TRAIN_RENAMED, ViewRecipe, check_flags_match, given_recipe_flags,
                                        recipe_from_args)
    recipe = None
    if mode == "cache":
        from kdcache.cache.schema import TeacherCache
        cache_recipe = ViewRecipe.from_dict(TeacherCache.open(o.cache).spec.recipe)
        mixing_flags = ("mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mix_block")
        check_flags_match(o, cache_recipe, str(o.cache), allowed=mixing_flags if o.mix_labels else (),
                          renamed=TRAIN_RENAMED)
        if o.mix_labels:
            recipe = {k: v for k, v in given_recipe_flags(o, TRAIN_RENAMED).items() if k in mixing_flags}
    elif given_recipe_flags(o, TRAIN_RENAMED):
        from kdcache.data.dataset import PreparedDataset
        recipe = recipe_from_args(o, PreparedDataset.open(o.data).view_size, renamed=TRAIN_RENAMED).to_dict()
    loss = {"kd_loss": o.kd_loss if mode != "none" else "none", "kd_weight": o.kd_weight,
            "temperature": o.temperature, "hard_loss": o.hard_loss or ("ce" if mode == "none" else "none"),
            "hard_weight": o.hard_weight, "smoothing": o.smoothing, "dkd_alpha": o.dkd_alpha,
            "dkd_beta": o.dkd_beta}
    return TrainConfig(data=str(o.data), out=str(o.out), model=o.model, epochs=o.epochs, mode=mode,
                       cache=str(o.cache) if o.cache else None, teacher=teacher, batch_size=o.batch_size,
                       opt=o.opt, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                       sched=o.sched, warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr, min_lr=o.min_lr,
                       clip_grad=o.clip_grad, ema_decay=o.model_ema_decay, drop_path=o.drop_path,
                       amp=o.amp, channels_last=not o.no_channels_last, compile=o.compile,
                       workers=o.workers, device=o.device, seed=o.seed, view_global_seed=o.view_global_seed,
                       view_seeds=o.view_seeds, seed_choice=o.seed_choice, recipe=recipe,
                       mix_labels=o.mix_labels, loss=loss, eval_every=o.eval_every,
                       crop_pct=o.crop_pct, log_interval=o.log_interval, progress=not o.no_progress,
                       size=o.size, ramp_start=o.ramp_start, ramp_end=o.ramp_end, size_step=o.size_step,
                       val_res=o.val_res)
