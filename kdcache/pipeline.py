"""`kdcache run RECIPE.toml`: a whole distillation run, step by step, from a declarative recipe.

    prepare -> teacher (train-student --kd none, or a given checkpoint) -> dump (dump-teacher)
            -> students (the same student recipe: none / online / cache, once per student seed) -> report

Each step calls the library (kdcache.options turns a recipe table into the options the command line
gives; the config objects' from_options make the very configs the command makes of them) and writes into the run directory: RUN/data, RUN/teacher, RUN/cache, RUN/students/<mode>
(the first student seed's run; RUN/students/<mode>-seed<S> each further seed's: `seed = [0, 1]`).
A step's key is the hash of the settings that change its outputs, and of the identity of what it reads:
a dataset's fingerprint, a teacher's weights (their sha256, never the file's time). Settings that only
change how a step runs are not in it: those declared with changes_results=False (kdcache.options; for the
dump batch-size, workers, device, amp, compile, claim-ttl, no-progress; for training eval-every,
log-interval, workers, no-progress, device, compile).

kdcache run never deletes what a step made. A step whose key is recorded in RUN/steps.json and whose
outputs are there is skipped; otherwise:

- prepare runs (a dataset of the same input is left as it is); a dataset prepared from other settings
  is refused: move RUN/data away.
- dump runs dump-teacher into RUN/cache, which skips finished units, resumes interrupted ones and adds
  the seeds not there yet (seeds 0:300 -> 0:400 dumps 100 seeds); a cache made from other inputs
  (another teacher's weights, another view recipe, top-k, ...) is refused, naming the setting: move
  RUN/cache away, or run into another --out.
- teacher and students: the settings a run is made with are recorded in its directory
  (pipeline-settings.json). With the same settings a complete run is skipped and an interrupted one
  resumes from its last.pt; with other settings it is refused, naming each setting that differs
  (old -> new): move the run directory away to train it anew.

A failed step says which and why; the next `kdcache run` starts there.
"""

import hashlib
import json
import logging
import time
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

from kdcache import TrainConfig, options
from kdcache.errors import KdcacheError
from kdcache.files import write_text_atomic
from kdcache.seeds import seed_ranges

log = logging.getLogger(__name__)

MODES = ("none", "online", "cache")
TOP_LEVEL = ("name", "seed", "teacher_seed", "students", "out", "prepare", "teacher", "dump", "student", "full")
SETTINGS = "pipeline-settings.json"      # in a teacher or student run directory: what it was made with
# where a step reads and writes: not in its key, which holds what it reads by identity (fingerprint, weights)
PATHS = ("data", "out", "cache")

_GIVEN_BY_TEACHER = "the teacher comes from the [teacher] table"
_TEACHER_OPTIONS = {"teacher": _GIVEN_BY_TEACHER, "teacher_module": _GIVEN_BY_TEACHER,
                    "teacher_checkpoint": _GIVEN_BY_TEACHER, "random_teacher": _GIVEN_BY_TEACHER,
                    "teacher_init_seed": _GIVEN_BY_TEACHER}
_RUN_RESERVED = {"config": "the recipe table is the configuration",
                 "resume": "kdcache run resumes interrupted runs itself",
                 "data": "kdcache run trains on RUN/data",
                 "out": "kdcache run trains into RUN/teacher and RUN/students/<mode>",
                 "cache": "kdcache run dumps RUN/cache and trains the students listed in `students`",
                 "kd": "kdcache run trains the students listed in `students` (the teacher: without KD)",
                 **_TEACHER_OPTIONS, "mean": _GIVEN_BY_TEACHER, "std": _GIVEN_BY_TEACHER}
RESERVED = {
    "prepare": {"out": "kdcache run prepares into RUN/data",
                "overwrite": "kdcache run never replaces a dataset (move RUN/data away instead)"},
    "teacher": {**_RUN_RESERVED, "seed": "set teacher_seed at the top of the recipe"},
    "dump": {"data": "kdcache run dumps from RUN/data", "out": "kdcache run dumps into RUN/cache", **_TEACHER_OPTIONS},
    "student": {**_RUN_RESERVED, "seed": "set seed at the top of the recipe (or kdcache run --seed)",
                "view_global_seed": "the students take the cache's"},
}


# ---- the recipe ------------------------------------------------------------------------------------
def _prepare_options(table: dict, where: str = "[prepare]"):
    table = dict(table)
    source = table.pop("source", "fashion-mnist")
    if source not in options.PREPARE_SOURCES:
        raise KdcacheError(f"{where}: source must be one of {', '.join(options.PREPARE_SOURCES)}, got {source!r}")
    return options.table_options("prepare", table, where, source=source, reserved=RESERVED["prepare"])


def _teacher_options(table: dict, where: str = "[teacher]"):
    """None for a given teacher (checkpoint = FILE), else the train-student options that train it."""
    if "checkpoint" in table:
        extra = sorted(set(table) - {"model", "checkpoint"})
        if extra:
            raise KdcacheError(f"{where}: unknown setting {extra[0]!r} (with checkpoint = FILE the teacher is given, "
                               "not trained: only model and checkpoint apply)")
        return None
    if "model" not in table:
        raise KdcacheError(f"{where}: needs model (and epochs) to train a teacher, or checkpoint = FILE")
    return options.table_options("train-student", table, where, reserved=RESERVED["teacher"])


def _dump_options(table: dict, where: str = "[dump]"):
    ns = options.table_options("dump-teacher", table, where, reserved=RESERVED["dump"])
    if not ns.seeds:
        raise KdcacheError(f"{where}: needs seeds, e.g. seeds = \"0:300\"")
    return ns


def _student_options(table: dict, where: str = "[student]"):
    return options.table_options("train-student", table, where, reserved=RESERVED["student"])


def student_seeds(value) -> List[int]:
    """The recipe's top-level `seed`: one integer, or a list of distinct integers (each way of training the
    student is trained once per seed: the seed-to-seed spread is what a difference between ways must exceed)."""
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise KdcacheError(f"seed must be an integer or a list of integers, e.g. seed = [0, 1], got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise KdcacheError(f"seed lists a seed twice: {value!r}")
    bad = [s for s in seeds if not options.SEED.contains(s)]
    if bad:
        raise KdcacheError(f"seed {bad[0]}: must be {options.SEED.text()} (as kdcache run --seed)")
    return list(seeds)


def check_recipe(recipe: dict, variant: bool = False) -> None:
    """Every table's keys are options of its command, with values of the right type; the errors name
    the table and the key (variant: the tables with the [full] variant's settings merged in)."""
    for key in recipe:
        if key not in TOP_LEVEL:
            raise KdcacheError(f"unknown setting {key!r} at the top level (known: {', '.join(TOP_LEVEL)})")
    student_seeds(recipe.get("seed", 0))
    if not isinstance(recipe.get("teacher_seed", 0), int) or isinstance(recipe.get("teacher_seed"), bool):
        raise KdcacheError(f"teacher_seed must be an integer, got {recipe['teacher_seed']!r}")
    for table in ("prepare", "teacher", "dump", "student"):
        if not isinstance(recipe.get(table), dict):
            raise KdcacheError(f"recipe has no [{table}] table")
    if not isinstance(recipe.get("students", []), list):
        raise KdcacheError(f"students must be a list of modes, e.g. [\"cache\"], got {recipe['students']!r}")
    for mode in recipe.get("students", MODES):
        if mode not in MODES:
            raise KdcacheError(f"students lists {mode!r}; choose from {', '.join(MODES)}")
    where = {t: f"[{t}] with [full.{t}]" if variant else f"[{t}]" for t in ("prepare", "teacher", "dump", "student")}
    _prepare_options(recipe["prepare"], where["prepare"])
    _dump_options(recipe["dump"], where["dump"])
    for table, ns in (("teacher", _teacher_options(recipe["teacher"], where["teacher"])),
                      ("student", _student_options(recipe["student"], where["student"]))):
        for name in ("model", "epochs"):
            if ns is not None and getattr(ns, name) is None:
                raise KdcacheError(f"{where[table]} needs {name}")


def load_recipe(path: Path, full: bool = False) -> dict:
    """The recipe at path (full: with its [full] tables' settings), checked: a bad key or value is an
    error naming the file, the table and the key."""
    try:
        recipe = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KdcacheError(f"{path}: cannot read pipeline recipe: {exc}") from exc
    variant = recipe.pop("full", {})
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    try:
        check_recipe(recipe)
        for table, values in variant.items():  # the full-size variant: its tables override the matching settings
            if table not in ("prepare", "teacher", "dump", "student"):
                raise KdcacheError(f"unknown table [full.{table}] "
                                   "(the variant overrides prepare, teacher, dump, student)")
            merged.setdefault(table, {}).update(values)
        check_recipe(merged, variant=True)
    except KdcacheError as exc:
        raise KdcacheError(f"{path}: {exc}") from exc
    return merged if full else recipe


# ---- keys and recorded settings ---------------------------------------------------------------------
def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else k
        out.update(_flat(name, v) if isinstance(v, dict) and v else {name: v})
    return out


def run_settings(cfg, upstream: dict) -> dict:
    """The settings that make a train-student run what it is, flat and named like the options: its
    TrainConfig less the harmless settings and the paths (the teacher's by its weights), and the identity
    of what it reads (`upstream`: dataset fingerprint, cache or teacher weights)."""
    d = asdict(cfg)
    for name in options.harmless_fields("train-student") + list(PATHS):
        d.pop(name, None)
    for name, default in options.key_defaults("train-student").items():   # runs recorded before keep their key
        if d.get(name) == default:
            d.pop(name)
    d.update(d.pop("loss") or {})
    teacher = d.pop("teacher") or {}
    teacher.pop("checkpoint", None)   # a path: the weights' sha256 is in upstream
    recipe = d.pop("recipe") or {}
    flat = {**_flat("", d), **_flat("teacher", teacher), **_flat("recipe", recipe), **_flat("", upstream)}
    return json.loads(json.dumps({k.replace("_", "-"): v for k, v in flat.items()}, sort_keys=True, default=str))


def dump_identity(cfg, dataset_fingerprint: str, teacher: dict) -> dict:
    """What makes a dump's cache what it is: its DumpConfig less the harmless settings and the paths, the
    split's fingerprint, the recipe, and the teacher by identity (name, weights sha256, normalisation)."""
    skip = set(options.harmless_fields("dump-teacher")) | set(PATHS) | {"teacher", "recipe"}
    identity = {k: v for k, v in asdict(cfg).items() if k not in skip}
    for name, default in options.key_defaults("dump-teacher").items():   # dumps recorded before keep their key
        if identity.get(name) == default:
            identity.pop(name)
    identity.update(dataset=dataset_fingerprint, recipe=cfg.recipe.to_dict(), teacher=teacher)
    return identity


_MISSING = object()


def _show(value) -> str:
    s = json.dumps(value) if value is not _MISSING else "(not set)"
    return s if len(s) <= 100 else s[:97] + "..."


def _differences(old: dict, new: dict, keys) -> List[str]:
    return [k for k in sorted(keys) if old.get(k, _MISSING) != new.get(k, _MISSING)]


class Pipeline:
    def __init__(self, recipe: dict, out: Path, seed: Optional[int] = None, device: Optional[str] = None):
        self.recipe, self.out = recipe, Path(out)
        # the students' seeds (seed: kdcache run --seed, one seed instead of the recipe's)
        self.seeds = student_seeds(recipe.get("seed", 0) if seed is None else seed)
        self.seed = self.seeds[0]
        self.device = device
        self.state_path = self.out / "steps.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.keys: Dict[str, str] = {}
        self.log: List[dict] = []
        self.dataset = None
        self.dump_cfg = None
        self._teachers: Dict[str, dict] = {}

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    # ---- step bookkeeping -----------------------------------------------------------------------
    def _step(self, name: str, key: str, done: Callable[[], bool], run: Callable[[], Optional[str]]) -> None:
        """Skip the step when its key is the recorded one and done() says its outputs are there; else run it
        (run may find it complete itself and say so: "complete")."""
        self.keys[name] = key
        record = self.state.get(name)
        if record and record["key"] == key and done():
            log.info(f"[kdcache run] {name}: up to date, skipped")
            self.log.append({"step": name, "skipped": True})
            return
        log.info(f"[kdcache run] {name}: running")
        t = time.time()
        try:
            status = run()
        except KdcacheError as exc:
            raise KdcacheError(f"step '{name}' failed: {exc}\n(fix it and run the same command again: "
                               "completed steps are skipped)") from exc
        except Exception as exc:
            raise KdcacheError(f"step '{name}' failed: {type(exc).__name__}: {exc}\n(run the same command again "
                               "to resume: completed steps are skipped)") from exc
        self.state[name] = {"key": key, "seconds": round(time.time() - t, 1), "time": time.time()}
        write_text_atomic(self.state_path, json.dumps(self.state, indent=1))  # a torn steps.json would stop every later run
        self.log.append({"step": name, "skipped": status == "complete", "seconds": round(time.time() - t, 1)})

    def _set_device(self, ns) -> None:
        if self.device:
            ns.device = self.device

    # ---- teacher identity -------------------------------------------------------------------------
    def teacher_checkpoint(self) -> Path:
        t = self.recipe["teacher"]
        return Path(t["checkpoint"]) if t.get("checkpoint") else self.out / "teacher" / "model.safetensors"

    def _teacher_into(self, ns) -> None:
        """--teacher NAME (where the recipe names it: kdcache's own model.safetensors carries its name) and
        --teacher-checkpoint FILE."""
        ns.teacher = self.recipe["teacher"].get("model")
        ns.teacher_checkpoint = str(self.teacher_checkpoint())

    def teacher_identity(self, spec) -> dict:
        """What makes a teacher's outputs: name, input normalisation and the sha256 of its weights (the same
        hash a cache records, kdcache.models.weights_sha256); never the file's time."""
        path = Path(spec.checkpoint)
        st = path.stat()
        # memo for this process only (the dump and the online student ask for the same teacher)
        memo = json.dumps([asdict(spec), st.st_size, st.st_mtime_ns], default=str)
        if memo not in self._teachers:
            from kdcache import build_model
            _, info = build_model(spec, self.dataset.num_classes, what="teacher")
            self._teachers[memo] = {k: info[k] for k in ("name", "sha256", "mean", "std")}
        return self._teachers[memo]

    # ---- the steps -------------------------------------------------------------------------------
    def prepare(self) -> None:
        from kdcache import IncompatibleDataset, PreparedDataset, prepare_dataset
        ns = _prepare_options(self.recipe["prepare"])
        ns.out = self.data
        skip = set(options.harmless_fields("prepare", ns.source)) | set(PATHS)
        settings = {k: v for k, v in vars(ns).items() if k not in skip}

        def run():
            try:
                prepare_dataset(ns)
            except IncompatibleDataset as exc:
                raise KdcacheError(f"{exc}.\nkdcache run never replaces a dataset: move {self.data} away to prepare "
                                   "it anew (the cache and the runs made from it are then refused too: move them "
                                   "as well), or run the recipe into another --out") from exc
        self._step("prepare", _key("prepare", settings), lambda: (self.data / "manifest.json").is_file(), run)
        self.dataset = PreparedDataset.open(self.data)

    def teacher(self) -> None:
        t = self.recipe["teacher"]
        ns = _teacher_options(t)
        if ns is None:  # a given teacher: nothing to train
            if not self.teacher_checkpoint().is_file():
                raise KdcacheError(f"[teacher] checkpoint {t['checkpoint']}: not found")
            return
        run_dir = self.out / "teacher"
        ns.kd, ns.seed, ns.data, ns.out = "none", self.recipe.get("teacher_seed", 0), self.data, run_dir
        self._set_device(ns)
        cfg = TrainConfig.from_options(ns)
        self._train_step("teacher", run_dir, cfg, {"dataset": self.dataset.fingerprint},
                         [run_dir / "summary.json", run_dir / "model.safetensors"])

    def dump(self) -> None:
        from kdcache import DumpConfig, IncompatibleCache, dump_teacher, open_cache
        ns = _dump_options(self.recipe["dump"])
        ns.data, ns.out = self.data, self.cache
        self._teacher_into(ns)
        self._set_device(ns)
        cfg = self.dump_cfg = DumpConfig.from_options(ns)
        identity = dump_identity(cfg, self.dataset.split(cfg.split).fingerprint, self.teacher_identity(cfg.teacher))

        def complete() -> bool:
            return ((self.cache / "zarr.json").is_file()
                    and set(cfg.seeds) <= set(open_cache(self.cache).seeds))

        def run():
            try:
                s = dump_teacher(cfg)
            except IncompatibleCache as exc:
                raise KdcacheError(f"{exc}.\nkdcache run never deletes a cache: move {self.cache} away (the next run "
                                   "dumps a new one there; the students made from it are then refused: move them "
                                   "as well), or run the recipe into another --out") from exc
            missing = sorted(set(cfg.seeds) - set(s["seeds_complete"]))
            if missing:
                raise KdcacheError(f"{self.cache}: seeds {seed_ranges(missing)} are not complete "
                                   "(units held by another writer?)")
            log.info(f"[kdcache run] dump: {s['views_written']} views written, seeds complete "
                     f"{seed_ranges(s['seeds_complete'])}")
        self._step("dump", _key("dump", identity), complete, run)

    def student_runs(self) -> Dict[str, List[tuple]]:
        """mode -> [(step name, seed, run directory)], one per student seed: the first seed's run is
        RUN/students/<mode> (a one-seed recipe's, as before seeds were lists), each further seed's
        RUN/students/<mode>-seed<S>, so adding a seed to a recipe keeps the runs already made."""
        runs = {}
        for mode in self.recipe.get("students", list(MODES)):
            runs[mode] = [(f"student-{mode}" + (f"-seed{s}" if j else ""), s,
                           self.out / "students" / (mode + (f"-seed{s}" if j else "")))
                          for j, s in enumerate(self.seeds)]
        return runs

    def students(self) -> None:
        from kdcache import open_cache
        cache = open_cache(self.cache)
        spec, complete = cache.identity, cache.seeds
        seeds = sorted(self.dump_cfg.seeds)
        runs = self.student_runs()
        for j in range(len(self.seeds)):  # seed by seed: an interrupted run has whole comparisons for its first seeds
            for mode in runs:
                name, seed, run_dir = runs[mode][j]
                self._student(mode, name, seed, run_dir, spec, complete, seeds)

    def _student(self, mode: str, name: str, seed: int, run_dir: Path, spec, complete, seeds) -> None:
        ns = _student_options(self.recipe["student"])
        ns.data, ns.out, ns.seed = self.data, run_dir, seed
        self._set_device(ns)
        upstream = {"dataset": self.dataset.fingerprint}
        if mode == "cache":
            ns.cache = self.cache
            if ns.view_seeds is None and complete != seeds:  # the recipe's seeds, not others the cache holds
                ns.view_seeds = seeds
            upstream["cache"] = {"teacher": spec["teacher"]["name"], "teacher-sha256": spec["teacher"]["sha256"],
                                 "recipe": spec["recipe"], "global-seed": spec["global_seed"], "topk": spec["topk"],
                                 "values-dtype": spec["values_dtype"], "seeds": ns.view_seeds or complete}
        else:  # the same views as the cache: its recipe, global seed and seeds
            ns.kd = mode
            self._cache_views(ns, spec)
            if ns.view_seeds is None:
                ns.view_seeds = seeds
            if mode == "online":
                self._teacher_into(ns)
        cfg = TrainConfig.from_options(ns)
        if mode == "online":
            from kdcache import ModelSpec
            upstream["teacher-sha256"] = self.teacher_identity(ModelSpec(**cfg.teacher))["sha256"]
        self._train_step(name, run_dir, cfg, upstream, [run_dir / "summary.json"])

    @staticmethod
    def _cache_views(ns, spec) -> None:
        """none and online do not read the cache: they get its whole view recipe and its global seed
        explicitly, so they train on the very views the cached student replays."""
        from kdcache import ViewRecipe
        ns.view_global_seed = spec["global_seed"]
        options.set_recipe_options(ns, ViewRecipe.from_dict(spec["recipe"]))

    # ---- training runs ------------------------------------------------------------------------------
    def _train_step(self, name: str, run_dir: Path, cfg, upstream: dict, outputs: List[Path]) -> None:
        settings = run_settings(cfg, upstream)
        self._step(name, _key(name, settings), lambda: all(p.is_file() for p in outputs),
                   lambda: self._train(name, run_dir, cfg, settings, outputs))

    @staticmethod
    def _recorded(run_dir: Path):
        """(settings, partial) a run was made with: from pipeline-settings.json, or (partial: no upstream
        identities) from the config.json of a run made otherwise; None if neither is there."""
        if (run_dir / SETTINGS).is_file():
            return json.loads((run_dir / SETTINGS).read_text())["settings"], False
        if (run_dir / "config.json").is_file():
            try:
                return run_settings(TrainConfig(**json.loads((run_dir / "config.json").read_text())), {}), True
            except (TypeError, ValueError):
                return None
        return None

    def _train(self, name: str, run_dir: Path, cfg, settings: dict, outputs: List[Path]) -> Optional[str]:
        """train-student into run_dir: started, resumed from its last.pt, or found complete. A run that has
        made something (a checkpoint, weights, a summary) with other settings is refused, never replaced."""
        from kdcache import train_student
        made = [f for f in ("last.pt", "model.safetensors", "summary.json") if (run_dir / f).is_file()]
        if made:
            recorded = self._recorded(run_dir)
            if recorded is None:
                raise KdcacheError(f"{run_dir}: holds a training run ({', '.join(made)}) whose settings are not "
                                   f"recorded (no {SETTINGS}, no readable config.json); kdcache run never deletes a "
                                   f"run: move it away to train {name} there")
            old, partial = recorded
            differ = _differences(old, settings, set(old) if partial else set(old) | set(settings))
            if differ:
                lines = [f"{run_dir} was made with other settings than the recipe gives now:"]
                lines += [f"  {k}: {_show(old.get(k, _MISSING))} -> {_show(settings.get(k, _MISSING))}" for k in differ]
                lines.append(f"kdcache run never deletes a run: to train it anew with the new settings, move it away "
                             f"(e.g. mv {run_dir} {run_dir}.old) and run again; to keep it, restore the old settings.")
                raise KdcacheError("\n".join(lines))
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / SETTINGS, json.dumps({"settings": settings}, indent=1))
        if all(p.is_file() for p in outputs):
            log.info(f"[kdcache run] {name}: {run_dir} is complete, made with the same settings; skipped")
            return "complete"
        resume = (run_dir / "last.pt").is_file()
        if resume:
            log.info(f"[kdcache run] {name}: resuming {run_dir} from its last checkpoint")
        train_student(cfg, resume=resume)
        return None

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
