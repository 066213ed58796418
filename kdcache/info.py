"""`kdcache info`: what a path holds (a prepared dataset, or a teacher cache with its teachers), as JSON or text."""

from pathlib import Path

from kdcache.data.dataset import MANIFEST, PreparedDataset
from kdcache.errors import KdcacheError


def describe(path) -> dict:
    from kdcache.cache.location import Location
    loc = Location.of(path)
    if loc.is_local and (loc.path / MANIFEST).is_file():
        return PreparedDataset.open(loc.path).summary()
    if loc.exists("zarr.json"):
        from kdcache.cache.schema import TeacherCache
        return TeacherCache.open(loc).summary()
    raise KdcacheError(f"{path}: neither a prepared dataset nor a kdcache cache")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _logp_text(encoding: dict) -> str:
    return f"uint16, step 1/{encoding['scale']}" if encoding.get("scale") else encoding["dtype"]


def render_text(info: dict) -> str:
    from kdcache.cache.catalog import targets_text, teacher_lines
    if info["kind"] == "dataset":
        lines = [f"dataset   {info['path']}",
                 f"classes   {info['num_classes']}" + (f" ({', '.join(info['class_names'][:6])}"
                                                       f"{', ...' if len(info['class_names']) > 6 else ''})"
                                                       if info.get("class_names") else ""),
                 f"view size {info['view_size']}",
                 f"canonical max side {info['canonical']['max_side']}, JPEG quality {info['canonical']['jpeg_quality']}",
                 f"fingerprint {info['fingerprint']}",
                 f"size on disk {_dir_size(Path(info['path'])) / 2**20:.1f} MiB"]
        for name, s in info["splits"].items():
            lines.append(f"  {name:<6} {s['num_samples']:>9} samples in {s['num_shards']} shards"
                         + (f", {s['skipped']} skipped" if s["skipped"] else ""))
        return "\n".join(lines)
    if info["kind"] == "cache":
        t = info["teacher"]
        lines = [f"cache     {info['path']}",
                 f"teacher   {t['name']}  sha256 {t['sha256'][:16]}" + ("  (random init)" if t.get("random_init") else
                                                                       f"  from {t.get('checkpoint')}"),
                 f"dataset   fingerprint {info['dataset_fingerprint'][:16]}, {info['num_samples']} samples, "
                 f"{info['num_classes']} classes",
                 f"views     format {info['format_version']}: {targets_text(info)} "
                 + (f"({info['values_dtype']} logits, {info['indices_dtype']} indices) + log-sum-exp"
                    if info["format_version"] == 1 else
                    f"log-probabilities ({_logp_text(info['logp_encoding'])}, {info['indices_dtype']} indices) + "
                    + {"sampled": "tail sum of p^(1/Td)", "sampled-cv": "tail's sum, median and spread of p^(1/Td)"}
                    .get(info.get("targets"), "tail mass"))
                 + f" + {info['param_columns']} view parameters; global seed {info['global_seed']}",
                 f"recipe    {info['recipe_summary']}"
                 + (f"; renderer {info['renderer']['version']} ({', '.join(f'{k} {v}' for k, v in info['renderer']['libraries'].items())})"
                    if info.get("renderer") else ""),
                 f"seeds     complete {info['seeds_complete']}"
                 + (f"; in progress (blocks done of {info['num_blocks_per_seed']}): {info['seeds_in_progress']}"
                    if info["seeds_in_progress"] else ""),
                 f"size      {info['bytes_on_disk'] / 2**20:.1f} MiB on disk"
                 + (f", {info['bytes_per_view']:.1f} bytes/view (raw {info['raw_bytes_per_view']})" if info["bytes_per_view"] else "")]
        lines += teacher_lines(info.get("teachers", ()), "teachers  ", "          ")
        for s, summ in sorted(info["seed_summary"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"  seed {s:>4}: teacher top-1 on its own views {100 * summ['teacher_top1']:.2f} %")
        return "\n".join(lines)
    raise KdcacheError(f"unknown kind {info['kind']!r}")
