"""Cache schema: identity (what a cache was made from), layout, create-or-open with compatibility checks.

One Zarr v3 group (format version 4). Per augmentation seed s, a group seeds/<s:06d> of four arrays over
the N samples (n = k stored columns for top-k targets, k + m for sampled ones: docs/cache-format.md):

    logp      (N, n)  uint16 (or float32)  teacher log-probabilities of the stored classes  fill 65535 (NaN)
                      uint16: fixed point q = round(-logp * LOGP_SCALE), clamped to 65535
    indices   (N, n)  int16 (int32 if C > 32767)  their class indices        fill -1
    log_tail  (N,)    float32  log of the mass of the C - k other classes    fill NaN  (-inf when k = C)
              (N, 3)  for sampled-cv targets: log S, log beta, log A of the tail (docs/cache-format.md)
    params    (N, P)  float32  view parameters [top, left, height, width, flip, ...]  fill NaN

More teachers over the same views (dump-teacher --add-teacher) are caches of their own under
teachers/<label>/: the same layout without `params` (the views are the main cache's), their own identity
(with `views_of`, the main cache's identity hash), markers and claims.

Inner chunks of `chunk_rows` samples, shards of `unit_size` samples: a work unit (seed, block) is
exactly one shard of each of the four arrays, written whole, once, by one writer. Arrays are created
at full shape by the coordinator before any unit is written; only the coordinator writes metadata.
Version 1 caches (values = top-k logits, lse) are read, not written (kdcache.cache.slabs converts them).
"""

import datetime
import getpass
import json
import math
import os
import re
import socket
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import zarr
from zarr.codecs import BloscCodec, TransposeCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from kdcache import __version__
from kdcache.cache.ledger import Ledger
from kdcache.cache.location import Location
from kdcache.cache.marker import IDENTITY_HASH, DamagedMarker, identity_hash, parse as parse_marker
from kdcache.errors import KdcacheError

FORMAT = "kdcache-teacher-cache"
# 3: the root zarr.json is never rewritten (no seed lists in it: seeds are the groups, completeness the
# markers), markers carry their shards' CRC32C, claims have generations. The arrays are as in version 2,
# so 2 is read as it is; it is not extended, because a kdcache that reads version 2 would trust the seed
# list in its root attributes and miss the seeds added since.
# 4: sampled targets (spec.targets, samples, sample_temperature), more teachers under teachers/, derived
# caches (derived_from); sampled-cv targets (a median control variate: log_tail has 3 columns), a kind an
# earlier version-4 reader refuses by name. Version 3 caches are extended as version 3 (their targets are top-k).
FORMAT_VERSION = 4                  # what this kdcache writes
READ_VERSIONS = (1, 2, 3, 4)        # what it reads
EXTEND_VERSIONS = (3, 4)            # what it extends
ARRAYS = ("logp", "indices", "log_tail", "params")
TARGET_ARRAYS = ("logp", "indices", "log_tail")   # an added teacher's (its views are the main cache's)
V1_ARRAYS = ("values", "indices", "lse", "params")
TARGET_KINDS = ("topk", "sampled", "sampled-cv")
SAMPLED_KINDS = ("sampled", "sampled-cv")   # top k plus m draws from the tail
# docs/cache-format.md (kdcache.cache.targets)
TOPK_RULE, SAMPLED_RULE, CV_RULE = "uniform-tail-v2", "importance-tail-v1", "median-control-variate-v1"
TAIL_RULES = {"topk": TOPK_RULE, "sampled": SAMPLED_RULE, "sampled-cv": CV_RULE}
TEACHERS = "teachers"               # the folder of added teachers
# uint16 log-probabilities: a step of 1/2048 in log space is a relative error <= 2.5e-4 on every stored
# probability (half a step, rounded); 65535 steps reach down to p = exp(-32) = 1.3e-14 (smaller ones clamp there)
LOGP_SCALE = 2048
LOGP_MAX = 65535


class NotACache(KdcacheError):
    """A readable Zarr group that is not a kdcache cache (a cache root may hold other things)."""


class IncompatibleCache(KdcacheError):
    """A cache exists at the path, made from other inputs (the message names the first differing setting)."""


@dataclass
class CacheSpec:
    """The identity of a cache: every run writing into it must match all of this."""

    teacher: dict          # kdcache.models.build_model info: name, sha256, num_classes, mean, std, ...
    dataset: dict          # fingerprint, split, split_fingerprint, num_samples, num_classes, view_size
    recipe: dict           # ViewRecipe.to_dict()
    global_seed: int
    topk: int
    values_dtype: str = "uint16"        # stored log-probabilities: uint16 fixed point or float32 (v1: float16/32 logits)
    unit_size: int = 32768
    chunk_rows: int = 32768             # one inner chunk per shard: students read whole slabs (BENCHMARKS.md)
    targets: str = "topk"               # topk | sampled | sampled-cv (format 4: docs/cache-format.md, "Targets")
    samples: int = 0                    # sampled: m draws from the tail per view
    sample_temperature: float = 1.0     # sampled: Td (the draws' q ~ p^(1/Td) or ~ |p^(1/Td) - beta|); unbiased at T = Td

    @property
    def sampled(self) -> bool:
        """Targets with draws from the tail (sampled or sampled-cv)."""
        return self.targets in SAMPLED_KINDS

    @property
    def tail_columns(self) -> int:
        """Columns of `log_tail`: 1 (stored as an (N,) array), 3 for sampled-cv (log S, log beta, log A)."""
        return 3 if self.targets == "sampled-cv" else 1

    @property
    def stored_columns(self) -> int:
        """Columns of `logp` and `indices`: k, plus the m draws of sampled targets."""
        return self.topk + self.samples

    @property
    def exact_columns(self) -> Optional[int]:
        """For kdcache.cache.targets.SparseTargets: k for sampled targets, None for top-k ones."""
        return self.topk if self.sampled else None

    def target_rule(self) -> dict:
        """The keyword arguments that make kdcache.cache.targets.SparseTargets read this cache's rows right."""
        rule = {"exact": self.exact_columns, "sample_temperature": float(self.sample_temperature)}
        if self.targets == "sampled-cv":
            rule["control_variate"] = True
        return rule

    @property
    def tail_rule(self) -> str:
        return TAIL_RULES[self.targets]

    @property
    def num_samples(self) -> int:
        return int(self.dataset["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.dataset["num_classes"])

    @property
    def indices_dtype(self) -> str:
        return "int16" if self.num_classes <= 32767 else "int32"

    @property
    def param_columns(self) -> int:
        """Width of a view's parameter row (kdcache.augment.params.ParamLayout of the recipe)."""
        from kdcache.augment.params import ParamLayout
        from kdcache.augment.recipe import ViewRecipe
        return ParamLayout.of(ViewRecipe.from_dict(self.recipe)).width

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_samples / self.unit_size)

    def validate(self) -> None:
        if not 1 <= self.topk <= self.num_classes:
            raise KdcacheError(f"--topk {self.topk} must be between 1 and the class count {self.num_classes}")
        if self.targets not in TARGET_KINDS:
            raise KdcacheError(f"--targets must be one of {', '.join(TARGET_KINDS)}, got {self.targets!r}")
        if self.sampled:
            if self.topk >= self.num_classes:
                raise KdcacheError(f"--targets {self.targets} draws from the classes beyond the top {self.topk}, but "
                                   f"the teacher has only {self.num_classes}: lower --topk (or use --targets topk)")
            if not 1 <= self.samples <= 4096:
                raise KdcacheError(f"--samples {self.samples}: --targets {self.targets} needs 1 to 4096 draws per view")
            if not 0 < self.sample_temperature < 1e4:
                raise KdcacheError(f"--sample-temperature {self.sample_temperature} must be positive")
        elif self.samples or self.sample_temperature != 1.0:
            raise KdcacheError("--samples and --sample-temperature are settings of --targets sampled or sampled-cv")
        if self.values_dtype not in ("uint16", "float32"):
            raise KdcacheError(f"--values-dtype must be uint16 (fixed-point log-probabilities) or float32, "
                               f"got {self.values_dtype!r}")
        if self.unit_size < 1 or self.chunk_rows < 1 or self.unit_size % self.chunk_rows:
            raise KdcacheError(f"--unit-size {self.unit_size} must be a positive multiple of the chunk rows {self.chunk_rows}")
        if self.teacher["num_classes"] != self.num_classes:
            raise KdcacheError(f"teacher has {self.teacher['num_classes']} classes, the dataset {self.num_classes}")
        mix_block = self.recipe.get("mix_block", 0)
        if (self.recipe.get("mixup", 0) or self.recipe.get("cutmix", 0)) and self.unit_size % mix_block \
                and self.unit_size < self.num_samples:
            # a pair must never straddle two work units: they may be written by different processes
            raise KdcacheError(f"--unit-size {self.unit_size} must be a multiple of --mix-block {mix_block} "
                               "when the recipe mixes")

    def identity(self) -> Dict[str, object]:
        """Flattened fields that must be equal for two runs to share a cache (error messages name them)."""
        return {"teacher.name": self.teacher["name"], "teacher.sha256": self.teacher["sha256"],
                "teacher.mean": self.teacher["mean"], "teacher.std": self.teacher["std"],
                "dataset.split_fingerprint": self.dataset["split_fingerprint"],
                "dataset.num_samples": self.dataset["num_samples"], "dataset.num_classes": self.dataset["num_classes"],
                "recipe": self.recipe, "global_seed": self.global_seed, "topk": self.topk,
                "values_dtype": self.values_dtype, "unit_size": self.unit_size, "chunk_rows": self.chunk_rows,
                "targets": self.targets, "samples": self.samples, "sample_temperature": self.sample_temperature}

    def block_bounds(self, block: int):
        a = block * self.unit_size
        return a, min(a + self.unit_size, self.num_samples)


def _codecs(dtype: str):
    # measured on top-k logits (shared/notes/zarr_wds.md): byte shuffle suits floats, bitshuffle suits small ints;
    # uint16 logp (not "int...") gets byte shuffle: 17.5 bytes per 10 values against 17.8 with bitshuffle
    shuffle = "bitshuffle" if dtype.startswith("int") else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


def _array_layout(spec: CacheSpec, with_params: bool = True) -> Dict[str, dict]:
    n, k, rows, unit = spec.num_samples, spec.stored_columns, spec.chunk_rows, spec.unit_size
    if not with_params:
        return {a: kw for a, kw in _array_layout(spec).items() if a in TARGET_ARRAYS}
    p = spec.param_columns
    return {
        "logp": dict(shape=(n, k), dtype=spec.values_dtype, chunks=(rows, k), shards=(unit, k),
                     fill_value=LOGP_MAX if spec.values_dtype == "uint16" else np.nan),
        "indices": dict(shape=(n, k), dtype=spec.indices_dtype, chunks=(rows, k), shards=(unit, k), fill_value=-1),
        "log_tail": (dict(shape=(n,), dtype="float32", chunks=(rows,), shards=(unit,), fill_value=np.nan)
                     if spec.tail_columns == 1 else
                     dict(shape=(n, spec.tail_columns), dtype="float32", chunks=(rows, spec.tail_columns),
                          shards=(unit, spec.tail_columns), fill_value=np.nan)),
        # stored column by column (zarr's transpose codec): constant and small-integer columns then compress
        # to almost nothing (measured 36 -> 29 B per 16-column row)
        "params": dict(shape=(n, p), dtype="float32", chunks=(rows, p), shards=(unit, p), fill_value=np.nan,
                       filters=[TransposeCodec(order=(1, 0))]),
    }


def logp_encoding(values_dtype: str) -> dict:
    """The root attribute that tells a reader how to decode the stored `logp`."""
    if values_dtype == "uint16":
        return {"dtype": "uint16", "scale": LOGP_SCALE, "max": LOGP_MAX}
    return {"dtype": values_dtype}


def encode_logp(logp: np.ndarray, values_dtype: str) -> np.ndarray:
    """Log-probabilities -> their stored form."""
    if values_dtype != "uint16":
        return np.asarray(logp, dtype=values_dtype)
    q = np.rint(-np.asarray(logp, np.float64) * LOGP_SCALE)
    # NaN (a broken teacher) stores as the fill value; its log_tail is NaN too, which verify reports
    return np.clip(np.nan_to_num(q, nan=LOGP_MAX), 0, LOGP_MAX).astype(np.uint16)


def decode_logp(stored: np.ndarray, encoding: dict) -> np.ndarray:
    """Stored `logp` -> float32 log-probabilities (exact: the scale is a power of two)."""
    if stored.dtype == np.uint16:
        return stored.astype(np.float32) * np.float32(-1.0 / encoding["scale"])
    return stored.astype(np.float32, copy=False)


def _recipe_summary(recipe: dict) -> str:
    from kdcache.augment.recipe import ViewRecipe
    return ViewRecipe.from_dict(recipe).summary()


def renderer_record(spec: CacheSpec) -> dict:
    """What made the pixels: the renderer version, the libraries' versions and the parameter columns."""
    from kdcache.augment.params import ParamLayout
    from kdcache.augment.recipe import ViewRecipe
    from kdcache.augment.render import library_versions
    recipe = ViewRecipe.from_dict(spec.recipe)
    return {"version": recipe.renderer, "libraries": library_versions(),
            "param_columns": ParamLayout.of(recipe).columns()}


MAX_SEED = 999_999   # augmentation seeds: unsigned in the view RNG, and 6 digits in the group names


def seed_group_name(seed: int) -> str:
    return f"seeds/{seed:06d}"


class TeacherCache:
    def __init__(self, location: Location, group: zarr.Group, read_only: bool):
        self.location = location
        self.group = group
        self.read_only = read_only
        attrs = dict(group.attrs)
        self.attrs = attrs
        self.spec = _spec_from(location, attrs)
        self.version = int(attrs["format_version"])
        self.identity_hash = attrs.get(IDENTITY_HASH)   # None: made before caches were sealed
        self.ledger = Ledger(location, identity=self.identity_hash)
        self.views_of: Optional[str] = attrs.get("views_of")   # an added teacher: the main cache's identity hash
        self.label: str = str(attrs.get("teacher_label") or self.spec.teacher.get("name") or "teacher")

    @property
    def path(self) -> str:
        """Where the cache is, for messages: a local path or a URL."""
        return self.location.url

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, where, mode: str = "r") -> "TeacherCache":
        """Open for reading (mode "r": nothing is ever written, read-only mounts and credentials work)
        or for writing units ("r+")."""
        loc = Location.of(where)
        try:
            root = json.loads(loc.read("zarr.json"))
        except FileNotFoundError:
            raise KdcacheError(f"{loc}: not a kdcache cache (no zarr.json)") from None
        except (OSError, ValueError) as exc:
            raise KdcacheError(f"{loc}: cannot read zarr.json ({exc})") from exc
        attrs = root.get("attributes", {}) if isinstance(root, dict) else None
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
            raise NotACache(f"{loc}: zarr group is not a {FORMAT} "
                               f"(format={attrs.get('format') if isinstance(attrs, dict) else None!r})")
        _check_readable(loc, attrs.get("format_version"))
        if IDENTITY_HASH in attrs and identity_hash(attrs) != attrs[IDENTITY_HASH]:
            raise KdcacheError(f"{loc}/zarr.json: the cache's identity does not match its recorded {IDENTITY_HASH} "
                               f"(content {identity_hash(attrs)[:16]}, recorded {str(attrs[IDENTITY_HASH])[:16]}): "
                               "the document was edited or damaged, so what the arrays mean cannot be trusted; "
                               "restore it from a copy of the cache (kdcache copy) or dump into a new --out")
        group = zarr.open_group(loc.zarr_store(read_only=(mode == "r")), mode="r" if mode == "r" else "r+")
        return cls(loc, group, read_only=(mode == "r"))

    @classmethod
    def create_or_open(cls, where, spec: CacheSpec, seeds: List[int], extra: Optional[dict] = None) -> "TeacherCache":
        """Create the cache (or check that the existing one has the same identity) and allocate the arrays
        of `seeds` at full shape. Any number of processes may call it at once, and again after a crash at
        any point: the identity is created exclusively, array creation is idempotent. `extra`: more root
        attributes, sealed with the identity (views_of and teacher_label of an added teacher, derived_from)."""
        spec.validate()
        loc = Location.of(where)
        identity = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": asdict(spec),
                    "tail_rule": spec.tail_rule, "logp_encoding": logp_encoding(spec.values_dtype),
                    "kdcache_version": __version__, "renderer": renderer_record(spec),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "created_by": _who(), **(extra or {})}
        identity[IDENTITY_HASH] = identity_hash(identity)
        if not loc.exists("zarr.json"):
            refuse_foreign_directory(loc)
            # The root group's zarr.json holds the identity and is never rewritten: one exclusive create
            # (two jobs creating one cache: one wins, the other checks the winner's identity)
            doc = {"zarr_format": 3, "node_type": "group", "attributes": identity}
            loc.create("zarr.json", json.dumps(doc, indent=2).encode())
        cache = cls.open(loc, mode="r+")
        if cache.version not in EXTEND_VERSIONS:  # v1 and v2 are read, never extended (see FORMAT_VERSION)
            raise IncompatibleCache(f"{loc}: cache format version {cache.version} is read by this kdcache but not "
                                    f"extended (it extends versions {', '.join(map(str, EXTEND_VERSIONS))}); dump "
                                    "into a new --out")
        check_compatible(loc, cache.spec, spec)
        for key, value in (extra or {}).items():
            if cache.attrs.get(key) != value:
                raise IncompatibleCache(f"{loc}: cache was made with {key}={_short(cache.attrs.get(key))}, this run "
                                        f"has {key}={_short(value)}; write to another --out")
        cache.allocate(seeds)
        return cache

    # ---- more teachers over the same views ----------------------------------------------------------
    def teacher_location(self, label: str) -> Location:
        from kdcache.cache.location import check_name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", label or ""):
            raise KdcacheError(f"teacher label {label!r}: use 1-64 letters, digits, '_', '.' or '-' (starting with a "
                               "letter or digit)")
        return self.location.child(TEACHERS).child(check_name(label, "teacher label"))

    def added_teachers(self) -> Dict[str, "TeacherCache"]:
        """The teachers added over this cache's views (label -> their cache), each checked to belong here."""
        out = {}
        for label in sorted(self.location.children(TEACHERS)):
            try:
                loc = self.teacher_location(label)
            except KdcacheError:
                continue   # not a name kdcache gives a teacher: not one of ours
            if not loc.exists("zarr.json"):
                continue
            teacher = TeacherCache.open(loc, mode="r" if self.read_only else "r+")
            if teacher.views_of != self.identity_hash:
                raise KdcacheError(f"{loc}: an added teacher whose views_of ({str(teacher.views_of)[:16]}) is not "
                                   f"this cache's identity ({str(self.identity_hash)[:16]}): it was made over other "
                                   "views; remove it or restore the cache from a copy")
            out[label] = teacher
        return out

    def teachers(self) -> Dict[str, "TeacherCache"]:
        """Every teacher of the cache by label: this cache's own first (its label: the teacher's name), then
        the added ones."""
        return {self.label: self, **self.added_teachers()}

    def add_teacher(self, label: str, spec: CacheSpec, seeds: List[int]) -> "TeacherCache":
        """Create (or open, checked) the cache of another teacher over this cache's views, with the arrays
        of `seeds`. Its spec must share this cache's dataset, recipe, global seed and units."""
        if self.views_of:
            raise KdcacheError(f"{self.path}: is an added teacher; add teachers to the main cache")
        if label == self.label:
            raise KdcacheError(f"{self.path}: the cache's own teacher is labelled {label!r}; give the added teacher "
                               "another --teacher-label")
        for field in ("dataset.split_fingerprint", "dataset.num_samples", "recipe", "global_seed", "unit_size",
                      "chunk_rows"):
            if self.spec.identity()[field] != spec.identity()[field]:
                raise IncompatibleCache(f"{self.path}: an added teacher must score this cache's views, but its "
                                        f"{field} differs ({_short(spec.identity()[field])} against the cache's "
                                        f"{_short(self.spec.identity()[field])})")
        return TeacherCache.create_or_open(self.teacher_location(label), spec, seeds,
                                           extra={"views_of": self.identity_hash, "teacher_label": label})

    def allocate(self, seeds: List[int]) -> None:
        """Create the arrays of `seeds` that do not exist yet (idempotent under races: two processes
        creating one array write the same metadata, and the loser's ContainsArrayError is expected)."""
        layout = _array_layout(self.spec, with_params=not self.views_of)
        for s in seeds:
            name = seed_group_name(s)
            for array, kw in layout.items():
                # by its metadata document: a kill during creation can leave the array's directory without one
                if not self.location.exists(f"{name}/{array}/zarr.json"):
                    try:
                        self.group.create_array(f"{name}/{array}", compressors=_codecs(kw["dtype"]),
                                                dimension_names=None, **kw)
                        continue
                    except (ContainsArrayError, ContainsGroupError):
                        pass  # created by another process meanwhile: checked below
                arr = zarr.open_array(self.group.store, path=f"{name}/{array}", mode="r")
                if arr.shape != kw["shape"] or str(arr.dtype) != kw["dtype"]:
                    raise KdcacheError(f"{self.location}/{name}/{array}: shape {arr.shape} {arr.dtype} "
                                       f"differs from the expected {kw['shape']} {kw['dtype']}")

    # ---- contents ------------------------------------------------------------------------------
    @property
    def seeds(self) -> List[int]:
        """Seeds whose arrays exist, from the store itself (never from attributes another job could race)."""
        return sorted(int(n) for n in self.location.children("seeds") if n.isdigit())

    def arrays(self, seed: int) -> Dict[str, zarr.Array]:
        """The seed's arrays, each metadata document checked against the identity (shape, dtype)."""
        name = seed_group_name(seed)
        layout = _array_layout(self.spec, with_params=not self.views_of) if self.version >= 2 else {}
        out = {}
        for a in self.array_names:
            key = f"{name}/{a}/zarr.json"
            where = f"{self.location}/{key}"
            fix = ("; restore the cache from a copy (kdcache copy skips nothing it has not checked) or dump "
                   "this seed into a new --out")
            try:
                doc = json.loads(self.location.read(key))
                if not isinstance(doc, dict):
                    raise ValueError(f"a JSON {type(doc).__name__}, not an object")
                out[a] = zarr.open_array(self.group.store, path=f"{name}/{a}", mode="r" if self.read_only else "r+")
            except FileNotFoundError:
                if seed not in self.seeds:   # listed only here: the common path costs no listing
                    raise KdcacheError(f"{self.path}: seed {seed} is not in this cache (seeds {self.seeds})") from None
                raise KdcacheError(f"{where}: array metadata is missing{fix}") from None
            except Exception as exc:  # JSON, zarr's own validation (unknown dtype, codec, ...)
                raise KdcacheError(f"{where}: array metadata cannot be read ({type(exc).__name__}: {exc}){fix}") from None
            want = layout.get(a)
            if want and (tuple(out[a].shape) != tuple(want["shape"]) or str(out[a].dtype) != want["dtype"]
                         or tuple(out[a].shards or ()) != tuple(want["shards"])):
                raise KdcacheError(f"{where}: array is {tuple(out[a].shape)} {out[a].dtype} in shards of "
                                   f"{out[a].shards}, but the cache's identity (zarr.json: {self.spec.num_samples} "
                                   f"samples, top-{self.spec.topk}, {self.spec.values_dtype}, units of "
                                   f"{self.spec.unit_size}) says {tuple(want['shape'])} {want['dtype']} in shards of "
                                   f"{tuple(want['shards'])}: one of the two documents was changed{fix}")
        return out

    def checked_markers(self, seed: int, exclude=()) -> Tuple[Dict[int, dict], Dict[int, str]]:
        """The markers of a seed's finished units, each checked (kdcache.cache.marker.parse): block ->
        payload for the good ones, block -> what is wrong for a damaged, edited or foreign one."""
        good, bad = {}, {}
        for b, data in self.ledger.marker_bytes(seed).items():
            if b in exclude:
                continue
            try:
                good[b] = parse_marker(data, f"{self.location}/{Ledger.marker_key(seed, b)}",
                                       identity=self.identity_hash, arrays=self.array_names,
                                       need_objects=self.version >= 3)
            except DamagedMarker as exc:
                bad[b] = str(exc)
        return good, bad

    def markers(self, seed: int, exclude=()) -> Dict[int, dict]:
        """The checked markers of a seed's finished units; a bad one is refused by path (DamagedMarker),
        never read as 'done, nothing to check'."""
        good, bad = self.checked_markers(seed, exclude)
        if bad:
            raise DamagedMarker(bad[min(bad)])
        return good

    def chunk_key(self, seed: int, array: zarr.Array, name: str, block: int) -> str:
        """The store key of unit (seed, block)'s shard of one array."""
        coords = (block,) + (0,) * (array.ndim - 1)
        return f"{seed_group_name(seed)}/{name}/{array.metadata.encode_chunk_key(coords)}"

    @property
    def array_names(self):
        if self.views_of:
            return TARGET_ARRAYS
        return ARRAYS if self.version >= 2 else V1_ARRAYS

    def missing_blocks(self, seed: int, done=None) -> List[int]:
        done = self.ledger.done_blocks(seed) if done is None else done
        return [b for b in range(self.spec.num_blocks) if b not in done]

    def check_made_for(self, dataset, split: str = "train") -> None:
        """Refuse (KdcacheError) a prepared dataset other than the one this cache was dumped over: another split
        fingerprint (another dataset, or another prepare of it) or another class count. The one check of
        train-student, the public Cache and ReplayDataset."""
        fingerprint = dataset.split(split).fingerprint
        made_for = str(self.spec.dataset.get("split_fingerprint"))
        if made_for != fingerprint:
            raise KdcacheError(f"{self.path}: made for dataset split {made_for[:16]}, but {dataset.root} {split} is "
                               f"{fingerprint[:16]} (another dataset or another prepare)")
        if self.spec.num_classes != dataset.num_classes:
            raise KdcacheError(f"{self.path}: {self.spec.num_classes} teacher classes, the dataset {dataset.root} "
                               f"has {dataset.num_classes}")

    def complete_seeds(self, seeds: Optional[List[int]] = None, done=None) -> List[int]:
        """Seeds (default: all) whose every unit has its marker; `done`: a ledger.done_units() already read."""
        done = self.ledger.done_units() if done is None else done
        return [s for s in (self.seeds if seeds is None else seeds) if len(done.get(s, ())) >= self.spec.num_blocks]

    def seed_summary(self, seed: int) -> Optional[dict]:
        markers = self.markers(seed)
        if len(markers) < self.spec.num_blocks:
            return None
        views = sum(m.get("views", 0) for m in markers.values())
        return {"views": views, "teacher_top1": sum(m.get("correct", 0) for m in markers.values()) / max(views, 1)}

    def bytes_on_disk(self) -> int:
        return sum(self.location.sizes("seeds").values())

    def raw_bytes_per_view(self) -> int:
        """Uncompressed bytes of one view's rows, from the arrays themselves (their columns vary by version)."""
        seeds = self.seeds
        if seeds:
            shapes = [(a.shape, a.dtype) for a in self.arrays(seeds[0]).values()]
        else:
            shapes = [(kw["shape"], kw["dtype"]) for kw in _array_layout(self.spec, not self.views_of).values()]
        return sum(int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in shapes)

    def summary(self) -> dict:
        seeds = self.seeds
        done = self.ledger.done_units()
        complete = self.complete_seeds(seeds, done)
        views = len(complete) * self.spec.num_samples
        on_disk = self.bytes_on_disk()
        return {
            "kind": "cache", "path": self.path, "format_version": self.version,
            "num_samples": self.spec.num_samples, "num_classes": self.spec.num_classes, "topk": self.spec.topk,
            "targets": self.spec.targets, "samples": self.spec.samples,
            "sample_temperature": self.spec.sample_temperature,
            "seeds": seeds, "seeds_complete": complete,
            "seeds_in_progress": {str(s): len(done.get(s, ())) for s in seeds if s not in complete},
            "num_blocks_per_seed": self.spec.num_blocks,
            "teacher": {k: self.spec.teacher.get(k) for k in ("name", "sha256", "num_classes", "checkpoint", "random_init")},
            "dataset_fingerprint": self.spec.dataset["fingerprint"],
            "split_fingerprint": self.spec.dataset["split_fingerprint"],
            "recipe": self.spec.recipe, "global_seed": self.spec.global_seed,
            "recipe_summary": _recipe_summary(self.spec.recipe), "param_columns": self.spec.param_columns,
            "renderer": self.attrs.get("renderer"),
            "values_dtype": self.spec.values_dtype, "indices_dtype": self.spec.indices_dtype,
            "logp_encoding": self.attrs.get("logp_encoding"), "tail_rule": self.attrs.get("tail_rule"),
            "unit_size": self.spec.unit_size,
            "bytes_on_disk": on_disk,
            "bytes_per_view": (on_disk / views) if views else None,
            "raw_bytes_per_view": self.raw_bytes_per_view(),
            "seed_summary": {str(s): self.seed_summary(s) for s in complete},
            "kdcache_version": self.attrs.get("kdcache_version"), "created": self.attrs.get("created"),
            "created_by": self.attrs.get("created_by"),
            "label": self.label, "views_of": self.views_of,
            # every teacher over these views, its own first (train-student --teachers takes these labels)
            "teachers": [dict(_teacher_entry(t), seeds_complete=complete if t is self else t.complete_seeds())
                         for t in self.teachers().values()],
        }


def _teacher_entry(cache: "TeacherCache") -> dict:
    """A teacher of a cache, as `kdcache info` and `ls` list it (its seeds_complete added by the caller)."""
    spec = cache.spec
    return {"label": cache.label, "name": spec.teacher.get("name"), "sha256": spec.teacher.get("sha256"),
            "topk": spec.topk, "targets": spec.targets, "samples": spec.samples,
            "sample_temperature": spec.sample_temperature, "values_dtype": spec.values_dtype}


def _spec_from(loc: Location, attrs: dict) -> CacheSpec:
    """The identity of a cache's root document, its fields checked for type (a hand-edited or damaged
    document is named, not trusted)."""
    kind = attrs.get("spec", {}).get("targets", "topk") if isinstance(attrs.get("spec"), dict) else None
    if isinstance(kind, str) and kind not in TARGET_KINDS:
        # a kind added after this kdcache (as sampled-cv was within version 4): not damage, a newer writer
        raise KdcacheError(f"{loc}: its targets are {kind!r}, a kind this kdcache ({__version__}) does not know (it "
                           f"reads {', '.join(TARGET_KINDS)}); the cache was made by kdcache "
                           f"{attrs.get('kdcache_version', '?')}: read it with that version or a newer one")
    try:
        spec = CacheSpec(**attrs["spec"])
        for name in ("teacher", "dataset", "recipe"):
            if not isinstance(getattr(spec, name), dict):
                raise TypeError(f"spec.{name} is not a table")
        for name in ("global_seed", "topk", "unit_size", "chunk_rows", "samples"):
            if not isinstance(getattr(spec, name), int) or isinstance(getattr(spec, name), bool):
                raise TypeError(f"spec.{name} is not an integer")
        if spec.targets not in TARGET_KINDS or (spec.targets == "topk") != (spec.samples == 0) \
                or not isinstance(spec.sample_temperature, (int, float)) or not spec.sample_temperature > 0:
            raise ValueError(f"targets {spec.targets!r} with samples {spec.samples} at sample_temperature "
                             f"{spec.sample_temperature!r} is not a target kind this kdcache knows")
        spec.num_samples, spec.num_classes  # noqa: B018 (they must be integers)
        if spec.num_samples < 1 or not 1 <= spec.topk <= spec.num_classes or spec.unit_size < 1:
            raise ValueError(f"num_samples {spec.num_samples}, topk {spec.topk}, num_classes {spec.num_classes}, "
                             f"unit_size {spec.unit_size} are out of range")
        int(attrs["format_version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KdcacheError(f"{loc}/zarr.json: the cache's identity cannot be read ({type(exc).__name__}: {exc}); "
                           "restore it from a copy of the cache or dump into a new --out") from None
    return spec


def refuse_foreign_directory(loc: Location) -> None:
    """A new cache goes into an empty or absent directory, never over someone's files."""
    if loc.is_local and loc.path.is_symlink() and not loc.path.exists():
        raise KdcacheError(f"{loc}: a symbolic link to {os.readlink(loc.path)}, which does not exist; create that "
                           "directory first, or give a path that is not a dangling link")
    if loc.is_local and loc.path.exists() and any(loc.path.iterdir()):
        raise KdcacheError(f"{loc}: exists and is not a kdcache cache")


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _check_readable(path, version) -> None:
    if version in READ_VERSIONS:
        return
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise KdcacheError(f"{path}: cache format version {version} is newer than this kdcache reads "
                           f"(versions {', '.join(map(str, READ_VERSIONS))}); use a newer kdcache")
    raise KdcacheError(f"{path}: cache format version {version!r} is not one this kdcache reads "
                       f"(versions {', '.join(map(str, READ_VERSIONS))})")


def check_compatible(path, existing: CacheSpec, wanted: CacheSpec) -> None:
    old, new = existing.identity(), wanted.identity()
    for key in old:
        if old[key] != new[key]:
            if isinstance(old[key], dict) and isinstance(new[key], dict):  # name the fields, not two long dicts
                fields = sorted(k for k in set(old[key]) | set(new[key]) if old[key].get(k) != new[key].get(k))
                was = ", ".join(f"{key}.{k}={_short(old[key].get(k))}" for k in fields)
                now = ", ".join(f"{key}.{k}={_short(new[key].get(k))}" for k in fields)
                hint = (" (pass --renderer %s to extend it with the renderer that made it)" % old[key]["renderer"]
                        if "renderer" in fields and key == "recipe" else "")
                raise IncompatibleCache(f"{path}: cache was made with {was}, this run has {now}; write to another "
                                        f"--out{hint}")
            raise IncompatibleCache(f"{path}: cache was made with {key}={_short(old[key])}, this run has "
                                    f"{key}={_short(new[key])}; write to another --out")


def _short(v) -> str:
    s = str(v)
    return s if len(s) < 120 else s[:117] + "..."
