"""`kdcache plan` (issue 21): the arithmetic checked by hand, a measurement on real Fashion-MNIST within its
stated minute, the bytes against a real dump of the same rows, and bad inputs named."""

import json
import math
import time

import pytest

from conftest import dump_random_teacher, kdcache
from kdcache import options
from kdcache.plan import DiskCost, Rates, estimate

PLAN_SECONDS = 60   # the bound: "measures what it can on the present machine in well under a minute"


def _disk(**kw):
    base = dict(rows={"logp": 2048, "params": 2048}, per_row=26.0, per_shard=1500.0, per_seed=5200,
                per_array={"logp": 16.0, "indices": 4.0, "log_tail": 0.0, "params": 6.0}, write_per_row=1e-5,
                read_per_row=1e-6)
    base.update(kw)
    return DiskCost(**base)


def test_the_cpu_arithmetic_by_hand():
    """On the CPU render, forward and writes take turns: their costs per view add up; the student's epoch is
    loader + step (+ teacher online, + slab cached)."""
    rates = Rates(render=20000, forward=500, loader=10000, student=300, online_teacher=250)
    raw = {"logp": 20, "indices": 20, "log_tail": 4, "params": 20}
    p = estimate(10000, 3, 1, False, rates, raw, _disk(), shards=1, student_batch=64, epochs=3)
    per_view = 1 / 20000 + 1 / 500 + 1e-5                   # 0.00206 s
    assert p["views"] == 30000
    assert p["dump"]["seconds"] == pytest.approx(30000 * per_view) == pytest.approx(61.8)
    assert p["dump"]["device_hours"] == pytest.approx(61.8 / 3600)
    assert p["dump"]["limited_by"] == "forward"
    assert p["dump"]["busy"]["forward"] == pytest.approx(0.002 / 0.00206)
    # render and forward timed together (as they share the cores in the dump): that rate, plus the writes
    rates.together = 400
    assert estimate(10000, 3, 1, False, rates, raw, _disk())["dump"]["seconds"] == pytest.approx(30000 * (1 / 400 + 1e-5))
    rates.together = None
    b = p["bytes"]
    assert b["raw_per_view"] == 64 and b["raw_total"] == 64 * 30000
    assert b["on_disk_per_seed"] == pytest.approx(10000 * 26 + 1500 + 5200)          # 266,700
    assert b["on_disk_total"] == pytest.approx(3 * 266700)
    assert b["on_disk_per_view"] == pytest.approx(26.67)
    s = p["student"]
    images = 156 * 64                                        # whole batches: 9,984
    assert s["images_per_epoch"] == images
    cached = images / 10000 + images / 300 + 10000 * 1e-6   # loader + step + slab: 34.2884 s
    online = images / 10000 + images / 300 + images / 250   # loader + step + teacher: 74.2144 s
    assert s["cached_epoch_s"] == pytest.approx(cached) == pytest.approx(34.2884)
    assert s["online_epoch_s"] == pytest.approx(online) == pytest.approx(74.2144)
    assert s["online_over_cached"] == pytest.approx(74.2144 / 34.2884)
    assert s["saving_per_student_s"] == pytest.approx(3 * (online - cached))
    assert s["break_even_students"] == math.ceil(61.8 / (3 * (online - cached))) == 1


def test_the_accelerator_arithmetic_by_hand():
    """On an accelerator the render and the forward overlap (the slower limits), D devices share the views, the
    loader overlaps the student's step; the break-even is in device-seconds (independent of D)."""
    rates = Rates(render=5000, forward=8000, loader=5000, student=4000, online_teacher=8000)
    raw = {"logp": 20, "indices": 20, "log_tail": 4, "params": 64}
    p = estimate(1_281_167, 300, 8, True, rates, raw, _disk(), shards=40, student_batch=256, epochs=300)
    views = 1_281_167 * 300
    assert p["dump"]["seconds"] == pytest.approx(views / 5000 / 8)            # 9,608.8 s
    assert p["dump"]["device_hours"] == pytest.approx(views / 5000 / 3600)    # 21.35
    assert p["dump"]["limited_by"] == "render" and p["dump"]["busy"]["forward"] == pytest.approx(5000 / 8000)
    assert "write" not in p["dump"]["busy"]
    assert p["bytes"]["on_disk_per_seed"] == pytest.approx(1_281_167 * 26 + 40 * 1500 + 5200)
    s = p["student"]
    images = 1_281_167 // 256 * 256                          # 1,281,024
    loader, step, teacher = images / 5000, images / 4000, images / 8000       # 256.2, 320.3, 160.1 s
    assert s["cached_epoch_s"] == pytest.approx(max(loader, step) + 1_281_167 * 1e-6)
    assert s["online_epoch_s"] == pytest.approx(max(loader, step + teacher))
    saving = 300 * (max(loader, step + teacher) - max(loader, step) - 1_281_167 * 1e-6)   # 47,654 s
    assert s["break_even_students"] == math.ceil(views / 5000 / saving) == 2              # 76,870 s / 47,654 s
    # a loader slower than step + teacher hides the teacher: online KD costs nothing more, the cache never pays
    slow = Rates(render=5000, forward=8000, loader=1000, student=4000, online_teacher=8000)
    never = estimate(1_281_167, 300, 8, True, slow, raw, _disk(), 40, 256, 300)["student"]
    assert never["break_even_students"] is None and never["saving_per_student_s"] < 0


def _plan(*args):
    return json.loads(kdcache("plan", *args, "--json").stdout)


def test_given_rates_replace_the_measurements_and_the_numbers_follow(fmnist_small, random_teacher):
    """With every rate given, what is left measured here is the bytes (the teacher's rows, encoded) and the
    writer and slab-read rates; the dump and the epochs are the arithmetic of the given rates."""
    common = ["--data", fmnist_small.root, "--teacher", "resnet10t", "--teacher-checkpoint", random_teacher[2],
              "--seeds", "0:3", "--topk", 10, "--student", "test_resnet", "--student-batch-size", 64, "--epochs", 3,
              "--render-rate", 20000, "--forward-rate", 500, "--student-rate", 300]
    p = _plan(*common, "--device", "cpu")
    assert p["sources"] == {"forward": "--forward-rate", "render": "--render-rate", "loader": "--render-rate",
                            "student": "--student-rate", "online_teacher": "--forward-rate", "write": "measured",
                            "slab_read": "measured"}
    views, write = 400 * 3, 1 / p["rates"]["write"]
    assert p["dump"]["seconds"] == pytest.approx(views * (1 / 20000 + 1 / 500 + write))
    s = p["student"]
    images = 400 // 64 * 64
    slab = 400 / p["rates"]["slab_read"]
    assert s["cached_epoch_s"] == pytest.approx(images / 20000 + images / 300 + slab)
    assert s["online_epoch_s"] == pytest.approx(images / 20000 + images / 300 + images / 500)
    assert s["break_even_students"] == math.ceil(p["dump"]["seconds"] / (3 * (s["online_epoch_s"] - s["cached_epoch_s"])))
    # a GPU's rates, planned from this machine: the sides overlap, 4 devices share the views
    g = _plan(*common, "--device", "cuda", "--devices", 4)
    assert g["dump"]["seconds"] == pytest.approx(views / 500 / 4) and g["dump"]["limited_by"] == "forward"
    assert g["student"]["online_epoch_s"] == pytest.approx(max(images / 20000, images / 300 + images / 500))
    assert g["bytes"]["raw_per_view"] == 64


def test_a_measured_plan_within_a_minute_and_its_bytes_against_a_real_dump(fmnist_small, random_teacher, tmp_path):
    """Every rate measured on this machine, in under PLAN_SECONDS (the process's imports already paid), all
    positive; the bytes on disk predicted from the teacher's rows encoded through the cache's codecs, against
    a real dump of the same teacher, views and settings (within 5 %: the same rows, the same codecs)."""
    t0 = time.monotonic()
    p = _plan("--data", fmnist_small.root, "--teacher", "resnet10t", "--teacher-checkpoint", random_teacher[2],
              "--seeds", "0:2", "--topk", 5, "--student", "test_resnet", "--student-batch-size", 32, "--device", "cpu")
    took = time.monotonic() - t0
    assert took < PLAN_SECONDS, f"plan took {took:.1f} s"
    assert all(v > 0 for v in p["rates"].values()), p["rates"]
    assert set(p["sources"].values()) == {"measured"}
    assert p["dump"]["seconds"] == pytest.approx(800 * (1 / p["rates"]["together"] + 1 / p["rates"]["write"]))
    assert p["student"]["online_epoch_s"] > p["student"]["cached_epoch_s"] > 0
    assert p["bytes"]["raw_per_view"] == 5 * 2 + 5 * 2 + 4 + 5 * 4
    cache = dump_random_teacher(fmnist_small.root, tmp_path / "cache", random_teacher[2], "0:2", "--topk", 5,
                                "--unit-size", 32768)
    real = sum(f.stat().st_size for f in (cache / "seeds").rglob("*") if f.is_file())
    assert p["bytes"]["on_disk_total"] == pytest.approx(real, rel=0.05), (p["bytes"], real)


@pytest.mark.parametrize("args,message", [
    (["--seeds", "3:3"], "seed range '3:3' is empty"),
    (["--topk", 11], "--topk 11 must be between 1 and the class count 10"),
    (["--targets", "sampled", "--topk", 10], "--targets sampled draws from the classes beyond the top 10"),
    (["--samples-count", 100], "--samples-count: the prepared dataset --data"),
    (["--student-rate", 100], "--student-rate is the rate of a student: name it with --student"),
])
def test_bad_inputs_are_named(fmnist_small, args, message):
    base = {"--seeds": "0:2", "--topk": 5}
    for flag in args[::2]:
        base.pop(flag, None)
    argv = ["plan", "--data", fmnist_small.root, "--teacher", "resnet10t", "--random-teacher",
            *[str(x) for kv in base.items() for x in kv], *map(str, args)]
    r = kdcache(*argv, check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_without_data_the_split_is_described_and_missing_settings_are_named(tmp_path):
    r = kdcache("plan", "--teacher", "resnet10t", "--random-teacher", "--seeds", "0:2", check=False)
    assert r.returncode == 2 and "--samples-count and --num-classes" in r.stderr, r.stderr
    r = kdcache("plan", "--samples-count", 100, "--num-classes", 10, "--teacher", "resnet10t", "--random-teacher",
                "--seeds", "0:2", check=False)
    assert r.returncode == 2 and "--image-size" in r.stderr, r.stderr
    r = kdcache("plan", "--data", tmp_path / "absent", "--teacher", "resnet10t", "--random-teacher", "--seeds", "0:2",
                check=False)
    assert r.returncode == 2 and str(tmp_path / "absent") in r.stderr, r.stderr


def test_a_dataset_not_prepared_yet_with_a_gpus_rates():
    """--samples-count/--num-classes/--image-size: synthetic JPEGs stand in for the images; a CUDA device that is
    not here is fine when its rates are given (the CPU answers the rows for the bytes), refused otherwise."""
    args = ["--samples-count", 5000, "--num-classes", 100, "--image-size", 48, "--size", 32, "--teacher",
            "resnet10t", "--random-teacher", "--seeds", "0:4", "--topk", 10, "--device", "cuda"]
    import torch
    if not torch.cuda.is_available():
        r = kdcache("plan", *args, check=False)
        assert r.returncode == 2 and "give --forward-rate" in r.stderr, r.stderr
    p = _plan(*args, "--forward-rate", 1000, "--render-rate", 4000, "--devices", 2)
    assert p["inputs"]["num_samples"] == 5000 and "synthetic 48x48" in p["inputs"]["rendered"]
    assert p["dump"]["seconds"] == pytest.approx(5000 * 4 / 1000 / 2) and p["dump"]["overlap"]
    assert p["bytes"]["raw_per_view"] == 10 * 2 + 10 * 2 + 4 + 5 * 4 and p["bytes"]["on_disk_per_view"] > 0
    assert p["student"] is None


def test_the_text_report_says_what_the_json_says(fmnist_small):
    r = kdcache("plan", "--data", fmnist_small.root, "--teacher", "resnet10t", "--random-teacher", "--seeds", "0:2",
                "--topk", 5, "--forward-rate", 400, "--render-rate", 8000, "--device", "cpu")
    assert "limited by the forward" in r.stdout and "bytes per view: 44 raw" in r.stdout, r.stdout


PLAN_RANGED = [dest for dest, o in options.options("plan").items() if o.valid is not None]


@pytest.mark.parametrize("dest", PLAN_RANGED)
def test_an_out_of_range_plan_option_is_one_line_naming_it(dest, tmp_path):
    opt = options.options("plan")[dest]
    lo, hi = opt.valid.bounds()
    if lo is not None:
        bad = lo if opt.valid.lo_open else lo - (1 if opt.type is int else 0.5)
    else:
        bad = hi + 1 if hi is not None else "nan"
    r = kdcache("plan", "--data", tmp_path / "data", "--teacher", "resnet10t", "--random-teacher", "--seeds", "0:1",
                opt.flag, *([bad] * (opt.nargs or 1)), check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"kdcache: error: {opt.flag} "), lines


def test_plan_options_are_declared_once_and_reused_from_dump_teacher():
    plan, dump = options.options("plan"), options.options("dump-teacher")
    for dest in ("seeds", "topk", "targets", "samples", "values_dtype", "teacher", "teacher_checkpoint",
                 "random_teacher", "teacher_module", "batch_size", "device", "amp", "workers", "scale", "aa"):
        assert plan[dest] == dump[dest], dest
    text = " ".join(__import__("kdcache.cli", fromlist=["x"]).build_parser()._subparsers._group_actions[0]
                    .choices["plan"].format_help().split())
    for flag in ("--forward-rate VIEWS_PER_S", "--render-rate VIEWS_PER_S", "--student-rate IMG_PER_S", "--json"):
        assert flag in text
