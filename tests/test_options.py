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
            ("dump-teacher", None), ("train-student", None)]


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
