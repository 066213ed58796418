"""Every command's options, declared once (kdcache.option.Option), and what is derived from them.

From these tables come: the argparse parsers (kdcache.cli), a TOML recipe table read as the same options
(table_options: keys are the long option names, dashes or underscores; used by `kdcache run` and by
train-student --config), the range checks (check_values), `kdcache run`'s step keys (harmless_fields:
the settings that do not change results) and the config objects (config_values: the fields a command's
options fill, read by TrainConfig / DumpConfig / VerifyConfig / CopyConfig.from_options). Adding an option
is one Option(...) line here, plus the code that uses it.

Nothing here opens a dataset or a cache: resolving options against files (a cache under --cache-root, the
dataset's view size, recipe flags against a cache's recipe) is the config modules' step.
"""

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Dict, List, Optional

from kdcache.augment.recipe import RECIPE_FLAGS, TRAIN_RENAMED, ViewRecipe, flag_dest, recipe_options
from kdcache.errors import KdcacheError
from kdcache.option import (CORES, FRACTION, NON_NEGATIVE, NOT_A_FIELD, POSITIVE, PROBABILITY, SEED, Option,
                            Range, check_range, deprecated, usable_cores)
from kdcache.seeds import parse_labels, parse_seeds, parse_weights, seed_ranges
from kdcache.student.resolution import parse_size   # (numpy only: cheap to import with the parser)

__all__ = ["Option", "Range", "SEED", "options", "check_values", "table_options", "table_values", "config_values",
           "check_needed", "make_config", "harmless_fields", "key_defaults", "parse_seeds", "seed_ranges", "parse_size",
           "usable_cores"]

AMP = ("auto", "bf16", "fp16", "off")
HARMLESS = dict(changes_results=False)      # how a step runs, not what it makes: not in kdcache run's keys
# options of format 4's targets: at their defaults they leave kdcache run's keys as they were before them
_NEW_TARGETS = dict(group="targets (format 4)", key_omits_default=True)

# ---- prepare SOURCE --------------------------------------------------------------------------------
_PREPARE_COMMON = [
    Option("--out", Path, required=True, help="dataset directory to create"),
    Option("--limit", int, valid=POSITIVE, help="keep the first N samples of each split"),
    Option("--max-side", int, valid=POSITIVE, help="resize so the longest side is at most this",
           default_text="500; Fashion-MNIST: keep 28"),
    Option("--jpeg-quality", int, 90, valid=Range(1, 100), help="quality of the one JPEG encode"),
    Option("--view-size", int, valid=POSITIVE, help="default view size for later commands",
           default_text="32 Fashion-MNIST, 224 otherwise"),
    Option("--shard-size", int, 10000, valid=POSITIVE, help="samples per webdataset shard"),
    Option("--workers", int, valid=POSITIVE, help="processes", default_text="all usable cores", **HARMLESS),
    Option("--skip-bad", bool, help="skip bad samples and record them in the manifest"),
    Option("--overwrite", bool, help="replace a dataset prepared from other input", **HARMLESS),
]
PREPARE_SOURCES = {
    "fashion-mnist": [Option("--root", help="folder with the IDX files",
                             default_text="/usr/share/datasets/fashion-mnist")],
    "imagefolder": [Option("root", help="folder holding train/ and val/"),
                    Option("--shuffle-seed", int, valid=SEED, default_text="class order",
                           help="train order: a permutation of the class-sorted listing (needed for mixing recipes, "
                                "which pair consecutive samples)")],
    "wds": [Option("pattern", help="train shards: brace pattern or glob"),
            Option("--val", help="validation shards: brace pattern or glob"),
            Option("--num-classes", int, valid=Range(1, 2**31 - 1), help="class count",
                   default_text="largest train label + 1")],
}


# ---- the teacher (dump-teacher, train-student --kd online): kdcache.models.ModelSpec's fields -------------
def _teacher(init_seed_default: str) -> List[Option]:
    g = dict(group="teacher")
    return [
        Option("--teacher", help="timm model name", field="teacher.name", **g),
        Option("--teacher-module", field="teacher.module", **g,
               help="'package.module:factory' for a model timm does not have, called as factory(num_classes=C)"),
        Option("--teacher-checkpoint", exclusive="weights", field="teacher.checkpoint", **g,
               help="local weights: .safetensors or torch checkpoint"),
        Option("--random-teacher", bool, exclusive="weights", field="teacher.random_init", **g,
               help="random weights from --teacher-init-seed (tests, smoke runs)"),
        Option("--teacher-init-seed", int, valid=SEED, field="teacher.seed", default_text=init_seed_default, **g,
               help="the random teacher's weights"),
        Option("--mean", float, nargs=3, valid=Range(), field="teacher.mean", default_text="the model's pretrained_cfg",
               help="input mean", **g),
        Option("--std", float, nargs=3, valid=Range(0, lo_open=True), field="teacher.std",
               default_text="the model's pretrained_cfg", help="input std", **g),
    ]


# ---- dump-teacher (DumpConfig) ----------------------------------------------------------------------
_DUMP = [
    Option("--data", Path, required=True, help="prepared dataset (its train split is dumped)"),
    Option("--out", exclusive="where", required=True,
           help="the cache: a directory or s3:// URL (created, or extended/resumed)"),
    Option("--cache-root", exclusive="where", required=True,
           help="a directory or s3:// URL holding many caches: the cache of this teacher, data and recipe is found "
                "there (extended/resumed) or created (kdcache ls ROOT lists them)"),
    # more seeds extend the same cache: kdcache run checks the seeds against the cache's complete ones
    Option("--seeds", parse_seeds, required=True, help="augmentation seeds A:B (B excluded)", **HARMLESS),
    Option("--topk", int, 10, valid=POSITIVE, help="teacher outputs kept per view"),
    Option("--targets", default="topk", choices=("topk", "sampled", "sampled-cv"), **_NEW_TARGETS,
           help="topk: the k most probable classes and the tail mass; sampled: those plus --samples classes drawn "
                "from the tail, an unbiased target at --sample-temperature; sampled-cv: the same with a median "
                "control variate (lower variance, signed targets, 8 B more per view; docs/cache-format.md)"),
    Option("--samples", int, 0, valid=Range(0, 4096), **_NEW_TARGETS, default_text="0; sampled: 8",
           help="draws from the tail per view (--targets sampled or sampled-cv)"),
    Option("--sample-temperature", float, 1.0, valid=Range(0, 1e4, lo_open=True), **_NEW_TARGETS,
           help="--targets sampled or sampled-cv: the KD temperature the target is unbiased at (the draws' "
                "probability ~ p^(1/T), or ~ |p^(1/T) - median| for sampled-cv)"),
    Option("--add-teacher", bool, **_NEW_TARGETS,
           help="score the views of the existing cache --out (or the one for --data under --cache-root) with this "
                "teacher, stored beside the cache's own (train-student --teachers)"),
    Option("--teacher-label", **_NEW_TARGETS, default_text="the teacher's name",
           help="--add-teacher: the teacher's name in the cache"),
    *_teacher("--view-global-seed"),
    Option("--view-global-seed", int, 0, valid=SEED, field="global_seed", old=("--seed",),
           help="global seed of the views: their parameters (and a random teacher's weights, unless "
                "--teacher-init-seed)"),
    Option("--batch-size", int, 256, valid=POSITIVE, help="views per teacher forward", **HARMLESS),
    Option("--device", default="auto", help="auto, cpu, cuda, cuda:N (under torchrun: the local GPU)", **HARMLESS),
    Option("--amp", default="auto", choices=AMP, help="autocast (auto: bf16 on CUDA, off on CPU)", **HARMLESS),
    Option("--compile", bool, help="torch.compile the teacher", **HARMLESS),
    Option("--workers", int, valid=CORES, help="render threads", **HARMLESS,
           default_text="usable cores; on a GPU two fewer, for the threads that feed it and write"),
    Option("--values-dtype", default="uint16", choices=("uint16", "float32"),
           help="top-k log-probabilities as uint16 fixed point (step 1/2048) or float32"),
    Option("--unit-size", int, valid=POSITIVE, default_text="the existing cache's, else 32768",
           help="samples per work unit = Zarr shard (smaller for more parallel writers)"),
    # only how the rows are made; but in kdcache run's dump key since the option came: changing that now
    # would rerun the dump step of every run directory made since
    Option("--seeds-per-pass", int, 32, valid=POSITIVE, help="seeds rendered per decode of a block and claimed together"),
    # the heartbeat rewrites a claim every max(0.2 s, ttl / 6) (kdcache.cache.ledger): at 1 s five beats
    # still fit in a TTL; shorter ones would let a slow store's write make a live claim look stale
    Option("--claim-ttl", float, 300.0, valid=Range(1), **HARMLESS,
           help="seconds without a heartbeat after which another writer's unit claim is stale"),
    Option("--no-progress", bool, field="progress", inverted=True, help="no progress bar or lines", **HARMLESS),
]

# ---- train-student (TrainConfig) --------------------------------------------------------------------
_LOSS = dict(group="loss")
_SIZE = dict(group="training size (progressive resizing, FFCV's names and ramp)", key_omits_default=True)
_TRAIN = [
    Option("--config", Path, field=NOT_A_FIELD,
           help="TOML recipe: keys are these options' long names (dashes or underscores); flags override it"),
    Option("--resume", Path, metavar="RUNDIR", field=NOT_A_FIELD, help="continue an interrupted run"),
    Option("--data", Path, needed=True, help="prepared dataset"),
    Option("--model", needed=True, help="timm model name of the student"),
    Option("--epochs", int, valid=POSITIVE, needed=True),
    Option("--out", Path, needed=True, help="run directory"),
    Option("--cache", help="teacher cache (cached KD): a directory or s3:// URL"),
    Option("--cache-root", field=NOT_A_FIELD,
           help="cached KD from the cache for --data found under this root (kdcache ls ROOT)"),
    Option("--cache-id", field=NOT_A_FIELD, help="with --cache-root: the cache's id, when several match"),
    Option("--teacher-sha256", field=NOT_A_FIELD,
           help="with --cache-root: the teacher's weights hash (a prefix will do), when several match"),
    Option("--kd", choices=("online", "none"), field=NOT_A_FIELD,
           help="online: the teacher runs in the loop on the same views; none: plain supervised training"),
    *_teacher("--seed"),
    Option("--batch-size", int, 256, valid=POSITIVE),
    Option("--opt", default="sgd", help="timm optimizer name: sgd, adamw, lamb, ..."),
    Option("--lr", float, valid=NON_NEGATIVE, default_text="0.1 (sgd), 1e-3 (adamw), 5e-3 (lamb) x batch/256"),
    Option("--momentum", float, 0.9, valid=FRACTION),
    Option("--weight-decay", float, 5e-5, valid=NON_NEGATIVE),
    Option("--sched", default="cosine", help="timm scheduler name"),
    Option("--warmup-epochs", int, 0, valid=NON_NEGATIVE),
    Option("--warmup-lr", float, 1e-5, valid=NON_NEGATIVE),
    Option("--min-lr", float, 0.0, valid=NON_NEGATIVE),
    Option("--clip-grad", float, valid=Range(0, lo_open=True), help="clip the gradient norm"),
    Option("--model-ema-decay", float, 0.0, valid=FRACTION, field="ema_decay",
           help="EMA of the weights (timm ModelEmaV3); 0 = off"),
    Option("--drop-path", float, valid=FRACTION),
    Option("--amp", default="auto", choices=AMP),
    Option("--no-channels-last", bool, field="channels_last", inverted=True),
    Option("--compile", bool, help="torch.compile the student", **HARMLESS),
    Option("--workers", int, valid=CORES, help="loader threads", default_text="usable cores", **HARMLESS),
    Option("--device", default="auto", **HARMLESS),
    Option("--seed", int, 0, valid=SEED, help="the student's initialisation and sample order"),
    Option("--view-global-seed", int, valid=SEED, help="global seed of the views",
           default_text="cached KD: the cache's; --kd online/none: 0, dump-teacher's default, so the baselines see "
                        "the cache's views"),
    Option("--view-seeds", parse_seeds, help="A:B: augmentation seeds cycled over passes",
           default_text="cache: its seeds; none/online: one new seed per pass"),
    Option("--mix-labels", bool,
           help="cached KD from a cache dumped without mixing: the loader mixes the views (--mixup/--cutmix) and the "
                "target is the lambda-mix of the two cached distributions (FKD/ReLabel)"),
    Option("--seed-choice", default="cycle", choices=("cycle", "per-sample"),
           help="cache: epoch e uses seed e mod S (cycle), or each sample draws a stored seed (per-sample)"),
    Option("--teachers", parse_labels, metavar="NAME,NAME", default_text="the cache's own teacher", **_NEW_TARGETS,
           help="cache: the teachers to distil from, by label (kdcache info CACHE lists them)"),
    Option("--ensemble", default="mean", choices=("mean", "weighted", "random"), **_NEW_TARGETS,
           help="several --teachers: the mean of their probabilities, a weighted mean (--teacher-weights), or one "
                "teacher drawn at random (--ensemble-draw)"),
    Option("--teacher-weights", parse_weights, metavar="W,W", **_NEW_TARGETS, help="--ensemble weighted: one weight per teacher"),
    Option("--ensemble-draw", default="sample", choices=("sample", "step"), **_NEW_TARGETS,
           help="--ensemble random: a teacher per sample, or one per step (batch)"),
    Option("--kd-loss", default="kd", choices=("kd", "dkd"), help="vanilla KD (KL) or DKD", field="loss.kd_loss", **_LOSS),
    Option("--kd-weight", float, 1.0, valid=NON_NEGATIVE, field="loss.kd_weight", **_LOSS),
    Option("--temperature", float, 1.0, valid=Range(0, lo_open=True), field="loss.temperature", **_LOSS),
    Option("--hard-loss", choices=("none", "ce", "bce"), help="hard-label term", field="loss.hard_loss",
           default_text="none with KD, ce without", **_LOSS),
    Option("--hard-weight", float, 1.0, valid=NON_NEGATIVE, field="loss.hard_weight", **_LOSS),
    Option("--smoothing", float, 0.0, valid=FRACTION, help="label smoothing of the hard-label term",
           field="loss.smoothing", **_LOSS),
    Option("--dkd-alpha", float, 1.0, valid=NON_NEGATIVE, field="loss.dkd_alpha", **_LOSS),
    Option("--dkd-beta", float, 8.0, valid=NON_NEGATIVE, field="loss.dkd_beta", **_LOSS),
    Option("--eval-every", int, 1, valid=POSITIVE, **HARMLESS),
    Option("--crop-pct", float, 0.875, valid=Range(0, 1, lo_open=True),
           help="eval: centre crop of this fraction of the short side"),
    Option("--log-interval", int, 50, valid=POSITIVE, **HARMLESS),
    Option("--no-progress", bool, field="progress", inverted=True, help="no progress bar or lines", **HARMLESS),
    Option("--size", parse_size, metavar="N|START:END", default_text="the views' size", **_SIZE,
           help="the student's image size: fixed N, or START up to --ramp-start, then a linear ramp (multiples of "
                "--size-step) to END at --ramp-end; the views (crop box, augmentations, cached teacher answers) "
                "stay those of the recipe's size"),
    Option("--ramp-start", int, valid=NON_NEGATIVE, help="last epoch at START, counted from 0",
           default_text="floor(epochs * 65/88) as ffcv-imagenet, before --ramp-end", **_SIZE),
    Option("--ramp-end", int, valid=NON_NEGATIVE, **_SIZE,
           help="first epoch at END (a ramp by 1.5x or more that trains END for less than half of the epochs is "
                "warned about, with the numbers)", default_text="floor(epochs * 76/88), at most the last epoch"),
    Option("--size-step", int, 32, valid=POSITIVE, help="ramp sizes are multiples of this (FFCV: 32; e.g. 8 for 32-px "
                                                          "images)", **_SIZE),
    Option("--val-res", int, valid=POSITIVE, help="evaluation size (centre crop)", default_text="the last training size",
           **_SIZE),
]

# ---- verify (VerifyConfig), preview, run, ls, copy (CopyConfig), info --------------------------------
_VERIFY = [
    Option("cache", help="cache directory or s3:// URL"),
    Option("--replay", int, 0, valid=NON_NEGATIVE, metavar="N", help="re-render N random views and re-run the teacher"),
    Option("--teacher-checkpoint", help="weights to replay with", default_text="the recorded checkpoint"),
    Option("--teacher-module", metavar="PACKAGE.MODULE:FACTORY",
           help="the factory of a teacher that came from a module: verify never imports the module a cache names "
                "(importing runs its code), only this one"),
    Option("--data", Path, help="prepared dataset", default_text="the recorded path"),
    Option("--device", default="auto"),
    Option("--replay-seed", int, 0, valid=SEED, old=("--seed",), help="which views are drawn for --replay"),
    # defaults by precision (kdcache.teacher.verify.THRESHOLDS): fp32 dump and replay on the CPU, or reduced
    Option("--min-agreement", float, valid=PROBABILITY, help="replay passes at this top-1 agreement",
           default_text="0.999 fp32 on CPU, else 0.99"),
    Option("--max-kl", float, valid=NON_NEGATIVE, default_text="1e-4 fp32 on CPU, else 1e-3",
           help="replay passes at this mean KL(fresh || cached) over the k + 1 stored bins"),
    Option("--max-tail-error", float, valid=NON_NEGATIVE, default_text="1e-3 fp32 on CPU, else 0.2",
           help="replay passes at this mean relative tail-mass error"),
    Option("--json", bool, field=NOT_A_FIELD, help="machine-readable report"),
]
_PREVIEW = [
    Option("data", Path, help="prepared dataset directory"),
    Option("--split", default="train"),
    Option("--samples", int, 8, valid=Range(1, 1024)),
    Option("--num-seeds", int, 4, valid=Range(1, 64), old=("--seeds",), help="augmentation seeds 0..N-1"),
    Option("--view-global-seed", int, 0, valid=SEED, old=("--seed",), help="global seed of the views"),
    Option("--out", Path, Path("views.png")),
]
_OTHERS = {
    "run": [Option("recipe", Path, help="pipeline TOML, e.g. pipelines/demo-fashion-mnist.toml"),
            Option("--out", Path, help="run directory", default_text="the recipe's, under runs/"),
            Option("--full", bool, help="the recipe's full-size variant (its [full] tables)"),
            Option("--seed", int, valid=SEED, help="the students' global seed", default_text="the recipe's"),
            Option("--device", help="device for every step", default_text="auto")],
    "ls": [Option("root", help="cache root"),
           Option("--json", bool, help='machine-readable: {"caches": [{"id", "path", "seeds_complete", ...}]}')],
    "copy": [Option("src", help="source cache (directory or s3:// URL)"),
             Option("dst", help="destination cache, or with --root the cache root to put it under"),
             Option("--root", bool, help="DST is a cache root: the copy goes to DST/<cache id>"),
             Option("--publish", bool, field=NOT_A_FIELD, help="with --root: then publish DST for readers over HTTP(S) "
                                                              "(kdcache publish DST)"),
             Option("--seeds", parse_seeds, help="copy only these seeds A:B", default_text="all"),
             Option("--workers", int, 8, valid=Range(1, 256), help="units copied at once"),
             Option("--no-progress", bool, field="progress", inverted=True, help="no progress bar or lines")],
    "publish": [Option("root", help="the cache root to publish (directory or s3:// URL): its index "
                                    "kdcache-index.json is written there"),
                Option("--rehash", bool, help="checksum every object again; without it an object unchanged since "
                                              "the last publish (same size and modification time or ETag) keeps its "
                                              "checksum"),
                Option("--workers", int, 8, valid=Range(1, 256), help="objects read at once"),
                Option("--no-progress", bool, field="progress", inverted=True, help="no progress bar"),
                Option("--json", bool, field=NOT_A_FIELD, help="machine-readable summary")],
    "info": [Option("path", help="dataset or cache directory (or a cache's s3:// or published https:// URL)"),
             Option("--json", bool, help="machine-readable output")],
}
_OTHERS["derive"] = [
    Option("src", help="source cache (directory or s3:// URL)"),
    Option("dst", help="the derived cache to write (created, or resumed)"),
    Option("--topk", int, valid=POSITIVE, help="keep the K most probable classes (the others join the tail mass: exact)",
           default_text="the source's"),
    Option("--seeds", parse_seeds, help="keep these seeds A:B", default_text="all complete"),
    Option("--teachers", parse_labels, metavar="NAME,NAME", help="keep these teachers, by label (the first becomes "
           "the derived cache's own)", default_text="all"),
    Option("--workers", int, 4, valid=Range(1, 256), help="units written at once"),
    Option("--no-progress", bool, field="progress", inverted=True, help="no progress bar or lines"),
]


# ---- plan (kdcache.plan.PlanConfig): a dump's and a student's cost, measured here or given ----------------
def _from_dump(flag: str, **changes) -> Option:
    """dump-teacher's declaration of `flag`, for plan: the same name, type, default and help (changes: what
    differs, such as a group)."""
    opt = next(o for o in _DUMP if o.flag == flag)
    return dataclasses.replace(opt, **changes) if changes else opt


_DATA = dict(group="the dataset: prepared (--data), or not yet (--samples-count, --num-classes, --image-size)")
_RATE = dict(group="rates of another machine (each replaces its measurement here)", valid=Range(0, lo_open=True))
_PLAN = [
    Option("--data", Path, help="prepared dataset: its train split's size, classes and images", **_DATA),
    Option("--samples-count", int, valid=POSITIVE, help="without --data: the train split's sample count", **_DATA),
    Option("--num-classes", int, valid=Range(1, 2**31 - 1), help="without --data: the class count", **_DATA),
    Option("--image-size", int, valid=Range(1, 8191), metavar="PX", default_text="the view size", **_DATA,
           help="without --data: the images' side (square synthetic JPEGs of this side are rendered)"),
    _from_dump("--seeds"), _from_dump("--topk"), _from_dump("--targets"),
    _from_dump("--samples"), _from_dump("--values-dtype"),
    *_teacher("0"),
    Option("--student", help="timm model name of a student: its online-KD and cached-KD epochs, and after how many "
                             "students the cache has paid for itself"),
    Option("--student-batch-size", int, 64, valid=POSITIVE, help="the student's batch (the demo's)"),
    Option("--epochs", int, 3, valid=POSITIVE, help="the student's epochs (the demo's)"),
    Option("--devices", int, 1, valid=Range(1, 2**20), help="devices the dump runs on (torchrun ranks; each with "
                                                              "the render threads measured or given here)"),
    _from_dump("--batch-size"), _from_dump("--device"), _from_dump("--amp"), _from_dump("--workers"),
    _from_dump("--seeds-per-pass"),
    Option("--forward-rate", float, metavar="VIEWS_PER_S", **_RATE,
           help="the teacher's forward on one device, views/s at --batch-size (also taken for online KD's forward)"),
    Option("--render-rate", float, metavar="VIEWS_PER_S", **_RATE,
           help="the dump's renderer feeding one device, views/s (also taken for the student's loader)"),
    Option("--student-rate", float, metavar="IMG_PER_S", **_RATE,
           help="the student's train step on one device (forward, backward, step), img/s at --student-batch-size"),
    Option("--json", bool, field=NOT_A_FIELD, help="machine-readable output"),
]

COMMANDS = ("prepare", "dump-teacher", "verify", "train-student", "run", "ls", "copy", "derive", "publish", "plan",
            "info", "preview")


def _by_dest(*lists) -> Dict[str, Option]:
    return {o.dest: o for opts in lists for o in opts}


def options(command: str, source: Optional[str] = None) -> Dict[str, Option]:
    """The options of `kdcache COMMAND` (prepare: of `kdcache prepare SOURCE`), by argparse dest, in --help order."""
    if command == "prepare":
        if source not in PREPARE_SOURCES:
            raise KdcacheError(f"prepare: source must be one of {', '.join(PREPARE_SOURCES)}, got {source!r}")
        return _by_dest(_PREPARE_COMMON, PREPARE_SOURCES[source])
    if command == "dump-teacher":
        return {**_by_dest(_DUMP), **recipe_options()}
    if command == "train-student":
        return {**_by_dest(_TRAIN), **recipe_options(TRAIN_RENAMED)}
    if command == "verify":
        return _by_dest(_VERIFY)
    if command == "preview":
        return {**_by_dest(_PREVIEW), **recipe_options()}
    if command == "plan":
        return {**_by_dest(_PLAN), **recipe_options()}
    if command in _OTHERS:
        return _by_dest(_OTHERS[command])
    raise KeyError(command)


def _where(command: str, source: Optional[str]) -> str:
    return f"{command} {source}" if source else command


def former_spellings(command: str, source: Optional[str] = None) -> Dict[str, Option]:
    """dest of a former spelling ('seed') -> the option it now is."""
    return {o.old_dest(old): o for o in options(command, source).values() for old in o.old}


def check_values(command: str, ns: argparse.Namespace, source: Optional[str] = None, where: str = "") -> None:
    """Every numeric option of `kdcache COMMAND` within its declared range (Option.valid): one line naming
    the option, the value and the range, before anything is created."""
    for dest, opt in options(command, source).items():
        check_range(opt, getattr(ns, dest, None), where)


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


def table_values(command: str, table: dict, where: str, source: Optional[str] = None,
                 reserved: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    """The settings a recipe table gives, by dest, converted as argparse converts the same options (keys: long
    option names, dashes or underscores; a former spelling is taken with a warning). An unknown key, or one
    in `reserved` (dest -> why it may not be set here), is an error naming `where` and the key."""
    known, former = options(command, source), former_spellings(command, source)
    reserved = reserved or {}
    values: Dict[str, object] = {}
    seen: Dict[str, str] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest in former:
            opt = former[dest]
            deprecated(repr(key), repr(opt.flag.lstrip("-")), f"kdcache {_where(command, source)}", where)
            dest = opt.dest
        if dest in seen:
            raise KdcacheError(f"{where}: {seen[dest]!r} and {key!r} are the same setting; keep one")
        seen[dest] = key
        if dest in reserved:
            raise KdcacheError(f"{where}: {key!r} cannot be set here: {reserved[dest]}")
        if dest not in known:
            raise KdcacheError(f"{where}: unknown setting {key!r} (not an option of kdcache {_where(command, source)})")
        values[dest] = _convert(known[dest], value, f"{where} {key}")
    return values


def table_options(command: str, table: dict, where: str, source: Optional[str] = None,
                  reserved: Optional[Dict[str, str]] = None) -> argparse.Namespace:
    """A recipe table -> the namespace the command's parser would give for the same options: every option
    at its default, then the table's values (table_values), range-checked."""
    values = {dest: opt.default for dest, opt in options(command, source).items()}
    values.update(table_values(command, table, where, source, reserved))
    ns = argparse.Namespace(**values)
    if source is not None:
        ns.source = source
    check_values(command, ns, source, where)
    return ns


# ---- options -> config objects and step keys ----------------------------------------------------------
def check_needed(command: str, ns: argparse.Namespace) -> None:
    """The options a config object cannot be made without (Option.required / needed; of a required exclusive
    set, one) in one error naming them all; two options of an exclusive set given: an error naming both."""
    opts = options(command)
    given = {dest: getattr(ns, dest, None) not in (None, False) for dest in opts}
    sets: Dict[str, List[Option]] = {}
    for opt in opts.values():
        if opt.exclusive:
            sets.setdefault(opt.exclusive, []).append(opt)
    missing = []
    for dest, opt in opts.items():
        if opt.exclusive:
            members = sets[opt.exclusive]
            if opt.required and opt is members[0] and not any(given[m.dest] for m in members):
                missing.append(f"{opt.flag} (or {', '.join(m.flag for m in members[1:])})")
        elif (opt.required or opt.needed) and not given[dest]:
            missing.append(opt.flag)
    if missing:
        raise KdcacheError(f"{command} needs {', '.join(missing)}")
    for members in sets.values():
        both = [m.flag for m in members if given[m.dest]]
        if len(both) > 1:
            raise KdcacheError(f"{' and '.join(both)} are exclusive")


def config_values(command: str, ns: argparse.Namespace) -> Dict[str, object]:
    """field -> value of every option of `command` that fills a field of its config object (Option.field),
    dotted fields nested: {'teacher': {'seed': 3, ...}, 'global_seed': 0, ...}."""
    out: Dict[str, object] = {}
    for dest, opt in options(command).items():
        name = opt.config_field
        if name is None:
            continue
        value = getattr(ns, dest, opt.default)
        if opt.inverted:
            value = not value
        head, _, key = name.partition(".")
        if key:
            out.setdefault(head, {})[key] = value
        else:
            out[head] = value
    return out


def make_config(cls, values: Dict[str, object]):
    """cls(**values) with paths as text where the field holds text (config.json stores strings)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {unknown[0]!r} (kdcache.options declares it)")

    def text_field(name):
        hint = hints[name]
        return hint is str or (typing.get_origin(hint) is typing.Union and str in typing.get_args(hint))
    return cls(**{k: str(v) if isinstance(v, Path) and text_field(k) else v for k, v in values.items()})


def harmless_fields(command: str, source: Optional[str] = None) -> List[str]:
    """The config fields of the settings that change how `command` runs, not what it makes
    (Option.changes_results False): left out of kdcache run's step keys."""
    return [o.config_field or o.dest for o in options(command, source).values() if not o.changes_results]


def key_defaults(command: str) -> Dict[str, object]:
    """field -> default of the options that kdcache run's key leaves out at their default (Option.key_omits_default)."""
    return {o.config_field: o.default for o in options(command).values() if o.key_omits_default}


def set_recipe_options(ns: argparse.Namespace, recipe: ViewRecipe, renamed: Optional[Dict[str, str]] = TRAIN_RENAMED) -> None:
    """Every setting of `recipe` into `ns` as the command's recipe flags would set it (train-student's names by
    default: the views' size is its --view-size; its --size is the student's)."""
    for name in RECIPE_FLAGS:
        value = getattr(recipe, name)
        if value is not None:
            setattr(ns, flag_dest(name, renamed), list(value) if isinstance(value, tuple) else value)

