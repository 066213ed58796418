"""kdcache.options: the command line and a recipe table give the same configs."""

import argparse
from pathlib import Path

import pytest

from kdcache import options
from kdcache.cli import build_parser
from kdcache.errors import KdcacheError


def _subparser(*names) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        parser = parser._subparsers._group_actions[0].choices[name]
    return parser


COMMANDS = [("prepare", "fashion-mnist"), ("prepare", "imagefolder"), ("prepare", "wds"),
            ("dump-teacher", None), ("train-student", None), ("verify", None), ("preview", None), ("run", None),
            ("ls", None), ("copy", None), ("info", None)]


@pytest.mark.parametrize("command,source", COMMANDS, ids=lambda c: str(c))
def test_options_match_the_parsers(command, source):
    """options.options() lists every option of the parser, with its default, type, choices and nargs: a
    recipe table then means what the same options mean on the command line."""
    parser = _subparser(command, source) if source else _subparser(command)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    known = options.options(command, source)
    assert set(known) == set(actions), "options.py and cli.py list different options"
    for dest, a in actions.items():
        o = known[dest]
        assert o.default == a.default, dest
        if isinstance(a, argparse._StoreTrueAction):
            assert o.type is bool, dest
            continue
        assert o.type is (a.type or str), dest
        assert o.choices == (tuple(a.choices) if a.choices else None), dest
        assert o.nargs == (a.nargs if isinstance(a.nargs, int) else None), dest


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


def test_a_table_gives_the_train_config_of_the_same_options(tmp_path):
    table = {"model": "test_resnet", "epochs": 3, "batch-size": 64, "temperature": 2, "hard_loss": "ce",
             "lr": 0.1, "no-progress": True, "view-seeds": "0:3", "model-ema-decay": 0.5}
    common = {"data": str(tmp_path / "d"), "out": str(tmp_path / "o"), "kd": "none"}
    ns = options.table_options("train-student", {**table, **common}, "[student]")
    parsed = build_parser().parse_args(["train-student", *_argv({**table, **common})])
    assert options.train_config(ns) == options.train_config(parsed)
    assert options.train_config(ns).loss["temperature"] == 2.0 and options.train_config(ns).view_seeds == [0, 1, 2]


def test_a_table_gives_the_dump_config_of_the_same_options(fmnist_small, tmp_path):
    table = {"seeds": "0:4", "topk": 3, "scale": [0.35, 1], "aa": "rand-m5-mstd0.5", "mixup": 0.2,
             "batch_size": 64, "teacher": "resnet10t", "random-teacher": True, "data": str(fmnist_small.root),
             "out": str(tmp_path / "c")}
    ns = options.table_options("dump-teacher", table, "[dump]")
    parsed = build_parser().parse_args(["dump-teacher", *_argv(table)])
    assert options.dump_config(ns) == options.dump_config(parsed)
    assert options.dump_config(ns).recipe.scale == (0.35, 1.0)


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
    from kdcache.augment.recipe import TRAIN_RENAMED
    recipe_flags = set(options._recipe_options()) | set(options._recipe_options(TRAIN_RENAMED))
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
    flag = "--" + dest.replace("_", "-")
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
