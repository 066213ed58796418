"""`kdcache run RECIPE.toml`: a whole distillation run, step by step, from a declarative recipe.

    prepare -> teacher (train-student --kd none, or a given checkpoint) -> dump (dump-teacher)
            -> students (the same student recipe: none / online / cache) -> report

Each step has a key: the hash of its settings and of the keys of the steps it reads. A step whose key
matches the one recorded in RUN/steps.json when it last completed, and whose outputs are there, is
skipped. A step that changed is run again; one that was interrupted resumes (prepare and dump-teacher
resume by themselves, train-student from its last.pt). A failed step says which and why; the next
`kdcache run` starts there.
"""

import hashlib
import json
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Callable, Dict, List, Optional

from kdcache.errors import KdcacheError
from kdcache.files import write_text_atomic

MODES = ("none", "online", "cache")


def load_recipe(path: Path, full: bool = False) -> dict:
    try:
        recipe = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KdcacheError(f"{path}: cannot read pipeline recipe: {exc}") from exc
    variant = recipe.pop("full", {})
    if full:  # the full-size variant: its tables override the matching settings
        for table, values in variant.items():
            recipe.setdefault(table, {}).update(values)
    for table in ("prepare", "dump", "student"):
        if table not in recipe:
            raise KdcacheError(f"{path}: recipe has no [{table}] table")
    return recipe


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _options(table: dict, skip=()) -> List[str]:
    """A TOML table -> command-line options: key = 1 -> --key 1; true -> --key; lists -> several values."""
    args = []
    for key, value in table.items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


class Pipeline:
    def __init__(self, recipe: dict, out: Path, seed: Optional[int] = None, device: Optional[str] = None):
        self.recipe, self.out = recipe, Path(out)
        self.seed = recipe.get("seed", 0) if seed is None else seed
        self.device = device
        self.state_path = self.out / "steps.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.keys: Dict[str, str] = {}
        self.log: List[dict] = []

    # ---- step bookkeeping -----------------------------------------------------------------------
    def _step(self, name: str, key: str, outputs: List[Path], run: Callable[[], None]) -> None:
        self.keys[name] = key
        done = self.state.get(name)
        if done and done["key"] == key and all(p.exists() for p in outputs):
            print(f"[kdcache run] {name}: up to date, skipped", file=sys.stderr)
            self.log.append({"step": name, "skipped": True})
            return
        print(f"[kdcache run] {name}: running", file=sys.stderr)
        t = time.time()
        try:
            run()
        except KdcacheError as exc:
            raise KdcacheError(f"step '{name}' failed: {exc}\n(fix it and run the same command again: "
                               "completed steps are skipped)") from exc
        except Exception as exc:
            raise KdcacheError(f"step '{name}' failed: {type(exc).__name__}: {exc}\n(run the same command again "
                               "to resume: completed steps are skipped)") from exc
        self.state[name] = {"key": key, "seconds": round(time.time() - t, 1), "time": time.time()}
        write_text_atomic(self.state_path, json.dumps(self.state, indent=1))  # a torn steps.json would stop every later run
        self.log.append({"step": name, "skipped": False, "seconds": round(time.time() - t, 1)})

    def _cli(self, *args) -> None:
        from kdcache.cli import COMMANDS, build_parser
        parsed = build_parser().parse_args([str(a) for a in args])
        COMMANDS[parsed.command](parsed)

    def _train(self, run_dir: Path, args: List[str], key: str) -> None:
        """train-student into run_dir; a run of the same key resumes, a stale one is replaced."""
        marker = run_dir / ".kdcache-step-key"
        if run_dir.exists():
            if marker.is_file() and marker.read_text() == key and (run_dir / "config.json").is_file():
                self._cli("train-student", "--resume", run_dir)
                return
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        marker.write_text(key)
        self._cli("train-student", *args, "--out", run_dir)

    # ---- the steps -------------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.out / "data"

    def prepare(self) -> None:
        p = dict(self.recipe["prepare"])
        source = p.pop("source", "fashion-mnist")
        location = p.pop("root" if source == "imagefolder" else "pattern", None) if source != "fashion-mnist" else None
        args = ["prepare", source, *([location] if location else []), "--out", self.data, *_options(p)]
        self._step("prepare", _key("prepare", source, location, p), [self.data / "manifest.json"],
                   lambda: self._cli(*args))

    def teacher_args(self) -> List[str]:
        """--teacher-checkpoint FILE, and --teacher NAME where the recipe names the architecture (a weights
        file from elsewhere carries no name; kdcache's own model.safetensors does)."""
        name = self.recipe.get("teacher", {}).get("model")
        return (["--teacher", name] if name else []) + ["--teacher-checkpoint", self.teacher_checkpoint()]

    def teacher_checkpoint(self) -> Path:
        t = self.recipe.get("teacher", {})
        if t.get("checkpoint"):
            return Path(t["checkpoint"])
        return self.out / "teacher" / "model.safetensors"

    def teacher(self) -> None:
        t = dict(self.recipe.get("teacher", {}))
        if t.get("checkpoint"):  # a given teacher: nothing to train
            if not Path(t["checkpoint"]).is_file():
                raise KdcacheError(f"[teacher] checkpoint {t['checkpoint']}: not found")
            self.keys["teacher"] = _key("teacher", t, Path(t["checkpoint"]).stat().st_mtime)
            return
        if "model" not in t:
            raise KdcacheError("recipe: [teacher] needs model (and epochs) to train, or checkpoint = FILE")
        args = ["--data", self.data, "--kd", "none", "--seed", self.recipe.get("teacher_seed", 0),
                *self._device(), *_options(t)]
        key = _key("teacher", t, self.keys["prepare"], self._device())
        run_dir = self.out / "teacher"
        self._step("teacher", key, [run_dir / "summary.json", run_dir / "model.safetensors"],
                   lambda: self._train(run_dir, args, key))

    def dump(self) -> None:
        d = dict(self.recipe["dump"])
        cache = self.out / "cache"
        key = _key("dump", d, self.keys["prepare"], self.keys["teacher"])
        args = ["dump-teacher", "--data", self.data, "--out", cache, *self.teacher_args(), *self._device(), *_options(d)]

        def run():
            marker = self.out / "cache.step-key"  # beside the cache: a cache directory holds only the cache
            if cache.exists() and not (marker.is_file() and marker.read_text() == key):
                shutil.rmtree(cache)  # made from other inputs: this pipeline's cache is rebuilt
            marker.write_text(key)
            self._cli(*args)
        self._step("dump", key, [cache / "zarr.json"], run)

    def students(self) -> None:
        s = dict(self.recipe["student"])
        modes = self.recipe.get("students", list(MODES))
        view_seeds = self.recipe["dump"]["seeds"]
        for mode in modes:
            if mode not in MODES:
                raise KdcacheError(f"recipe: students lists {mode!r}; choose from {MODES}")
            run_dir = self.out / "students" / mode
            base = ["--data", self.data, "--seed", self.seed, *self._device(), *_options(s)]
            if mode == "cache":
                args = base + ["--cache", self.out / "cache"]
                upstream = [self.keys["dump"]]
            elif mode == "online":  # the same views as the cache: the same seeds, cycled the same way
                args = base + ["--kd", "online", *self.teacher_args(), "--view-seeds", view_seeds] + self._recipe_flags()
                upstream = [self.keys["dump"], self.keys["teacher"]]
            else:
                args = base + ["--kd", "none", "--view-seeds", view_seeds] + self._recipe_flags()
                upstream = [self.keys["dump"]]
            key = _key("student", mode, s, self.seed, upstream, self._device())
            self._step(f"student-{mode}", key, [run_dir / "summary.json"], lambda: self._train(run_dir, args, key))

    def _recipe_flags(self) -> List[str]:
        """none and online do not read the cache: they get its whole view recipe and its global seed
        explicitly, so they train on the very views the cached student replays."""
        from kdcache.augment.recipe import RECIPE_FLAGS, ViewRecipe
        from kdcache.cache.schema import TeacherCache
        spec = TeacherCache.open(self.out / "cache").spec
        recipe = ViewRecipe.from_dict(spec.recipe)
        flags = ["--view-global-seed", spec.global_seed]
        for name in RECIPE_FLAGS:
            value = getattr(recipe, name)
            if value is None:
                continue
            flags += ["--" + name.replace("_", "-"), *(value if isinstance(value, tuple) else [value])]
        return flags

    def _device(self) -> List[str]:
        return ["--device", self.device] if self.device else []

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self.teacher()
        self.dump()
        self.students()
        from kdcache.report import write_report
        return write_report(self)


def run_pipeline(recipe_path: Path, out: Optional[Path] = None, full: bool = False, seed: Optional[int] = None,
                 device: Optional[str] = None) -> dict:
    recipe = load_recipe(recipe_path, full=full)
    if out is None:
        out = Path(recipe.get("out", Path("runs") / recipe.get("name", Path(recipe_path).stem)))
        if full:  # never mix the full-size run into the small one's directory
            out = out.with_name(out.name + "-full")
    return Pipeline(recipe, Path(out), seed=seed, device=device).run()
