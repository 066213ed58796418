"""One option's declaration: everything the command line, a TOML recipe table, `kdcache run`'s step keys and
the config objects need to know about it, said once (kdcache.options holds the tables of every command).

This module imports nothing of kdcache's but its errors, so that the view recipe (kdcache.augment.recipe)
can declare its flags next to its defaults without an import circle.
"""

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from kdcache.errors import KdcacheError


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

NOT_A_FIELD = ""                # Option.field: the option fills no field of the command's config object


@dataclass(frozen=True)
class Option:
    """One option of one command.

    flag: '--batch-size', or 'cache' for a positional argument; the argparse dest and the TOML key follow
        from it (dashes or underscores in a recipe table).
    type: int, float, str, Path, bool (a flag: store_true), or a parser such as kdcache.seeds.parse_seeds.
    default: the value when the option is not given. default_text: what --help shows as the default when the
        value is computed later (None default); without it the default value itself is shown.
    valid: the numbers' range, checked before anything is created (kdcache.options.check_values).
    group / exclusive: the argparse group's title / the name of a mutually exclusive set (with `required`:
        one of the set is required).
    required: argparse refuses the command without it; needed: the config object cannot be made without it
        (--config and --resume give it otherwise).
    changes_results: False for a setting that changes how a step runs, not what it makes: left out of
        `kdcache run`'s step keys, so changing it reruns nothing.
    key_omits_default: `kdcache run`'s key leaves it out while it is at its default (an option added after
        run directories were recorded: they keep their key).
    field: the config object's field it fills (None: the dest; 'teacher.seed': a key of a nested field;
        NOT_A_FIELD: none, the config's builder reads it); inverted: the field is `not value` (--no-progress).
    old: former spellings ('--seed'), accepted for one release with a one-line warning, also as TOML keys.
    """
    flag: str
    type: Callable = str
    default: Any = None
    help: str = ""
    choices: Optional[Tuple] = None
    nargs: Optional[int] = None
    metavar: Any = None
    valid: Optional[Range] = None
    group: Optional[str] = None
    exclusive: Optional[str] = None
    required: bool = False
    needed: bool = False
    changes_results: bool = True
    key_omits_default: bool = False
    field: Optional[str] = None
    inverted: bool = False
    default_text: Optional[str] = None
    old: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.type is bool and self.default is None:
            object.__setattr__(self, "default", False)   # a flag: given or not

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def positional(self) -> bool:
        return not self.flag.startswith("-")

    @property
    def config_field(self) -> Optional[str]:
        """The config object's field (dotted: a nested one), or None."""
        if self.field == NOT_A_FIELD:
            return None
        return self.field or self.dest

    def shown_default(self) -> Optional[str]:
        """The default as --help shows it; None when there is none to show."""
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.default is False:
            return None
        return str(self.default)

    def help_text(self) -> str:
        """The help with its default appended: the one place a default is written is the declaration."""
        shown = self.shown_default()
        text = self.help + (f" (default: {shown})" if shown is not None else "")
        return text.strip().replace("%", "%%")   # argparse formats help with %-interpolation

    def old_dest(self, old: str) -> str:
        return old.lstrip("-").replace("-", "_")


def deprecated(old: str, new: str, command: str, where: str = "") -> None:
    """The one-line warning of a former spelling (kdcache.cli prints warnings as 'kdcache: warning: ...').
    On the command line every use is told; a recipe's key is told once per process (kdcache run reads
    a table more than once)."""
    import warnings
    if where:
        warnings.warn(f"{where}: {old} is deprecated for {command}; use {new}", FutureWarning, stacklevel=3)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)
        warnings.warn(f"{old} is deprecated for {command}; use {new}", FutureWarning, stacklevel=3)


def check_range(opt: Option, value, where: str = "") -> None:
    """A KdcacheError naming the flag, the value and the range when `value` is outside opt.valid."""
    if opt.valid is None or value is None:
        return
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if not opt.valid.contains(v):
            raise KdcacheError(f"{where + ' ' if where else ''}{opt.flag} {v!r}: must be {opt.valid.text()}")
