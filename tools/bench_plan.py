#!/usr/bin/env python
"""Benchmark of `kdcache plan` (issue 21): its prediction against the real commands, at demo scale.

Demo part (pipelines/demo-fashion-mnist.toml's settings: 10,000 Fashion-MNIST images, resnet10t teacher,
test_resnet student at batch 64, seeds 0:3, top-10, scale 0.35 1.0): in each of --rounds rounds
`kdcache plan`, the same dump (`kdcache dump-teacher`), `kdcache plan`, one student trained with online KD or
with cached KD (`kdcache train-student`, --epochs E), `kdcache plan`, the other student, `kdcache plan`, each a
fresh process as a user runs it (the students' order alternates between rounds). Reported, per round and
pooled (sums of times): the dump time, the cache size on disk and the online/cached epoch ratio (goal: within
15 %; epochs after the first, which holds the loader's compilation), predicted by the round's first plan and
by the mean of the two plans around each step (the machine's drift between plan and step taken out), with
`tools/calibrate.py` before and after. The data and the trained teacher
come from a finished `kdcache run pipelines/demo-fashion-mnist.toml` (--run-dir), else the data is prepared
and the teacher has random weights (the rates do not depend on them; the bytes a little).

ImageNet part: `kdcache plan` for each pipelines/imagenet-*.toml with the GPU rates given on the command line
(GPU_RATES below: each with its source), and one plan whose rates were all measured on the H200 (BENCHMARKS.md).

    python tools/bench_plan.py --run-dir runs/demo-fashion-mnist --json /tmp/bench_plan.json
    python tools/bench_plan.py --imagenet-only
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = dict(seeds="0:3", topk=10, scale=("0.35", "1.0"), teacher="resnet10t", student="test_resnet", batch=64,
            lr=0.1, samples=10000)
IMAGENET_SAMPLES, IMAGENET_CLASSES = 1_281_167, 1000
IMAGENET_SIDE = 433    # the side of a square of an average prepared ImageNet image's pixels (about 375 x 500)

# Rates for one H200 (one device of the recipes' 8) and the sources. "measured": BENCHMARKS.md, on the H200 of
# issues 3, 4, 9 and 11; "timm": pytorch-image-models results/benchmark-infer-amp-nchw-pt291-cu130-5090.csv
# (RTX 5090, torch 2.9.1, CUDA 13.0, AMP, batch 1024; the file as of commit 90cae8c), scaled to the H200 by the ratio of the
# H200's measured ResNet-50 rate to timm's RTX 5090 one for the same model: an estimate, not a measurement.
H200_OVER_5090_INFER = 14541 / 6356.02      # ResNet-50 224 px bf16: H200 bare forward (pinned) / timm RTX 5090
H200_TRAIN_OVER_5090_INFER = 4339 / 6356.02  # ResNet-50: H200 train step (cached KD epoch) / timm RTX 5090 forward
GPU_RATES = {
    "render_a2": (5089, "measured: H200 dump with A2 views (RandAugment m7, mixup, cutmix), renderer 2, 16 threads, "
                        "4 views per decode (BENCHMARKS.md, GPU: the dump with A2 views / renderer run 1)"),
    "render_rrc": (11732, "measured: H200 dump, RRC views, renderer 2, 14 threads, 4 views per decode "
                          "(BENCHMARKS.md, renderer run 5)"),
    "forward:beitv2_base_patch16_224": (round(3513.46 * H200_OVER_5090_INFER),
                                        "timm RTX 5090 3,513 img/s x 2.29 (H200 / RTX 5090 on ResNet-50): estimate"),
    "forward:resnet152": (7529, "measured: H200, resnet152 teacher forward in online KD, batch 256, bf16 "
                                "(6,400 images in 0.850 s; BENCHMARKS.md, train-student GPU)"),
    "student:resnet50": (4339, "measured: H200, resnet50 cached-KD epoch, batch 256, bf16 (BENCHMARKS.md)"),
    "student:convnextv2_tiny": (round(3048.39 * H200_TRAIN_OVER_5090_INFER),
                                "timm RTX 5090 forward 3,048 img/s x 0.683 (H200 train / RTX 5090 forward on "
                                "ResNet-50): estimate"),
    "student:vit_small_patch16_224": (round(10972.65 * H200_TRAIN_OVER_5090_INFER),
                                      "timm RTX 5090 forward 10,973 img/s x 0.683 (as above): estimate"),
}


def kdcache(*args, capture=True) -> subprocess.CompletedProcess:
    """One kdcache command in a fresh process, as a user runs it (its wall time on .seconds)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "kdcache", *map(str, args)], capture_output=capture, text=True,
                          cwd=ROOT, env=_env())
    proc.seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kdcache {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _env():
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def calibrate() -> float:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "calibrate.py")], capture_output=True, text=True,
                         check=True).stdout
    return float(re.search(r"([\d.]+) ms", out).group(1))


def demo_inputs(run_dir: Path, tmp: Path):
    """(dataset, teacher flags): the finished demo run's, else prepared here with a random teacher."""
    weights = run_dir / "teacher" / "model.safetensors"
    if (run_dir / "data" / "manifest.json").is_file() and weights.is_file():
        return run_dir / "data", ["--teacher", DEMO["teacher"], "--teacher-checkpoint", weights]
    data = tmp / "data"
    kdcache("prepare", "fashion-mnist", "--limit", DEMO["samples"], "--out", data)
    return data, ["--teacher", DEMO["teacher"], "--random-teacher"]


def run_plan(data: Path, teacher, epochs: int) -> dict:
    proc = kdcache("plan", "--data", data, *teacher, "--seeds", DEMO["seeds"], "--topk", DEMO["topk"], "--scale",
                   *DEMO["scale"], "--student", DEMO["student"], "--student-batch-size", DEMO["batch"],
                   "--epochs", epochs, "--json")
    result = json.loads(proc.stdout)
    result["wall_s"] = proc.seconds
    return result


def run_dump(data: Path, teacher, out: Path) -> dict:
    proc = kdcache("dump-teacher", "--data", data, "--out", out, *teacher, "--seeds", DEMO["seeds"], "--topk",
                   DEMO["topk"], "--scale", *DEMO["scale"], "--no-progress")
    log = json.loads(next((out / "logs").glob("dump-*.json")).read_text())["summary"]
    files = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": log["seconds"], "loop_seconds": log["loop_seconds"], "wall_s": proc.seconds,
            "bytes_on_disk": log["bytes_on_disk"], "all_files_bytes": files, "views": log["views_written"]}


def run_student(data: Path, teacher, out: Path, epochs: int, cache: Path = None) -> dict:
    source = ["--cache", cache] if cache else ["--kd", "online", *teacher, "--view-seeds", DEMO["seeds"]]
    kdcache("train-student", "--data", data, "--model", DEMO["student"], "--epochs", epochs, "--batch-size",
            DEMO["batch"], "--lr", DEMO["lr"], "--hard-loss", "ce", "--temperature", 1, "--eval-every", epochs,
            "--scale", *DEMO["scale"], "--out", out, "--no-progress", *source)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs_s = [r["seconds"] for r in records if r.get("kind") == "epoch"]
    return {"epochs_s": epochs_s, "mean_s": statistics.mean(epochs_s),
            "after_first_s": statistics.mean(epochs_s[1:]) if len(epochs_s) > 1 else None}


def _error(predicted: float, measured: float) -> str:
    return f"{100 * (predicted / measured - 1):+.1f} %"


def demo(args) -> dict:
    """Rounds of: plan, the dump, plan, one student, plan, the other student, plan (the students' order
    alternating between rounds). Each real step is then compared with the plan made first (what a user has)
    and with the mean of the two plans around it (what the model predicts once the machine's drift between a
    plan and the step is taken out: this machine's speed changed 3x within minutes, tools/calibrate.py)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_plan_"))
    data, teacher = demo_inputs(args.run_dir, tmp)
    out = {"calibration_ms_before": calibrate(), "data": str(data), "teacher": [str(t) for t in teacher],
           "rounds": []}
    for r in range(args.rounds):
        result = {"plans": [run_plan(data, teacher, args.epochs)]}
        result["dump"] = run_dump(data, teacher, tmp / f"cache{r}")
        result["plans"].append(run_plan(data, teacher, args.epochs))
        result["order"] = ("online", "cached") if r % 2 == 0 else ("cached", "online")
        for mode in result["order"]:
            result[mode] = run_student(data, teacher, tmp / f"{mode}{r}", args.epochs,
                                       cache=tmp / f"cache{r}" if mode == "cached" else None)
            result["plans"].append(run_plan(data, teacher, args.epochs))
        out["rounds"].append(result)
    out["calibration_ms_after"] = calibrate()
    out["table"] = demo_table(out)
    return out


def _steady(student: dict) -> float:
    """The epoch time the plan predicts: after the first epoch (whose FFCV/numba compilation it leaves out)."""
    return student["after_first_s"] or student["mean_s"]


PREDICTED = {"dump": lambda p: p["dump"]["seconds"], "online": lambda p: p["student"]["online_epoch_s"],
             "cached": lambda p: p["student"]["cached_epoch_s"]}


def _predictions(rnd: dict) -> dict:
    """step -> (the round's first plan's value, the mean of the plans just before and just after the step)."""
    plans = rnd["plans"]
    around = {"dump": (plans[0], plans[1]), rnd["order"][0]: (plans[1], plans[2]), rnd["order"][1]: (plans[2], plans[3])}
    return {step: (PREDICTED[step](plans[0]), statistics.mean(PREDICTED[step](p) for p in pair))
            for step, pair in around.items()}


def demo_table(out: dict) -> list:
    """Rows: (what, round, predicted by the first plan, by the plans around the step, measured, both errors);
    the rows of round "all" pool the rounds (sums of times)."""
    rows = []
    for r, x in enumerate(out["rounds"] + [None]):
        rounds = out["rounds"] if x is None else [x]
        preds = [_predictions(y) for y in rounds]
        measured = {"dump": sum(y["dump"]["loop_seconds"] for y in rounds),
                    "dump_all": sum(y["dump"]["seconds"] for y in rounds),
                    "online": sum(_steady(y["online"]) for y in rounds),
                    "cached": sum(_steady(y["cached"]) for y in rounds)}
        p = {step: [sum(pr[step][i] for pr in preds) for i in (0, 1)] for step in PREDICTED}
        size = [sum(y["plans"][0]["bytes"]["on_disk_total"] for y in rounds)] * 2
        for what, pred, m in (
                ("dump time: its loop (s)", p["dump"], measured["dump"]),
                ("dump time: the whole command (s)", p["dump"], measured["dump_all"]),
                ("cache size on disk (bytes)", size, sum(y["dump"]["bytes_on_disk"] for y in rounds)),
                ("online / cached epoch", [p["online"][i] / p["cached"][i] for i in (0, 1)],
                 measured["online"] / measured["cached"]),
                ("online epoch (s)", p["online"], measured["online"]),
                ("cached epoch (s)", p["cached"], measured["cached"])):
            rows.append([what, "all" if x is None else str(r + 1), pred[0], pred[1], m,
                         _error(pred[0], m), _error(pred[1], m)])
    return rows


def imagenet() -> list:
    """The plan of every pipelines/imagenet-*.toml with GPU_RATES, and of the all-measured H200 configuration."""
    plans = []
    for path in sorted((ROOT / "pipelines").glob("imagenet-*.toml")):
        recipe = tomllib.loads(path.read_text())
        dump, student = recipe["dump"], recipe["student"]
        teacher = recipe["teacher"]["model"]
        a2 = bool(dump.get("aa") or dump.get("mixup") or dump.get("cutmix"))
        rates = {"--render-rate": GPU_RATES["render_a2" if a2 else "render_rrc"],
                 "--forward-rate": GPU_RATES[f"forward:{teacher}"],
                 "--student-rate": GPU_RATES[f"student:{student['model']}"]}
        plans.append(_imagenet_plan(path.name, dump, teacher, student, rates))
    dump = {"seeds": "0:300", "topk": 10, "size": 224, "batch-size": 256, "amp": "bf16"}
    student = {"model": "resnet50", "epochs": 300, "batch-size": 256}
    rates = {"--render-rate": GPU_RATES["render_rrc"], "--forward-rate": GPU_RATES["forward:resnet152"],
             "--student-rate": GPU_RATES["student:resnet50"]}
    plans.append(_imagenet_plan("resnet152 -> resnet50, RRC views, every rate measured on the H200", dump,
                                "resnet152", student, rates))
    return plans


RECIPE_KEYS = ("size", "scale", "ratio", "hflip", "aa", "reprob", "remode", "recount", "mixup", "cutmix",
               "mixup-prob", "mixup-switch-prob", "mix-block", "aug-repeats")


def _imagenet_plan(name: str, dump: dict, teacher: str, student: dict, rates: dict) -> dict:
    recipe = []
    for key in RECIPE_KEYS:
        if key in dump:
            value = dump[key]
            recipe += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    given = [str(x) for flag, (rate, _) in rates.items() for x in (flag, rate)]
    proc = kdcache("plan", "--samples-count", IMAGENET_SAMPLES, "--num-classes", IMAGENET_CLASSES, "--image-size",
                   IMAGENET_SIDE, "--teacher", teacher, "--random-teacher", "--seeds", dump["seeds"], "--topk",
                   dump["topk"], "--batch-size", dump.get("batch-size", 256), "--amp", dump.get("amp", "bf16"),
                   "--student", student["model"], "--student-batch-size", student["batch-size"], "--epochs",
                   student["epochs"], "--device", "cuda", "--devices", 8, *recipe, *given, "--json")
    return {"recipe": name, "rates": {flag: {"value": rate, "source": src} for flag, (rate, src) in rates.items()},
            "plan": json.loads(proc.stdout)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo-fashion-mnist",
                   help="a finished `kdcache run pipelines/demo-fashion-mnist.toml` (its data and teacher)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each student (the first includes the JIT)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of plans, the dump and the two students")
    p.add_argument("--imagenet-only", action="store_true")
    p.add_argument("--skip-imagenet", action="store_true")
    p.add_argument("--json", type=Path, help="write everything measured here")
    args = p.parse_args()
    result = {}
    if not args.imagenet_only:
        result["demo"] = demo(args)
        print(f"calibration {result['demo']['calibration_ms_before']:.0f} ms before, "
              f"{result['demo']['calibration_ms_after']:.0f} ms after")
        print(f"  {'':<34} {'round':<5} {'plan first':>12} {'plans around':>12} {'measured':>12}  errors")
        for row in result["demo"]["table"]:
            print(f"  {row[0]:<34} {row[1]:<5} {row[2]:>12,.2f} {row[3]:>12,.2f} {row[4]:>12,.2f}  "
                  f"{row[5]} / {row[6]}")
    if not args.skip_imagenet:
        result["imagenet"] = imagenet()
        for item in result["imagenet"]:
            print(f"\n== {item['recipe']}")
            print(_plan_text(item["plan"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


def _plan_text(plan: dict) -> str:
    sys.path.insert(0, str(ROOT))
    from kdcache import plan_report_text
    return plan_report_text(plan)


if __name__ == "__main__":
    main()
