"""Several teachers over one cache's views (train-student --teachers A,B --ensemble ...), the public readers of
them, `ls`/`info`/`copy` of a cache with teachers, and training from sampled targets.

The cache: teacher A (a random resnet10t) dumped over seeds 0:2 of the 400-sample Fashion-MNIST at k = C = 10,
uint16; teacher B (another random resnet10t) added with `dump-teacher --add-teacher --teacher-label tb`."""

import json
import math

import numpy as np
import pytest
import timm
import torch

from conftest import dump_random_teacher, kdcache
from kdcache import MixedTargets, ReplayDataset, ReplayLoader, kd_loss, open_cache
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.models import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Normalize, build_model, forward_u8
from kdcache.student.soft_labels import CachedTeacher

A, B = "resnet10t", "tb"
B_SEED = 11
COMMON = ["--model", "resnet10t", "--batch-size", 64, "--no-progress", "--workers", 2]
# uint16 log-probabilities: a step of 1/2048 in log space, rounded, is an error |e| <= 1/4096 on every stored
# log-probability. With k = C the target is the softmax of the stored values, p_c e^(e_c) / sum_j p_j e^(e_j),
# so its ratio to the teacher's is within exp(+-2/4096): 4.89e-4 relative (at T > 1 the errors are divided by
# T: smaller). A weighted mean of two such probabilities is within the same relative bound. The online side is
# the same fp32 teachers on the same pixels in other batches: ~1e-6 on the log-probabilities. So 5e-4.
REL = 5e-4


def teacher_b():
    model, info = build_model(ModelSpec(name="resnet10t", random_init=True, seed=B_SEED), 10)
    return model.eval(), info


@pytest.fixture(scope="module")
def two_teachers(fmnist_small, random_teacher, tmp_path_factory):
    """The main cache (teacher A, k = C, uint16) under a root of its own, with teacher B added by the command."""
    root = tmp_path_factory.mktemp("teachers")
    cache = dump_random_teacher(fmnist_small.root, root / "cache", random_teacher[2], "0:2", "--topk", 10)
    kdcache("dump-teacher", "--data", fmnist_small.root, "--out", cache, "--seeds", "0:2", "--teacher", "resnet10t",
            "--random-teacher", "--teacher-init-seed", B_SEED, "--topk", 10, "--add-teacher", "--teacher-label", B,
            "--no-progress")
    return cache


def online_logits(data, cache, seed: int, model, info) -> torch.Tensor:
    """(N, C) logits of a teacher run on the cache's views of `seed`, rendered by the public ReplayDataset (the
    teacher side's renderer, tests/test_torch_dataset.py)."""
    ds = ReplayDataset(data, cache)
    ds.set_view_seed(seed)
    images = torch.stack([ds[i].image for i in range(len(ds))])
    with torch.no_grad():
        return forward_u8(model.eval(), Normalize(info["mean"], info["std"]), images)


def test_cached_mean_of_two_teachers_equals_the_online_mean(fmnist_small, random_teacher, two_teachers):
    cache = open_cache(two_teachers)
    assert cache.teachers == [A, B]
    model_b, info_b = teacher_b()
    assert TeacherCache.open(two_teachers / "teachers" / B).spec.teacher["sha256"] == info_b["sha256"]
    for seed in (0, 1):
        za = online_logits(fmnist_small.root, two_teachers, seed, random_teacher[0], random_teacher[1])
        zb = online_logits(fmnist_small.root, two_teachers, seed, model_b, info_b)
        mixed = MixedTargets([cache.targets(seed, teacher=A), cache.targets(seed, teacher=B)], weights=[0.5, 0.5])
        for T in (1.0, 4.0):
            want = 0.5 * (torch.softmax(za / T, 1) + torch.softmax(zb / T, 1))
            rel = ((mixed.probs(T) - want).abs() / want).max().item()
            assert rel <= REL, f"seed {seed}, T {T}: {rel:.2e}"
        # the test can fail: teacher A alone is not the mean
        alone = cache.probs(seed, teacher=A)
        assert ((alone - 0.5 * (torch.softmax(za, 1) + torch.softmax(zb, 1))).abs() / alone).max() > 10 * REL


def _losses(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _replayed_kd_losses(data, cache, run, temperature, *combines, epoch=0, **loader_kw):
    """kd_loss of the run's student (lr 0: its initial weights) on each batch of epoch `epoch` the run saw, the
    targets of the batch built by each `combine(cache, batch)` (cache: the public reader): one list per combine."""
    student = timm.create_model("resnet10t", num_classes=10, checkpoint_path=str(run / "model.safetensors")).train()
    loader = ReplayLoader(data=data, cache=cache, batch_size=64, order_seed=0, workers=2, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, **loader_kw)
    loader.set_epoch(epoch)
    pub = open_cache(cache)
    out = [[] for _ in combines]
    with torch.no_grad():
        for batch in loader:
            logits = student(batch.images)
            for losses, combine in zip(out, combines):
                losses.append(kd_loss(logits, combine(pub, batch), temperature).item())
    return out


def test_train_student_mean_of_two_teachers_is_kd_on_the_mixed_targets(fmnist_small, two_teachers, tmp_path):
    # lr 0: the student stays at its initialisation, so each step's kd loss is a function of its batch alone
    run = tmp_path / "run"
    kdcache("train-student", "--data", fmnist_small.root, "--epochs", 1, "--out", run, "--cache", two_teachers,
            "--teachers", f"{A},{B}", "--ensemble", "mean", "--temperature", 2, "--lr", 0, "--log-interval", 1, *COMMON)
    logged = [r["kd_loss"] for r in _losses(run)]
    def mean(c, b):
        return MixedTargets([c.targets(b.seed, b.indices, teacher=t) for t in (A, B)], weights=[0.5, 0.5])
    want, only_a = _replayed_kd_losses(fmnist_small.root, two_teachers, run, 2.0, mean,
                                       lambda c, b: c.targets(b.seed, b.indices))
    # the same student, pixels and targets: float32 rounding of the same operations only
    assert len(logged) == len(want) == 6 and logged == pytest.approx(want, rel=1e-5)
    assert all(abs(a - b) > 1e-3 * abs(b) for a, b in zip(only_a, logged))
    summary = json.loads((run / "summary.json").read_text())
    assert [t["label"] for t in summary["teachers"]] == [A, B] and summary["ensemble"] == "mean"


def test_random_teacher_choice_is_a_function_of_the_pass_and_sample(two_teachers):
    cache = TeacherCache.open(two_teachers)
    rows = torch.arange(0, 380, 3)
    straight = CachedTeacher(cache, torch.device("cpu"), order_seed=5, teachers=[A, B], ensemble="random")
    for epoch in range(3):
        straight.begin_pass(epoch, 0)
        got = straight.targets(rows)
        # a resumed run starts at this pass in a new process: a new source gives the same choices
        resumed = CachedTeacher(cache, torch.device("cpu"), order_seed=5, teachers=[A, B], ensemble="random")
        resumed.begin_pass(epoch, 0)
        again = resumed.targets(rows)
        assert torch.equal(got.choice, again.choice)
        assert torch.equal(got.probs(), again.probs())
        assert 0.3 < got.choice.float().mean() < 0.7          # both teachers drawn, per sample
        slab = {0: read_slab(cache, epoch % 2), 1: read_slab(cache.added_teachers()[B], epoch % 2)}
        for r, i in enumerate(rows[:8].tolist()):
            chosen = slab[int(got.choice[r])]
            assert torch.equal(got.members[int(got.choice[r])].logp[r], torch.from_numpy(chosen.logp[i]))
    straight.begin_pass(0, 0)
    first = straight.targets(rows).choice
    straight.begin_pass(1, 0)
    assert not torch.equal(first, straight.targets(rows).choice)   # drawn again each pass
    per_step = CachedTeacher(cache, torch.device("cpu"), order_seed=5, teachers=[A, B], ensemble="random",
                             ensemble_draw="step")
    per_step.begin_pass(0, 0)
    batches = [per_step.targets(rows + k).choice for k in range(12)]   # keyed by the batch's first sample
    assert all(c.unique().numel() == 1 for c in batches)                 # one teacher per batch
    assert {int(c[0]) for c in batches} == {0, 1}
    assert all(torch.equal(c, per_step.targets(rows + k).choice) for k, c in enumerate(batches))


def test_random_ensemble_resumes_to_the_same_losses(fmnist_small, two_teachers, tmp_path):
    """train-student --ensemble random for 1 epoch, then --resume to 2: the resumed epoch's per-step kd losses are
    those of the public ReplayLoader's batches of epoch 1 with their draw (lr 0 keeps the student fixed, so a loss
    differs only if a batch's teachers or views differ)."""
    run = tmp_path / "run"
    kdcache("train-student", "--data", fmnist_small.root, "--cache", two_teachers, "--teachers", f"{A},{B}",
            "--ensemble", "random", "--lr", 0, "--log-interval", 1, "--epochs", 1, "--out", run, *COMMON)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(cfg, epochs=2)))
    kdcache("train-student", "--resume", run)
    logged = _losses(run)
    assert [r["step"] for r in logged] == list(range(1, 13))
    # the resumed epoch (pass 1) drew the teachers a straight run draws there
    want, = _replayed_kd_losses(fmnist_small.root, two_teachers, run, 1.0, lambda c, b: b.targets, epoch=1,
                                teachers=[A, B], ensemble="random")
    assert [r["kd_loss"] for r in logged[6:]] == pytest.approx(want, rel=1e-5)


def test_several_teachers_with_per_sample_seeds_and_mixed_labels(two_teachers):
    from kdcache.augment.recipe import ViewRecipe
    from kdcache.student.ensemble import LambdaMix
    from kdcache.student.soft_labels import mix_labels_recipe
    cache = TeacherCache.open(two_teachers)
    slabs = {(label, s): read_slab(t, s) for label, t in cache.teachers().items() for s in (0, 1)}
    src = CachedTeacher(cache, torch.device("cpu"), order_seed=0, seed_choice="per-sample", teachers=[B, A],
                        ensemble="weighted", teacher_weights=[3, 1])
    views = src.begin_pass(2, 0)
    got = src.targets(torch.arange(400))
    assert got.weights == [0.75, 0.25] and set(np.unique(views.seeds)) == {0, 1}
    for i in range(0, 400, 37):   # each sample: both teachers' rows of the seed drawn for it
        s = int(views.seeds[i])
        for m, label in enumerate((B, A)):
            assert torch.equal(got.members[m].indices[i], torch.from_numpy(slabs[label, s].indices[i].astype(np.int64)))
    recipe = mix_labels_recipe(ViewRecipe.from_dict(cache.spec.recipe), {"mixup": 0.8, "mix_block": 16})
    src = CachedTeacher(cache, torch.device("cpu"), order_seed=0, epochs=1, mix_recipe=recipe, teachers=[A, B])
    src.begin_pass(0, 0)
    rows = torch.arange(0, 64)
    mixed = src.logits(None, rows)
    assert isinstance(mixed, LambdaMix)
    own, partner = src.targets(rows), src.targets(src.mix.partner[rows])
    lam = src.mix.lam[rows][:, None]
    for T in (1.0, 3.0):   # the lambda mix of the two views' ensemble targets, at the loss's temperature
        want = lam * own.probs(T) + (1 - lam) * partner.probs(T)
        assert torch.allclose(mixed.probs(T), want, rtol=1e-5, atol=1e-7)
    assert (lam < 1).any()


def _add_sampled_teacher(cache_path, data, k=2, m=4, td=2.0) -> str:
    """Teacher B again, added as "ts" with sampled targets: the top k exactly + m draws at Td."""
    kdcache("dump-teacher", "--data", data, "--out", cache_path, "--seeds", "0:2", "--teacher", "resnet10t",
            "--random-teacher", "--teacher-init-seed", B_SEED, "--topk", k, "--targets", "sampled", "--samples", m,
            "--sample-temperature", td, "--add-teacher", "--teacher-label", "ts", "--no-progress")
    return "ts"


def test_train_student_on_sampled_targets(fmnist_small, two_teachers, tmp_path):
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(two_teachers, cache)
    label = _add_sampled_teacher(cache, fmnist_small.root)
    pub = open_cache(cache)
    t = pub.targets(0, [0, 1], teacher=label)
    assert t.sampled and t.exact == 2 and t.logp.shape == (2, 6) and t.sample_temperature == 2.0
    run = tmp_path / "run"
    kdcache("train-student", "--data", fmnist_small.root, "--epochs", 1, "--out", run, "--cache", cache,
            "--teachers", label, "--temperature", 2, "--lr", 0, "--log-interval", 1, *COMMON)
    logged = [r["kd_loss"] for r in _losses(run)]
    want, = _replayed_kd_losses(fmnist_small.root, cache, run, 2.0, lambda c, b: c.targets(b.seed, b.indices, teacher=label))
    assert logged == pytest.approx(want, rel=1e-5) and all(math.isfinite(x) for x in logged)
    info = json.loads(kdcache("info", cache, "--json").stdout)
    assert [(e["label"], e["targets"]) for e in info["teachers"]] == [(A, "topk"), (B, "topk"), (label, "sampled")]
    assert "ts: resnet10t sha256" in kdcache("info", cache).stdout and "sampled 2+4 at Td 2" in kdcache("info", cache).stdout


def test_ls_info_and_copy_show_and_copy_both_teachers(two_teachers, tmp_path):
    info = json.loads(kdcache("info", two_teachers, "--json").stdout)
    assert [(t["label"], t["name"], t["topk"], t["targets"], t["seeds_complete"]) for t in info["teachers"]] \
        == [(A, "resnet10t", 10, "topk", [0, 1]), (B, "resnet10t", 10, "topk", [0, 1])]
    text = kdcache("info", two_teachers).stdout
    assert f"teachers  {A}: resnet10t sha256" in text and f"          {B}: resnet10t sha256" in text, text
    listing = json.loads(kdcache("ls", two_teachers.parent, "--json").stdout)["caches"]
    assert len(listing) == 1 and [t["label"] for t in listing[0]["teachers"]] == [A, B]
    text = kdcache("ls", two_teachers.parent).stdout
    assert f"teachers  {A}:" in text and f"{B}: resnet10t" in text and "top-10, seeds complete 0:2" in text, text
    dst = tmp_path / "copy"
    proc = kdcache("copy", two_teachers, dst, "--seeds", "0:1", "--no-progress")
    assert "8 units" in proc.stdout, proc.stdout     # 4 units of seed 0, of each teacher
    assert (dst / "teachers" / B / "zarr.json").read_bytes() == (two_teachers / "teachers" / B / "zarr.json").read_bytes()
    copied = open_cache(dst)
    assert copied.teachers == [A, B] and copied.seeds == [0]
    assert TeacherCache.open(dst / "teachers" / B).complete_seeds() == [0]
    src = open_cache(two_teachers)
    for label in (A, B):
        got, want = copied.targets(0, teacher=label), src.targets(0, teacher=label)
        assert torch.equal(got.logp, want.logp) and torch.equal(got.indices, want.indices)
    proc = kdcache("copy", two_teachers, dst, "--no-progress")   # the rest, resumed
    assert "8 units" in proc.stdout and "8 already there" in proc.stdout, proc.stdout
    assert [t["seeds_complete"] for t in json.loads(kdcache("info", dst, "--json").stdout)["teachers"]] == [[0, 1]] * 2
    assert kdcache("verify", dst, check=False).returncode == 0


def test_public_readers_take_teachers(fmnist_small, two_teachers):
    cache = open_cache(two_teachers)
    with pytest.raises(Exception, match=rf"no teacher labelled 'nope'.*{A}, {B}"):
        cache.targets(0, [1], teacher="nope")
    ds = ReplayDataset(fmnist_small.root, two_teachers, teachers=[A, B], ensemble="weighted", teacher_weights=[1, 3])
    batch = ReplayDataset.collate([ds[i] for i in (3, 9, 27)])
    assert isinstance(batch.targets, MixedTargets) and batch.targets.weights == [0.25, 0.75]
    want = MixedTargets([cache.targets(0, [3, 9, 27], teacher=t) for t in (A, B)], weights=[0.25, 0.75])
    assert torch.equal(batch.targets.probs(2.0), want.probs(2.0))
    rnd = ReplayDataset(fmnist_small.root, two_teachers, teachers=[A, B], ensemble="random")
    picks = ReplayDataset.collate([rnd[i] for i in range(40)]).targets.choice
    assert set(picks.tolist()) == {0, 1}
    assert torch.equal(picks, ReplayDataset.collate([rnd[i] for i in range(40)]).targets.choice)
    loader = ReplayLoader(data=fmnist_small.root, cache=two_teachers, batch_size=32, teachers=[B], workers=2)
    batch = next(iter(loader))
    assert torch.equal(batch.targets.logp, cache.targets(batch.seed, batch.indices, teacher=B).logp)


@pytest.mark.parametrize("args, message", [
    (["--teachers", f"{A},nope"], f"no teacher labelled 'nope' in this cache; its teachers: {A}, {B}"),
    (["--teachers", f"{A},{B}", "--ensemble", "weighted", "--teacher-weights", "1,2,3"],
     "--teacher-weights gives 3 weights for 2 teacher(s)"),
    (["--teachers", f"{A},{B}", "--teacher-weights", "1,2"], "--teacher-weights are the weights of --ensemble weighted"),
    (["--teachers", f"{A},{B}", "--ensemble", "weighted"], "--ensemble weighted needs --teacher-weights"),
    (["--teachers", f"{A},{B}", "--ensemble-draw", "step"], "--ensemble-draw step says how --ensemble random draws"),
])
def test_bad_teacher_settings_are_named_before_anything_is_written(fmnist_small, two_teachers, tmp_path, args, message):
    proc = kdcache("train-student", "--data", fmnist_small.root, "--epochs", 1, "--out", tmp_path / "r", "--cache",
                   two_teachers, *args, *COMMON, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_teacher_missing_a_seed_is_named(fmnist_small, two_teachers, tmp_path):
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(two_teachers, cache)
    shutil.rmtree(cache / "teachers" / B / "units" / "000001")   # seed 1 of teacher B no longer complete
    proc = kdcache("train-student", "--data", fmnist_small.root, "--epochs", 1, "--out", tmp_path / "r", "--cache",
                   cache, "--teachers", f"{A},{B}", "--view-seeds", "0:2", *COMMON, check=False)
    assert proc.returncode == 2 and f"teacher '{B}': seed 1 is not complete" in proc.stderr, proc.stderr
    with pytest.warns(UserWarning, match=r"seeds \[1\] are left out"):
        src = CachedTeacher(TeacherCache.open(cache), torch.device("cpu"), order_seed=0, teachers=[A, B])
    assert src.seeds == [0]
