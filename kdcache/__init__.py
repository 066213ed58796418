"""kdcache: the teacher runs once over augmented views; students replay them with cached soft labels."""

import os

__version__ = "0.3.0"

# OpenMP threads (torch's, and numba's in the FFCV loader) spin while they wait for work. On a machine with
# few cores shared with another process, the spinning threads burn each other's time slices: a student's
# epoch went from 2.7 s to 12.3 s next to a second training, against 2.9 s and 5.0 s with passive waiting
# (tools/bench_shared_cores.py, BENCHMARKS.md). Read when OpenMP starts, so set here, before torch is
# imported; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The public surface (docs/api.md): what other teams' code and kdcache's own commands build on, kept stable
# across minor versions (a rename keeps the old name working for one release, with a warning). Loaded on
# first use (PEP 562), so `import kdcache` stays cheap and sets OMP_WAIT_POLICY above before torch loads.
_PUBLIC = {
    # data
    "open_dataset": "kdcache.cache.reader", "PreparedDataset": "kdcache.data.dataset",
    "prepare_dataset": "kdcache.data.config", "IncompatibleDataset": "kdcache.data.prepare",
    # views
    "ViewRecipe": "kdcache.augment.recipe",
    # caches
    "open_cache": "kdcache.cache.reader", "Cache": "kdcache.cache.reader", "list_caches": "kdcache.cache.reader",
    "SparseTargets": "kdcache.cache.targets", "MixedTargets": "kdcache.cache.targets",
    "IncompatibleCache": "kdcache.cache.schema",
    # the teacher side
    "ModelSpec": "kdcache.models", "build_model": "kdcache.models",
    "DumpConfig": "kdcache.teacher.config", "dump_teacher": "kdcache.teacher.dump",
    "VerifyConfig": "kdcache.teacher.config", "verify_cache": "kdcache.teacher.verify",
    "verify_report_text": ("kdcache.teacher.verify", "render_report"),
    "CopyConfig": "kdcache.teacher.config", "copy_cache": ("kdcache.cache.copy", "copy_cache_with"),
    "DeriveConfig": "kdcache.teacher.config", "derive_cache": ("kdcache.cache.derive", "derive_cache_with"),
    "PublishConfig": "kdcache.cache.publish", "publish_root": "kdcache.cache.publish",
    "PlanConfig": "kdcache.plan", "plan_cache": "kdcache.plan", "plan_report_text": ("kdcache.plan", "render_text"),
    # training: loaders, losses, the train-student loop
    "ReplayLoader": "kdcache.student.replay", "Batch": "kdcache.student.replay",
    "ReplayDataset": "kdcache.student.dataset", "ReplayBatch": "kdcache.student.dataset",
    "PairBatchSampler": "kdcache.student.dataset", "collate_views": "kdcache.student.dataset",
    "CentreCropDataset": "kdcache.student.dataset",
    "kd_loss": "kdcache.student.losses", "dkd_loss": "kdcache.student.losses",
    "hard_label_target": "kdcache.student.losses",
    "TrainConfig": "kdcache.student.config", "train_student": "kdcache.student.train",
    # errors
    "KdcacheError": "kdcache.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    where = _PUBLIC.get(name)
    if where is None:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    import importlib
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value   # looked up once
    return value


def __dir__():
    return sorted(__all__)

