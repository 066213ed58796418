"""The command line a new user meets: every default shown by --help, warnings on one line."""

import argparse
import subprocess
import sys

from kdcache.cli import build_parser


def _parsers(parser, name="kdcache"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_default_shows_in_help():
    """Reproduced: train-student's batch size of 256 showed only in config.json."""
    missing = []
    for name, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                line = next((h for h in [action.help or ""]), "")
                if "default" not in line and f"(default: {action.default})" not in text:
                    missing.append(f"{name} {action.option_strings[-1]}")
    assert not missing, missing
    train = " ".join(dict(_parsers(build_parser()))["kdcache train-student"].format_help().split())
    assert "--batch-size BATCH_SIZE (default: 256)" in train


def test_warnings_are_one_line():
    code = "import warnings, kdcache.cli as c; c._one_line_warnings(); warnings.warn('30 passes over 4 cached seeds')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stderr == "kdcache: warning: 30 passes over 4 cached seeds\n"
