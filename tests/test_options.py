"""kdcache.options: each option declared once; the parsers, recipe tables, range checks, step keys and config
objects derived from the declarations mean the same thing."""

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from kdcache import options
from kdcache.cli import build_parser
from kdcache.errors import KdcacheError
from kdcache.student.config import TrainConfig
from kdcache.teacher.config import CopyConfig, DumpConfig, VerifyConfig


def _subparser(*names) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        parser = parser._subparsers._group_actions[0].choices[name]
    return parser


COMMANDS = [("prepare", "fashion-mnist"), ("prepare", "imagefolder"), ("prepare", "wds"),
            ("dump-teacher", None), ("train-student", None), ("verify", None), ("preview", None), ("run", None),
            ("ls", None), ("copy", None), ("info", None)]
CONFIGS = {"dump-teacher": DumpConfig, "train-student": TrainConfig, "verify": VerifyConfig, "copy": CopyConfig}


@pytest.mark.parametrize("command,source", COMMANDS, ids=lambda c: str(c))
def test_every_declared_option_is_in_its_parser_with_its_default_help_and_choices(command, source, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")   # help lines unwrapped (argparse breaks lines at hyphens)
    parser = _subparser(command, source) if source else _subparser(command)
    actions = {a.dest: a for a in parser._actions if a.dest != "help" and a.help != argparse.SUPPRESS}
    declared = options.options(command, source)
    assert list(actions) == list(declared)
    text = " ".join(parser.format_help().split())
    for dest, opt in declared.items():
        a = actions[dest]
        assert a.option_strings == ([] if opt.positional else [opt.flag]), dest
        assert a.default == (None if opt.positional else opt.default), dest
        assert (a.type or str) is (str if opt.type is bool else opt.type), dest
        assert a.choices == (list(opt.choices) if opt.choices else None), dest
        assert a.nargs == (0 if opt.type is bool else opt.nargs), dest
        assert " ".join(opt.help.split()) in text, dest
        if opt.shown_default() is not None:  # the default is in the help, written by no one but the declaration
            assert " ".join(f"{opt.help} (default: {opt.shown_default()})".split()).strip() in text, dest


def test_help_shows_the_default_of_a_declared_option():
    text = " ".join(_subparser("train-student").format_help().split())
    assert "--batch-size BATCH_SIZE (default: 256)" in text
    assert "--claim-ttl CLAIM_TTL seconds without a heartbeat after which another writer's unit claim is stale " \
           "(default: 300.0)" in " ".join(_subparser("dump-teacher").format_help().split())


def _argv(table: dict):
    args = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        elif value is not False:
            args += [flag, str(value)]
    return args


def test_a_table_gives_the_train_config_of_the_same_options_and_it_round_trips(tmp_path):
    table = {"model": "test_resnet", "epochs": 3, "batch-size": 64, "temperature": 2, "hard_loss": "ce",
             "lr": 0.1, "no-progress": True, "view-seeds": "0:3", "model-ema-decay": 0.5, "view-size": 24,
             "mixup": 0.2}
    common = {"data": str(tmp_path / "d"), "out": str(tmp_path / "o"), "kd": "none"}
    ns = options.table_options("train-student", {**table, **common}, "[student]")
    parsed = build_parser().parse_args(["train-student", *_argv({**table, **common})])
    cfg = TrainConfig.from_options(ns)
    assert cfg == TrainConfig.from_options(parsed)
    assert cfg.loss["temperature"] == 2.0 and cfg.view_seeds == [0, 1, 2] and cfg.ema_decay == 0.5
    assert cfg.progress is False and cfg.recipe["size"] == 24 and cfg.recipe["mixup"] == 0.2
    assert cfg.data == str(tmp_path / "d") and cfg.loss["kd_loss"] == "none" and cfg.teacher is None
    assert TrainConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg       # what --resume reads back


def test_a_table_gives_the_dump_config_of_the_same_options(fmnist_small, tmp_path):
    table = {"seeds": "0:4", "topk": 3, "scale": [0.35, 1], "aa": "rand-m5-mstd0.5", "mixup": 0.2,
             "batch_size": 64, "teacher": "resnet10t", "random-teacher": True, "data": str(fmnist_small.root),
             "out": str(tmp_path / "c"), "view-global-seed": 5}
    ns = options.table_options("dump-teacher", table, "[dump]")
    parsed = build_parser().parse_args(["dump-teacher", *_argv(table)])
    cfg = DumpConfig.from_options(ns)
    assert cfg == DumpConfig.from_options(parsed)
    assert cfg.recipe.scale == (0.35, 1.0) and cfg.recipe.size == fmnist_small.view_size  # the dataset's
    assert cfg.global_seed == 5 and cfg.teacher.seed == 5           # a random teacher: the views' seed by default
    parsed = build_parser().parse_args(["dump-teacher", *_argv(table), "--teacher-init-seed", "9"])
    assert DumpConfig.from_options(parsed).teacher.seed == 9 and DumpConfig.from_options(parsed).global_seed == 5


def test_verify_and_copy_configs_come_from_their_options():
    ns = build_parser().parse_args(["verify", "s3://b/c", "--replay", "8", "--replay-seed", "3", "--max-kl", "0.01"])
    assert VerifyConfig.from_options(ns) == VerifyConfig(cache="s3://b/c", replay=8, replay_seed=3, max_kl=0.01)
    ns = build_parser().parse_args(["copy", "a", "b", "--root", "--seeds", "2:4", "--no-progress"])
    assert CopyConfig.from_options(ns) == CopyConfig(src="a", dst="b", root=True, seeds=[2, 3], progress=False)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_declared_field_is_a_field_of_the_config(command):
    names = {f.name for f in fields(CONFIGS[command])}
    for dest, opt in options.options(command).items():
        if opt.config_field is not None:
            assert opt.config_field.split(".")[0] in names, f"{command} {opt.flag} -> {opt.config_field}"


def test_harmless_settings_come_from_the_declarations():
    """kdcache run's keys leave out exactly the settings declared not to change results."""
    assert set(options.harmless_fields("train-student")) == {"eval_every", "log_interval", "workers", "progress",
                                                               "device", "compile"}
    assert set(options.harmless_fields("dump-teacher")) == {"batch_size", "workers", "device", "amp", "compile",
                                                              "claim_ttl", "progress", "seeds"}
    assert set(options.harmless_fields("prepare", "wds")) == {"workers", "overwrite"}


# ---- former spellings: one release with a warning ----------------------------------------------------
FORMER = [("dump-teacher", "--seed", "--view-global-seed", "view_global_seed", "7", 7),
          ("verify", "--seed", "--replay-seed", "replay_seed", "7", 7),
          ("preview", "--seed", "--view-global-seed", "view_global_seed", "7", 7),
          ("preview", "--seeds", "--num-seeds", "num_seeds", "3", 3)]
BASE = {"dump-teacher": ["--data", "d", "--out", "o", "--seeds", "0:1"], "verify": ["c"], "preview": ["d"]}


@pytest.mark.parametrize("command,old,new,dest,text,value", FORMER, ids=lambda x: str(x))
def test_a_former_spelling_works_with_a_one_line_warning(command, old, new, dest, text, value, tmp_path):
    with pytest.warns(FutureWarning, match=f"^{old} is deprecated for {command}; use {new}$"):
        ns = build_parser().parse_args([command, *BASE[command], old, text])
    assert getattr(ns, dest) == value and not hasattr(ns, old.lstrip("-"))
    assert ns == build_parser().parse_args([command, *BASE[command], new, text])
    from conftest import kdcache
    argv = {"dump-teacher": ["--data", tmp_path / "none", "--out", tmp_path / "o", "--seeds", "0:1"],
            "verify": [tmp_path / "none"], "preview": [tmp_path / "none", "--out", tmp_path / "v.png"]}[command]
    r = kdcache(command, *argv, old, text, check=False)
    lines = r.stderr.splitlines()
    assert lines[0] == f"kdcache: warning: {old} is deprecated for {command}; use {new}", lines
    assert not any("warning" in line for line in lines[1:]), lines
    # (the command then fails on the missing input, as it does with the new spelling)
    assert kdcache(command, *argv, new, text, check=False).returncode == r.returncode


def test_a_former_spelling_in_a_recipe_table_works_with_a_warning():
    with pytest.warns(FutureWarning, match=r"^\[dump\]: 'seed' is deprecated for kdcache dump-teacher; "
                                           r"use 'view-global-seed'$"):
        ns = options.table_options("dump-teacher", {"seed": 4}, "[dump]")
    assert ns.view_global_seed == 4 and not hasattr(ns, "seed")
    with pytest.raises(KdcacheError, match="'seed' and 'view-global-seed' are the same setting"):
        with pytest.warns(FutureWarning):
            options.table_options("dump-teacher", {"seed": 4, "view-global-seed": 4}, "[dump]")
    # train-student keeps --seed: the student's initialisation and order
    assert options.table_options("train-student", {"seed": 4}, "[student]").seed == 4


@pytest.mark.parametrize("table,message", [
    ({"epochz": 3}, "[student]: unknown setting 'epochz' (not an option of kdcache train-student)"),
    ({"epochs": "three"}, "[student] epochs: expected an integer"),
    ({"amp": "bf8"}, "[student] amp: expected one of auto, bf16, fp16, off"),
    ({"no-progress": 1}, "[student] no-progress: expected true or false"),
    ({"scale": [0.5]}, "[student] scale: expected a list of 2 values"),
    ({"view-seeds": "0-3"}, "[student] view-seeds: expected seeds"),
    ({"batch-size": 8, "batch_size": 16}, "'batch-size' and 'batch_size' are the same setting"),
    ({"out": "x"}, "[student]: 'out' cannot be set here: why"),
])
def test_table_errors_name_the_table_and_the_key(table, message):
    with pytest.raises(KdcacheError) as err:
        options.table_options("train-student", table, "[student]", reserved={"out": "why"})
    assert message in str(err.value)


def test_prepare_options_by_source():
    ns = options.table_options("prepare", {"root": "/data/in", "shuffle-seed": 0}, "[prepare]", source="imagefolder")
    assert ns.root == "/data/in" and ns.shuffle_seed == 0 and ns.jpeg_quality == 90 and ns.source == "imagefolder"
    with pytest.raises(KdcacheError, match="unknown setting 'shuffle-seed'.*fashion-mnist"):
        options.table_options("prepare", {"shuffle-seed": 0}, "[prepare]", source="fashion-mnist")
    assert isinstance(options.table_options("prepare", {"out": "x"}, "[prepare]", source="wds").out, Path)


def test_missing_and_exclusive_options_are_named_before_any_file_is_read(tmp_path):
    with pytest.raises(KdcacheError, match=r"dump-teacher needs --data, --out \(or --cache-root\), --seeds"):
        DumpConfig.from_options(options.table_options("dump-teacher", {}, "[dump]"))
    with pytest.raises(KdcacheError, match="--out and --cache-root are exclusive"):
        DumpConfig.from_options(options.table_options(
            "dump-teacher", {"data": str(tmp_path), "seeds": "0:1", "out": "a", "cache-root": "b"}, "[dump]"))
    with pytest.raises(KdcacheError, match="train-student needs --data, --model, --epochs, --out"):
        TrainConfig.from_options(options.table_options("train-student", {}, "[student]"))


def test_converting_options_opens_no_file_and_imports_no_command():
    """kdcache.options reads declarations only: importing it loads neither the teacher, the caches nor torch,
    and kdcache.cache.catalog does not import it (the former circle catalog -> options -> dump -> catalog)."""
    code = ("import sys, kdcache.options as o, kdcache.cache.catalog\n"
            "o.table_options('dump-teacher', {'data': '/nonexistent', 'seeds': '0:2', 'out': 'x'}, '[dump]')\n"
            "bad = [m for m in sys.modules if m.startswith(('kdcache.teacher', 'kdcache.student.config', 'torch'))]\n"
            "print(bad)")
    env_path = str(Path(__file__).parent.parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": ""})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ---- every option's range, checked before anything is created ----------------------------------------
def _minimal_argv(command, source, tmp_path):
    """The fewest arguments that parse; every path in them is absent, so any file made is a failure."""
    out = tmp_path / "out"
    return {
        ("prepare", "fashion-mnist"): ["prepare", "fashion-mnist", "--out", out],
        ("prepare", "imagefolder"): ["prepare", "imagefolder", tmp_path / "src", "--out", out],
        ("prepare", "wds"): ["prepare", "wds", str(tmp_path / "x-{0..1}.tar"), "--out", out],
        ("dump-teacher", None): ["dump-teacher", "--data", tmp_path / "data", "--out", out, "--seeds", "0:1",
                                 "--teacher", "resnet10t", "--random-teacher"],
        ("train-student", None): ["train-student", "--data", tmp_path / "data", "--model", "resnet10t", "--epochs", 1,
                                  "--out", out, "--kd", "none"],
        ("verify", None): ["verify", out],
        ("preview", None): ["preview", tmp_path / "data", "--out", out],
        ("run", None): ["run", tmp_path / "recipe.toml", "--out", out],
        ("copy", None): ["copy", tmp_path / "src", out],
    }[(command, source)]


def _out_of_range(opt):
    """Values just outside an option's range (and NaN, infinity for floats)."""
    lo, hi = opt.valid.bounds()
    step = 1 if opt.type is int else 0.5
    bad = []
    if lo is not None:
        bad.append(lo if opt.valid.lo_open else lo - step)
    if hi is not None:
        bad.append(hi if opt.valid.hi_open else hi + step)
    if opt.type is float:
        bad += ["nan", "inf"]
    return [int(v) if opt.type is int and not isinstance(v, str) else v for v in bad]


RANGED = [(c, s, dest) for c, s in COMMANDS if (c, s) not in (("ls", None), ("info", None))
          for dest, o in options.options(c, s).items() if o.valid is not None]


def test_every_number_option_declares_its_range():
    """Except the view-recipe flags, whose ranges ViewRecipe.validate checks (one place for dump, train, preview)."""
    from kdcache.augment.recipe import TRAIN_RENAMED, recipe_options
    recipe_flags = set(recipe_options()) | set(recipe_options(TRAIN_RENAMED))
    for command, source in COMMANDS:
        for dest, o in options.options(command, source).items():
            if o.type in (int, float) and dest not in recipe_flags:
                assert o.valid is not None, f"kdcache {command} --{dest}: no valid range declared"
            if o.valid is not None:
                default = o.default if isinstance(o.default, (list, tuple)) else [o.default]
                assert all(v is None or o.valid.contains(v) for v in default), f"{command} --{dest}: default outside"


@pytest.mark.parametrize("command,source,dest", RANGED, ids=lambda x: str(x))
def test_an_out_of_range_value_is_one_line_naming_the_option_and_nothing_is_created(command, source, dest, tmp_path):
    from conftest import kdcache
    opt = options.options(command, source)[dest]
    flag = opt.flag
    for value in _out_of_range(opt):
        argv = _minimal_argv(command, source, tmp_path) + [flag] + [value] * (opt.nargs or 1)
        r = kdcache(*argv, check=False)
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"kdcache: error: {flag} ") and "must be" in lines[0], lines
        assert not (tmp_path / "out").exists()


def test_a_recipe_table_checks_the_same_ranges():
    with pytest.raises(KdcacheError, match=r"\[student\] --temperature 0.0: must be > 0"):
        options.table_options("train-student", {"temperature": 0}, "[student]")
    with pytest.raises(KdcacheError, match=r"--claim-ttl nan: must be >= 1"):
        options.table_options("dump-teacher", {"claim_ttl": float("nan")}, "[dump]")
