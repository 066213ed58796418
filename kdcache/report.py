"""The report of a pipeline run: a table (val top-1 as mean ± spread over the student seeds, epoch time,
teacher forward time saved per student), whether the differences between the ways exceed the seed-to-seed
spread, report.md, summary.json, plots (accuracy curves, final accuracy per seed, epoch times) and the
preview picture.

Spread: max - min of a way's final val top-1 over its seeds; the table shows mean ± spread/2 (the interval
holds every seed's value). A difference between two ways exceeds the seed spread when the difference of
their means is larger than the larger of their two spreads; with one seed per way nothing can be said."""

import json
import logging
import statistics
from pathlib import Path

from kdcache.log import RESULT
from kdcache.files import atomic_file, atomic_write

# per-run numbers kept in summary.json's students.<way>.runs, averaged into students.<way>
RUN_KEYS = ("val_top1", "best_top1", "val_top5", "epoch_time_s", "img_per_s", "teacher_forward_s_per_epoch")
COMPARISONS = (("cache", "online", "cached vs online KD"), ("cache", "none", "cached KD vs none"),
               ("online", "none", "online KD vs none"))
COLORS = {"none": "#999999", "online": "#d95f02", "cache": "#1b9e77"}

logger = logging.getLogger(__name__)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _evals(run: Path):
    from kdcache.student.report import MetricsLog
    return [r for r in MetricsLog(Path(run) / "metrics.jsonl").records() if r["kind"] == "eval"]


def way_summary(runs: list) -> dict:
    """One way's runs (one dict per seed, RUN_KEYS and seed) -> the means of RUN_KEYS, the spread (max - min)
    and the runs themselves."""
    top1 = [r["val_top1"] for r in runs]
    way = {k: round(statistics.fmean(r[k] for r in runs), 4) for k in RUN_KEYS}
    way.update(val_top1_min=min(top1), val_top1_max=max(top1), val_top1_spread=round(max(top1) - min(top1), 4),
               seeds=[r["seed"] for r in runs], runs=runs)
    return way


def compare(students: dict) -> list:
    """The differences between the ways, each against the seed spread: [{a, b, what, diff, per_seed, spread,
    seeds, exceeds}] (exceeds: None with one seed per way, when nothing can be said)."""
    out = []
    for a, b, what in COMPARISONS:
        if a not in students or b not in students:
            continue
        sa, sb = students[a], students[b]
        by_seed = {r["seed"]: r["val_top1"] for r in sb["runs"]}
        per_seed = {r["seed"]: round(r["val_top1"] - by_seed[r["seed"]], 4) for r in sa["runs"] if r["seed"] in by_seed}
        n = min(len(sa["runs"]), len(sb["runs"]))
        spread = max(sa["val_top1_spread"], sb["val_top1_spread"])
        diff = round(sa["val_top1"] - sb["val_top1"], 4)
        out.append({"a": a, "b": b, "what": what, "diff": diff, "per_seed": per_seed, "spread": spread,
                    "seeds": n, "exceeds": (abs(diff) > spread) if n >= 2 else None})
    return out


def _verdict(c: dict) -> str:
    per = ", ".join(f"{d:+.2f}" for d in c["per_seed"].values())
    head = f"- **{c['what']}**: {c['diff']:+.2f} points (mean of {c['seeds']} seed{'s' if c['seeds'] > 1 else ''}"
    head += f"; per seed {per})" if per else ")"
    if c["exceeds"] is None:
        return head + ": one seed per way, so this cannot be told from seed-to-seed noise."
    if c["exceeds"]:
        return (head + f", larger than the seed spread ({c['spread']:.2f}): **exceeds the seed spread**, "
                f"{c['a']} {'above' if c['diff'] > 0 else 'below'} {c['b']}.")
    return (head + f", not larger than the seed spread ({c['spread']:.2f}): **within the seed spread**, "
            f"{c['seeds']} seeds cannot tell {c['a']} from {c['b']}.")


def _mean_curve(run_dirs: list):
    """(epochs, mean, min, max) of val top-1 over the runs, at the epochs every run evaluated."""
    curves = [{r["epoch"] + 1: r["top1"] for r in _evals(d)} for d in run_dirs]
    epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    vals = [[c[e] for c in curves] for e in epochs]
    return epochs, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _plots(out: Path, students: dict, run_dirs: dict, teacher_top1=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(14, 3.8))
    modes = list(students)
    for mode in modes:
        epochs, mean, lo, hi = _mean_curve(run_dirs[mode])
        n = len(run_dirs[mode])
        a.plot(epochs, mean, marker="o", color=COLORS.get(mode), label=f"{mode} (mean of {n})" if n > 1 else mode)
        if n > 1:
            a.fill_between(epochs, lo, hi, color=COLORS.get(mode), alpha=0.2)
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_xlabel("epoch")
    a.set_ylabel("val top-1 (%)")
    a.set_title("val top-1, mean and seed range", fontsize=10)
    a.legend()
    a.grid(alpha=0.3)
    for x, mode in enumerate(modes):   # final top-1: each seed a dot, the mean ± spread/2 a bar
        s = students[mode]
        c.scatter([x] * len(s["runs"]), [r["val_top1"] for r in s["runs"]], color=COLORS.get(mode), zorder=3)
        c.errorbar([x + 0.15], [s["val_top1"]], yerr=[[max(0.0, s["val_top1"] - s["val_top1_min"])],
                                                      [max(0.0, s["val_top1_max"] - s["val_top1"])]],
                   fmt="s", color="black", capsize=6)   # (the mean is rounded: clamp a 1e-5 overshoot)
    if teacher_top1 is not None:
        c.axhline(teacher_top1, color="#7570b3", ls="--", lw=1, label=f"teacher {teacher_top1:.2f}")
        c.legend(loc="lower right", fontsize=8)
    c.set_xticks(range(len(modes)), modes)
    c.set_xlim(-0.5, len(modes) - 0.5)
    c.set_ylabel("final val top-1 (%)")
    c.set_title("final top-1: seeds (dots), mean ± spread/2", fontsize=10)
    c.grid(alpha=0.3, axis="y")
    times = [[r["epoch_time_s"] for r in students[m]["runs"]] for m in modes]
    means = [statistics.fmean(t) for t in times]
    b.bar(modes, means, color=[COLORS.get(m) for m in modes],
          yerr=[[max(0.0, m - min(t)) for m, t in zip(means, times)], [max(0.0, max(t) - m) for m, t in zip(means, times)]],
          capsize=6)
    b.set_ylabel("epoch time (s)")
    b.set_title("epoch time, mean and seed range", fontsize=10)
    b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_file(out / "students.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _way_records(pipeline, runs) -> tuple:
    """A way's finished runs -> (their RUN_KEYS records, their folders, epochs and device of the last one)."""
    records, dirs, epochs, device = [], [], None, None
    for _, seed, d in runs:
        if not (d / "summary.json").is_file():
            continue
        s = _read(d / "summary.json")
        records.append({"seed": seed, "run": str(d.relative_to(pipeline.out)), "val_top1": s["final_top1"],
                        "best_top1": s["best_top1"], "val_top5": s["final_top5"],
                        "epoch_time_s": s["epoch_time_s"], "img_per_s": s["img_per_s"],
                        "teacher_forward_s_per_epoch": s["teacher_forward_s_per_epoch"]})
        dirs.append(d)
        epochs, device = s["epochs"], s["device"]
    return records, dirs, epochs, device


def _students(pipeline) -> tuple:
    """({way: way_summary with epochs, device (and teacher_time_saved_s for cache)}, {way: run folders})."""
    students, run_dirs = {}, {}
    for mode, runs in pipeline.student_runs().items():
        records, dirs, epochs, device = _way_records(pipeline, runs)
        if records:
            students[mode] = {**way_summary(records), "epochs": epochs, "device": device}
            run_dirs[mode] = dirs
    if "online" in students and "cache" in students:
        o, c = students["online"], students["cache"]
        students["cache"]["teacher_time_saved_s"] = (o["epoch_time_s"] - c["epoch_time_s"]) * c["epochs"]
    return students, run_dirs


def _table(students: dict) -> list:
    table = ["| student | val top-1 (%), mean ± spread/2 | per seed | epoch time (s) | img/s | "
             "teacher forward (s/epoch) | teacher time saved (s) |",
             "|---|---|---|---|---|---|---|"]
    for mode, s in students.items():
        per_seed = " / ".join(f"{r['val_top1']:.2f}" for r in s["runs"])
        seeds_of = ", ".join(str(r["seed"]) for r in s["runs"])
        table.append(f"| {mode} | {s['val_top1']:.2f} ± {s['val_top1_spread'] / 2:.2f} | {per_seed} (seeds {seeds_of}) | "
                     f"{s['epoch_time_s']:.1f} | {s['img_per_s']:.0f} | {s['teacher_forward_s_per_epoch']:.1f} | "
                     f"{s.get('teacher_time_saved_s', 0):.0f} |")
    return table


def _noise_section(summary: dict, teacher: dict) -> list:
    """The report's "Differences against the seed spread" section."""
    students = summary["students"]
    seeds = max((len(s["runs"]) for s in students.values()), default=0)
    noise = ["## Differences against the seed spread", ""]
    if seeds >= 2:
        noise.append(f"Each way was trained with {seeds} student seeds (initialisation and sample order; the teacher, "
                     "the cache and the views are the same for every run). The spread is max - min of a way's final "
                     "val top-1 over its seeds; a difference of means exceeds the seed spread when it is larger than "
                     "the larger spread of the two ways.")
    else:
        noise.append("One student seed per way: the report cannot tell any difference below from seed-to-seed noise. "
                     "List two or more seeds (top-level `seed = [0, 1]` in the recipe) to measure the spread.")
    noise += ["", *(_verdict(c) for c in summary["comparisons"])]
    if teacher and summary["teacher"]["val_top1"] is not None:
        above = [m for m, s in students.items() if s["val_top1"] > summary["teacher"]["val_top1"]]
        if above:
            noise += ["", f"The teacher ({summary['teacher']['val_top1']:.2f} %) is below the mean of "
                      f"{', '.join(above)}: the students learn from the hard labels as well as from the teacher's soft "
                      "labels, and a teacher trained on a short schedule can be overtaken by its students."]
    return noise


def _markdown(out: Path, summary: dict, teacher: dict, cache: dict, table: list) -> str:
    """report.md."""
    lines = [f"# {summary['name'] or out.name}", "",
             f"Teacher: {summary['teacher']['model']}, val top-1 {summary['teacher']['val_top1']:.2f} %" if teacher else
             "Teacher: given checkpoint", "",
             f"Cache: seeds {cache.get('seeds_complete')}, top-{cache.get('topk')}, "
             f"{(cache.get('bytes_on_disk') or 0) / 2**20:.1f} MiB ({cache.get('bytes_per_view') or 0:.1f} bytes/view)", "",
             *table, "", *_noise_section(summary, teacher)]
    lines += ["", "`± spread/2`: half of max - min over the seeds (mean ± it holds every seed's value); epoch time, "
              "img/s and teacher forward: means over the seeds. `teacher forward`: time the teacher took inside online "
              "KD's epochs; `teacher time saved`: (online - cache epoch time) x epochs, what the cache saves each "
              "student that reuses it.", "",
              "![students](students.png)", "", "![views](views.png)", "",
              "Logs: `students/<mode>[-seed<S>]/metrics.jsonl`, `students/<mode>[-seed<S>]/summary.json`, "
              "`teacher/`, `cache/logs/`."]
    return "\n".join(lines) + "\n"


def _preview_views(out: Path, cache: dict) -> None:
    """views.png, the picture of the cache's views, unless it is there already."""
    if not (out / "views.png").is_file() and (out / "data" / "manifest.json").is_file():
        from kdcache.augment.preview import preview
        from kdcache.augment.recipe import ViewRecipe
        from kdcache.data.dataset import PreparedDataset
        if cache:
            preview(PreparedDataset.open(out / "data").split("train"), ViewRecipe.from_dict(cache["recipe"]),
                    0, 8, 4, out / "views.png")


def write_report(pipeline) -> dict:
    """summary.json, report.md, students.png and views.png of a pipeline run in pipeline.out; logs the table
    and the verdicts (INFO), then where report.md is. Returns the summary."""
    out = pipeline.out
    students, run_dirs = _students(pipeline)
    teacher = _read(out / "teacher" / "summary.json")
    from kdcache.cache.schema import TeacherCache
    cache = TeacherCache.open(out / "cache").summary() if (out / "cache" / "zarr.json").is_file() else {}
    summary = {
        "name": pipeline.recipe.get("name"), "seed": pipeline.seed, "seeds": pipeline.seeds,
        "teacher": {"val_top1": teacher.get("final_top1"), "model": teacher.get("model"), "epochs": teacher.get("epochs"),
                    "epoch_time_s": teacher.get("epoch_time_s")},
        "cache": {k: cache.get(k) for k in ("seeds_complete", "topk", "bytes_on_disk", "bytes_per_view", "num_samples")},
        "students": students,
        "comparisons": compare(students),
        "steps": pipeline.state,
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    table = _table(students)
    atomic_write(out / "report.md", _markdown(out, summary, teacher, cache, table))
    if students:
        _plots(out, students, run_dirs, summary["teacher"]["val_top1"])
    _preview_views(out, cache)
    logger.info("%s", f"teacher val top-1 {summary['teacher']['val_top1']}\n" + "\n".join(table) + "\n"
                + "\n".join(_verdict(c) for c in summary["comparisons"]), extra=RESULT)
    logger.info("report: %s", out / "report.md")
    return summary
