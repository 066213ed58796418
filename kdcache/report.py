"""The report of a pipeline run: a table (val top-1, epoch time, teacher forward time saved per student),
report.md, summary.json, plots (accuracy curves, epoch-time bars) and the preview picture."""

import json
import sys
from pathlib import Path


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _evals(run: Path):
    from kdcache.student.report import MetricsLog
    return [r for r in MetricsLog(run / "metrics.jsonl").records() if r["kind"] == "eval"]


def _plots(out: Path, students: dict, runs: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in students:
        ev = _evals(runs[mode])
        a.plot([r["epoch"] + 1 for r in ev], [r["top1"] for r in ev], marker="o", label=mode)
    a.set_xlabel("epoch")
    a.set_ylabel("val top-1 (%)")
    a.legend()
    a.grid(alpha=0.3)
    modes = list(students)
    b.bar(modes, [students[m]["epoch_time_s"] for m in modes], color=["#999999", "#d95f02", "#1b9e77"][:len(modes)])
    b.set_ylabel("epoch time (s)")
    b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "students.png", dpi=110)
    plt.close(fig)


def write_report(pipeline) -> dict:
    out = pipeline.out
    runs = {m: out / "students" / m for m in ("none", "online", "cache") if (out / "students" / m / "summary.json").is_file()}
    students = {}
    for mode, run in runs.items():
        s = _read(run / "summary.json")
        students[mode] = {"val_top1": s["final_top1"], "best_top1": s["best_top1"], "val_top5": s["final_top5"],
                          "epoch_time_s": s["epoch_time_s"], "epochs": s["epochs"], "img_per_s": s["img_per_s"],
                          "teacher_forward_s_per_epoch": s["teacher_forward_s_per_epoch"], "device": s["device"]}
    if "online" in students and "cache" in students:
        o, c = students["online"], students["cache"]
        saved = (o["epoch_time_s"] - c["epoch_time_s"]) * c["epochs"]
        students["cache"]["teacher_time_saved_s"] = saved
    teacher = _read(out / "teacher" / "summary.json")
    from kdcache.cache.schema import TeacherCache
    cache = TeacherCache.open(out / "cache").summary() if (out / "cache" / "zarr.json").is_file() else {}
    summary = {
        "name": pipeline.recipe.get("name"), "seed": pipeline.seed,
        "teacher": {"val_top1": teacher.get("final_top1"), "model": teacher.get("model"), "epochs": teacher.get("epochs"),
                    "epoch_time_s": teacher.get("epoch_time_s")},
        "cache": {k: cache.get(k) for k in ("seeds_complete", "topk", "bytes_on_disk", "bytes_per_view", "num_samples")},
        "students": students,
        "steps": pipeline.state,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = ["| student | val top-1 (%) | epoch time (s) | img/s | teacher forward (s/epoch) | teacher time saved (s) |",
             "|---|---|---|---|---|---|"]
    for mode, s in students.items():
        table.append(f"| {mode} | {s['val_top1']:.2f} | {s['epoch_time_s']:.1f} | {s['img_per_s']:.0f} | "
                     f"{s['teacher_forward_s_per_epoch']:.1f} | {s.get('teacher_time_saved_s', 0):.0f} |")
    lines = [f"# {summary['name'] or out.name}", "",
             f"Teacher: {summary['teacher']['model']}, val top-1 {summary['teacher']['val_top1']:.2f} %" if teacher else
             "Teacher: given checkpoint", "",
             f"Cache: seeds {cache.get('seeds_complete')}, top-{cache.get('topk')}, "
             f"{(cache.get('bytes_on_disk') or 0) / 2**20:.1f} MiB ({cache.get('bytes_per_view') or 0:.1f} bytes/view)", "",
             *table]
    lines += ["", "`teacher forward`: time the teacher took inside online KD's epochs; `teacher time saved`: "
              "(online - cache epoch time) x epochs, what the cache saves each student that reuses it.", "",
              "![students](students.png)", "", "![views](views.png)", "",
              "Logs: `students/<mode>/metrics.jsonl`, `students/<mode>/summary.json`, `teacher/`, `cache/logs/`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if students:
        _plots(out, students, runs)
    if not (out / "views.png").is_file() and (out / "data" / "manifest.json").is_file():
        from kdcache.augment.preview import preview
        from kdcache.augment.recipe import ViewRecipe
        from kdcache.data.dataset import PreparedDataset
        if cache:
            preview(PreparedDataset.open(out / "data").split("train"), ViewRecipe.from_dict(cache["recipe"]),
                    0, 8, 4, out / "views.png")
    print(f"teacher val top-1 {summary['teacher']['val_top1']}\n" + "\n".join(table))
    print(f"report: {out / 'report.md'}", file=sys.stderr)
    return summary
