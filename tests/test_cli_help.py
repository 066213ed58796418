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


def test_no_help_text_types_its_default_and_former_spellings_are_hidden():
    """A default is written once, on the declaration (Option.default or default_text): the help shows it."""
    from kdcache import options
    for command in options.COMMANDS:
        sources = options.PREPARE_SOURCES if command == "prepare" else [None]
        for source in sources:
            for opt in options.options(command, source).values():
                assert "(default" not in opt.help, (command, opt.flag)
    text = dict(_parsers(build_parser()))["kdcache dump-teacher"].format_help()
    assert "--view-global-seed" in text and "--seed " not in text and "--seed\n" not in text
