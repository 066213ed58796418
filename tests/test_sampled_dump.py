"""dump-teacher --targets sampled: the top k plus m systematic draws from the tail (docs/cache-format.md,
"Targets"), keyed by the view through the counter-based RNG: reproducible, resumable, order-independent."""

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from conftest import kdcache
from kdcache.augment.rng import STREAM_TAIL_DRAWS, uniform, view_keys
from kdcache.cache.schema import LOGP_SCALE, TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.cache.targets import SparseTargets, draw_tail
from kdcache.student.losses import kd_loss
from kdcache.teacher.runner import TeacherRunner, draw_uniforms

K, M = 3, 6
SAMPLED = ["--teacher", "resnet10t", "--random-teacher", "--topk", K, "--targets", "sampled", "--samples", M,
           "--unit-size", 128, "--no-progress"]
ARRAYS = ("logp", "indices", "log_tail", "params")
# uint16 logp: half a step of 1/2048 in log space, exp(1/4096) - 1 relative on each stored probability
HALF_STEP = np.expm1(0.5 / LOGP_SCALE)


def dump(data, out, seeds, *extra):
    return kdcache("dump-teacher", "--data", data, "--out", out, "--seeds", seeds, *SAMPLED, *extra)


def read_all(path) -> dict:
    root = zarr.open_group(str(path), mode="r")
    return {(s, a): root[f"seeds/{s:06d}/{a}"][...] for s in sorted(int(k) for k in root["seeds"].group_keys())
            for a in ARRAYS}


@pytest.fixture(scope="module")
def sampled_cache(fmnist_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled") / "cache"
    proc = dump(fmnist_small.root, out, "0:2")
    assert "800 views written" in proc.stdout
    return out


class Fixed(torch.nn.Module):
    """A 'teacher' that returns given logits, whatever the views."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("out", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.out[:x.shape[0]]


def runner_for(logits, k=K, m=M, td=1.0, global_seed=0):
    return TeacherRunner(Fixed(logits), {"mean": [0.5] * 3, "std": [0.5] * 3}, torch.device("cpu"), "off", False, k,
                         samples=m, sample_temperature=td, global_seed=global_seed)


def test_the_cache_holds_the_documented_rows(sampled_cache):
    cache = TeacherCache.open(sampled_cache)
    spec = cache.spec
    assert (spec.targets, spec.samples, spec.sample_temperature, spec.stored_columns) == ("sampled", M, 1.0, K + M)
    assert cache.attrs["tail_rule"] == "importance-tail-v1" and cache.version == 4
    for s in (0, 1):
        slab = read_slab(cache, s)
        top, draws = slab.indices[:, :K].astype(np.int64), slab.indices[:, K:].astype(np.int64)
        assert slab.logp.shape == (400, K + M) and np.isfinite(slab.log_tail).all()
        assert not (draws[:, :, None] == top[:, None, :]).any(), "a draw hit a top-k class"
        assert (np.diff(draws, axis=1) >= 0).all() and (np.diff(slab.logp[:, :K], axis=1) <= 0).all()
        assert (slab.logp[:, K:] <= slab.logp[:, K - 1:K]).all()   # tail classes are no likelier than the k-th
        # at Td = 1, log_tail is the tail mass: the k stored probabilities plus it are 1, within the rounding of
        # the k stored ones (half a step each) and float32's of the tail
        total = np.exp(slab.logp[:, :K].astype(np.float64)).sum(1) + np.exp(slab.log_tail.astype(np.float64))
        assert np.abs(total - 1).max() <= HALF_STEP + 1e-6
        # the decoded target (SparseTargets with the cache's rule): a distribution, the top k exact
        t = SparseTargets(torch.from_numpy(slab.indices).long(), torch.from_numpy(slab.logp),
                          torch.from_numpy(slab.log_tail), 10, **spec.target_rule())
        for temperature in (1.0, 2.0):
            probs = t.probs(temperature).double()
            assert torch.allclose(probs.sum(1), torch.ones(400, dtype=torch.float64), atol=1e-6)   # float32 softmax
        top_p = t.probs(1.0).double().gather(1, torch.from_numpy(top))
        exact = torch.from_numpy(np.exp(slab.logp[:, :K].astype(np.float64)))
        assert torch.allclose(top_p, exact / torch.from_numpy(total)[:, None], rtol=1e-5)
    # the verify scan knows the layout: duplicates among the draws and their order are no problem
    report = json.loads(kdcache("verify", sampled_cache, "--json").stdout)
    assert report["ok"], report["problems"]


@contextlib.contextmanager
def killed_on_the_third_pass(monkeypatch):
    """A dump inside dies (RuntimeError) when its third pass is about to be written; the patch is undone after."""
    import kdcache.teacher.dump as dump_module
    real, calls = dump_module.write_pass, []

    def dies_on_the_third_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)
    monkeypatch.setattr(dump_module, "write_pass", dies_on_the_third_pass)
    with pytest.raises(RuntimeError, match="killed"):
        yield
    monkeypatch.undo()


def test_dumps_are_reproducible_and_resume_identically(fmnist_small, sampled_cache, tmp_path, monkeypatch):
    again = tmp_path / "again"
    dump(fmnist_small.root, again, "0:2")
    clean = read_all(sampled_cache)
    assert all(np.array_equal(clean[key], got, equal_nan=True) for key, got in read_all(again).items())
    partial = tmp_path / "partial"
    with killed_on_the_third_pass(monkeypatch):
        dump(fmnist_small.root, partial, "0:2")
    assert len(list((partial / "units").glob("*/*.json"))) == 4
    assert "288 views written" in dump(fmnist_small.root, partial, "0:2").stdout   # units 2, 3 of both seeds
    resumed = read_all(partial)
    for key in clean:
        assert np.array_equal(clean[key], resumed[key], equal_nan=True), f"{key} differs after the resume"


def test_draws_are_keyed_by_the_view_not_the_batch():
    """One logits row for every view: the draws depend on (global seed, s, i) only, through stream 700."""
    rng = np.random.default_rng(0)
    logits = np.tile(rng.normal(0, 2, 50).astype(np.float32), (64, 1))
    runner = runner_for(logits, k=5, m=8, global_seed=7)
    views = np.zeros((64, 2, 2, 3), np.uint8)
    samples = np.arange(100, 164)
    _, a, _ = runner.topk_outputs(views, np.zeros(64, np.int64), samples)
    _, b, _ = runner.topk_outputs(views, np.ones(64, np.int64), samples)
    assert (a[:, 5:] != b[:, 5:]).any(1).mean() > 0.5, "seeds 0 and 1 drew the same classes"
    # the same views in another order and another batch: the same draws
    order = rng.permutation(64)
    _, c, _ = runner.topk_outputs(views[:40], np.zeros(40, np.int64), samples[order][:40])
    assert np.array_equal(c, a[order][:40])
    # the uniform of view (i, s) is u(key(g, s, i), 700), as docs/views.md lists it
    assert np.array_equal(draw_uniforms(7, [1, 1], [100, 101]), uniform(view_keys(7, 1, [100, 101]), STREAM_TAIL_DRAWS))
    # and the runner's draws are draw_tail's with those uniforms
    u = torch.from_numpy(draw_uniforms(7, np.zeros(64, np.int64), samples))
    top = torch.from_numpy(logits).topk(5, 1).indices
    assert np.array_equal(a[:, 5:], draw_tail(torch.from_numpy(logits), top, 8, 1.0, u)[0].numpy())


@pytest.mark.parametrize("td", [1.0, 2.0, 0.5])
def test_draws_miss_the_top_classes_and_are_unbiased_at_td(td):
    """Peaked and flat rows, ties included: no draw is a top class, and over the offsets u the expected target
    at T = Td is the teacher's tempered distribution, class by class (systematic sampling, docs/cache-format.md)."""
    rng = np.random.default_rng(1)
    logits = np.concatenate([rng.normal(0, 4, (6, 40)), np.zeros((1, 40)), rng.normal(0, 0.1, (1, 40))]).astype(np.float32)
    logits[0, :5] = 30.0            # five tied top classes: the tail is 35 classes of almost no mass
    grid = (np.arange(512) + 0.5) / 512   # the offsets, evenly: E over u is the mean over this grid (to 1/512)
    x = torch.from_numpy(logits).double()
    top = torch.from_numpy(logits).topk(K, 1).indices
    target = torch.softmax(x / td, 1)
    for r in range(len(logits)):
        rows = torch.from_numpy(logits[r:r + 1]).expand(len(grid), -1)
        classes, draw_logp, log_s = draw_tail(rows, top[r:r + 1].expand(len(grid), -1), M, td, torch.from_numpy(grid))
        assert not np.isin(classes.numpy(), top[r].numpy()).any()
        logp = torch.cat([torch.log_softmax(rows.double(), 1).gather(1, top[r:r + 1].expand(len(grid), -1)),
                          draw_logp], 1)
        t = SparseTargets(torch.cat([top[r:r + 1].expand(len(grid), -1), classes], 1), logp.float(),
                          log_s.float(), 40, exact=K, sample_temperature=td)
        mean = t.probs(td).double().mean(0)
        # a class's count is floor or ceil of m q_j; over the grid its mean is m q_j within 1/512 draws, a
        # weight of S/(m Z) each: |bias| <= q_tail / (m * 512) plus float32 (1e-6)
        tail_mass = float(target[r].sum() - target[r, top[r]].sum())
        assert torch.allclose(mean, target[r], atol=tail_mass / (M * 512) + 1e-6, rtol=0), r


@pytest.fixture(scope="module")
def td2_cache(fmnist_small, tmp_path_factory):
    """One seed drawn at Td = 2 (log_tail = log S, not the tail mass)."""
    out = tmp_path_factory.mktemp("td2") / "cache"
    dump(fmnist_small.root, out, "0:1", "--sample-temperature", 2.0)
    return out


@pytest.mark.parametrize("which", ["td1", "td2"])
def test_verify_replays_the_draws(sampled_cache, td2_cache, which, monkeypatch):
    """verify --replay on a sampled cache, fp32 on the CPU: the k + 1 exact bins at T = Td replay to the cache's
    precision, and the fresh teacher's draws with the same uniforms are the stored ones."""
    path = sampled_cache if which == "td1" else td2_cache
    report = json.loads(kdcache("verify", path, "--replay", 48, "--json").stdout)
    r = report["replay"]
    assert report["ok"] and r["precision"] == "fp32", report["problems"]
    assert r["draw_agreement"] == 1.0 and r["draw_class_agreement"] == 1.0
    assert r["replay_kl_mean"] < 1e-8 and r["tail_mass_error_max"] < 1e-5
    assert r["max_abs_logp_error"] < 1 / 4096 + 1e-5       # every stored column: half a uint16 step
    from kdcache.teacher.verify import render_report
    assert "draws redrawn from the fresh teacher: 100.00 % of views (>= 99 %)" in render_report(report)
    if which == "td2":
        return
    # draws made from other uniforms than the documented ones fail the fp32 replay, by name
    import kdcache.teacher.verify as verify_module
    real = verify_module.draw_uniforms
    monkeypatch.setattr(verify_module, "draw_uniforms", lambda *a: (real(*a) + 0.5) % 1.0)
    report = json.loads(kdcache("verify", path, "--replay", 48, "--json", check=False).stdout)
    assert report["replay"]["draw_agreement"] < 0.5 and not report["ok"]
    assert [p for p in report["problems"] if "draws (same uniforms) agree with the stored ones" in p]


def test_verify_names_draws_that_break_the_layout(sampled_cache, tmp_path):
    """A writer that stored a top class among the draws, or draws out of order: the scan names them."""
    from conftest import reseal_markers
    out = tmp_path / "cache"
    shutil.copytree(sampled_cache, out)
    ix = zarr.open_array(str(out / "seeds/000001/indices"), mode="r+")
    rows = ix[...]
    rows[5, K:] = rows[5, 0]                   # draws that are the top-1 class
    rows[9, K:] = rows[9, K:][::-1].copy()     # draws in descending order (they differ: the tail is wide)
    assert rows[9, K] != rows[9, -1]
    ix[...] = rows
    reseal_markers(out)
    problems = json.loads(kdcache("verify", out, "--json", check=False).stdout)["problems"]
    assert problems == ["seed 1: a draw is one of the row's top-k classes in 1 rows (first sample 5)",
                        "seed 1: draws not in ascending class order in 1 rows (first sample 9)"], problems


def record_steps(monkeypatch) -> list:
    """Record every training step of train-student in this process: the batch's samples, the student's logits,
    the targets the loss got and its kd_loss."""
    import kdcache.student.loop as loop
    from kdcache.student.losses import StudentLoss
    seen = []
    real_step, real_loss = loop.train_step, StudentLoss.forward

    def step(run, batch):
        seen.append({"indices": batch.indices.clone()})
        return real_step(run, batch)

    def loss(self, student_logits, labels, teacher_logits=None, hard_target=None):
        parts = real_loss(self, student_logits, labels, teacher_logits, hard_target)
        seen[-1].update(student=student_logits.detach().clone(), targets=teacher_logits, kd=parts["kd_loss"].item())
        return parts
    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(StudentLoss, "forward", loss)
    return seen


def test_train_student_on_a_sampled_cache_uses_its_targets(fmnist_small, td2_cache, tmp_path, monkeypatch):
    """1 epoch on a 1-seed sampled cache at T = 2: every step's KD loss is kd_loss of the cache's own
    SparseTargets of the batch's samples (read here with read_slab), at --temperature."""
    cache_path = td2_cache
    seen = record_steps(monkeypatch)
    kdcache("train-student", "--data", fmnist_small.root, "--cache", cache_path, "--epochs", 1, "--out",
            tmp_path / "run", "--model", "resnet10t", "--batch-size", 64, "--temperature", 2.0, "--no-progress",
            "--workers", 2)
    cache = TeacherCache.open(cache_path)
    slab = read_slab(cache, 0)
    assert len(seen) >= 6 and sum(len(s["indices"]) for s in seen) >= 384
    for s in seen:
        assert isinstance(s["targets"], SparseTargets) and s["targets"].exact == K
        rows = s["indices"].numpy()
        ours = SparseTargets(torch.from_numpy(slab.indices[rows]).long(), torch.from_numpy(slab.logp[rows]),
                             torch.from_numpy(slab.log_tail[rows]), 10, **cache.spec.target_rule())
        expected = kd_loss(s["student"], ours, 2.0).item()
        assert expected == pytest.approx(s["kd"], rel=1e-6), "the KD loss is not the cache's target's"


CV = ["--targets", "sampled-cv", "--topk", 2, "--samples", 3, "--sample-temperature", 2.0]


@pytest.fixture(scope="module")
def cv_cache(fmnist_small, tmp_path_factory):
    """One seed of sampled-cv targets (2 exact + 3 draws at Td = 2): log_tail holds log S, log beta, log A."""
    out = tmp_path_factory.mktemp("cv") / "cache"
    dump(fmnist_small.root, out, "0:1", *CV)
    return out


def test_a_sampled_cv_dump_holds_its_rows_replays_and_resumes(fmnist_small, cv_cache, tmp_path, monkeypatch):
    cache = TeacherCache.open(cv_cache)
    assert cache.attrs["tail_rule"] == "median-control-variate-v1" and cache.spec.tail_columns == 3
    slab = read_slab(cache, 0)
    assert slab.log_tail.shape == (400, 3) and slab.logp.shape == (400, 5)
    log_s, log_beta, log_a = slab.log_tail.T.astype(np.float64)
    assert np.isfinite(log_s).all() and (log_beta <= log_s).all() and (log_a <= log_s + np.log(3)).all()
    # every draw is a class off the baseline (its r_j = p_j^(1/Td) differs from beta by at least one uint16 step)
    r = slab.logp[:, 2:].astype(np.float64) / 2.0
    assert (np.abs(r - log_beta[:, None]) >= 0.5 / LOGP_SCALE / 2.0 - 1e-6).all()
    # verify's scan and its replay: the fresh teacher redraws the stored classes (same uniforms, same rounding)
    report = json.loads(kdcache("verify", cv_cache, "--replay", 32, "--json").stdout)
    assert report["ok"] and report["replay"]["draw_agreement"] == 1.0, report["problems"]
    # interrupted after two of its four passes, then resumed: the same bytes as the uninterrupted dump
    partial = tmp_path / "partial"
    with killed_on_the_third_pass(monkeypatch):
        dump(fmnist_small.root, partial, "0:1", *CV)
    dump(fmnist_small.root, partial, "0:1", *CV)
    clean, resumed = read_all(cv_cache), read_all(partial)
    assert clean.keys() == resumed.keys()
    for key in clean:
        assert np.array_equal(clean[key], resumed[key], equal_nan=True), f"{key} differs after the resume"
    # derived (a copy with its own identity: --topk is refused for draws), it holds the same rows and verifies
    out = kdcache("derive", cv_cache, tmp_path / "derived", "--no-progress").stdout
    assert "sampled-cv 2+3 at Td 2" in out
    derived = read_all(tmp_path / "derived")
    assert all(np.array_equal(clean[key], derived[key], equal_nan=True) for key in clean)
    assert json.loads(kdcache("verify", tmp_path / "derived", "--json").stdout)["ok"]


def test_verify_names_a_broken_control_variate(cv_cache, tmp_path):
    """A NaN baseline, or a spread larger than a tail of sum S allows: named by the scan."""
    from conftest import reseal_markers
    out = tmp_path / "cache"
    shutil.copytree(cv_cache, out)
    lt = zarr.open_array(str(out / "seeds/000000/log_tail"), mode="r+")
    rows = lt[...]
    rows[7, 1] = np.nan
    rows[11, 2] = rows[11, 0] + 2.0
    lt[...] = rows
    reseal_markers(out)
    problems = json.loads(kdcache("verify", out, "--json", check=False).stdout)["problems"]
    assert problems == ["seed 0: log beta is not finite in 1 rows (first sample 7)",
                        "seed 0: the spread A exceeds 3 S in 1 rows (first sample 11)"], problems


def test_train_student_on_a_sampled_cv_cache_uses_its_signed_targets(fmnist_small, cv_cache, tmp_path, monkeypatch):
    """1 epoch at T = Td = 2: every step's KD loss is kd_loss of the cache's own SparseTargets (signed: taken
    linearly, tests/test_cv_targets.py), and --kd-loss dkd is refused before training."""
    seen = record_steps(monkeypatch)
    common = ["--data", fmnist_small.root, "--cache", cv_cache, "--epochs", 1, "--model", "resnet10t",
              "--batch-size", 64, "--temperature", 2.0, "--no-progress", "--workers", 2]
    kdcache("train-student", *common, "--out", tmp_path / "run")
    cache = TeacherCache.open(cv_cache)
    slab = read_slab(cache, 0)
    assert len(seen) >= 6
    for s in seen:
        assert s["targets"].signed
        rows = s["indices"].numpy()
        ours = SparseTargets(torch.from_numpy(slab.indices[rows]).long(), torch.from_numpy(slab.logp[rows]),
                             torch.from_numpy(slab.log_tail[rows]), 10, **cache.spec.target_rule())
        assert kd_loss(s["student"], ours, 2.0).item() == pytest.approx(s["kd"], rel=1e-6)
    proc = kdcache("train-student", *common, "--kd-loss", "dkd", "--out", tmp_path / "dkd", check=False)
    assert proc.returncode != 0 and "sampled-cv targets are signed" in proc.stderr
