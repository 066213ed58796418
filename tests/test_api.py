"""The public Python surface: open_cache reads what the cache holds, the public ReplayLoader's batches carry
the targets of exactly their views, the public losses are StudentLoss's, and examples/train_loop.py (a plain
PyTorch loop on these names) takes the very steps `kdcache train-student` takes."""

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import dump_random_teacher, kdcache
from kdcache.augment.params import ParamLayout
from kdcache.cache.reader import open_cache, open_dataset
from kdcache.cache.schema import LOGP_SCALE
from kdcache.cache.targets import SparseTargets
from kdcache.errors import KdcacheError
from kdcache.student.losses import LossConfig, StudentLoss, dkd_loss, hard_label_target, kd_loss
from kdcache.student.replay import ReplayLoader
from kdcache.student.soft_labels import MixTargets

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_loop.py"
A2_FLAGS = ["--aa", "rand-m7-mstd0.5", "--mixup", 0.2, "--cutmix", 1.0, "--reprob", 0.25, "--mix-block", 32]


@pytest.fixture(scope="module")
def a2_cache(fmnist_small, random_teacher, tmp_path_factory):
    """An A2-style cache (RandAugment, erasing, mixup/cutmix) of one seed, top-5 of 10 in uint16."""
    return dump_random_teacher(fmnist_small.root, tmp_path_factory.mktemp("api_a2") / "cache", random_teacher[2],
                               "0:1", "--topk", 5, *A2_FLAGS)


def _raw(cache_path, seed, name):
    return zarr.open_array(str(Path(cache_path) / f"seeds/{seed:06d}" / name), mode="r")[:]


def test_open_cache_identity_and_readers_equal_the_raw_arrays(fmnist_small, exact_cache, a2_cache):
    for path, seed in ((exact_cache, 2), (a2_cache, 0)):
        cache = open_cache(path)
        attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"]
        spec = attrs["spec"]
        assert cache.path == str(path) and cache.teacher == spec["teacher"] and cache.dataset == spec["dataset"]
        assert cache.recipe.to_dict() == spec["recipe"] and cache.global_seed == spec["global_seed"]
        assert (cache.topk, cache.num_classes, cache.num_samples) == (spec["topk"], 10, 400)
        logp = _raw(path, seed, "logp")
        if logp.dtype == np.uint16:   # the stored fixed point (docs/cache-format.md)
            logp = logp.astype(np.float32) * np.float32(-1.0 / LOGP_SCALE)
        rows = np.array([399, 0, 17, 17, 250])
        t = cache.targets(seed, rows)
        assert isinstance(t, SparseTargets) and t.indices.dtype == torch.int64 and t.logp.dtype == torch.float32
        assert np.array_equal(t.indices.numpy(), _raw(path, seed, "indices")[rows].astype(np.int64))
        assert np.array_equal(t.logp.numpy(), logp[rows])
        assert np.array_equal(t.log_tail.numpy(), _raw(path, seed, "log_tail")[rows])
        assert np.array_equal(cache.view_params(seed, rows), _raw(path, seed, "params")[rows])
        assert len(cache.targets(seed)) == 400 and cache.view_params(seed, 3).shape == (1, cache.view_params(seed).shape[1])
        probs = cache.probs(seed, rows, temperature=2.0)
        assert probs.shape == (5, 10) and torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
        assert torch.equal(probs, torch.softmax(t.dense_logits() / 2.0, 1))
    assert open_cache(exact_cache).seeds == [0, 1, 2] and open_cache(a2_cache).seeds == [0]
    with pytest.raises(KdcacheError, match="seed 5 is not a complete seed"):
        open_cache(exact_cache).targets(5)
    with pytest.raises(KdcacheError, match="sample index 400 is outside"):
        open_cache(exact_cache).targets(0, [3, 400])
    # under a cache root: chosen by the dataset (as train-student --cache-root) or by its split fingerprint
    root = Path(exact_cache).parent
    assert open_cache(fmnist_small.root, root=root).path == open_cache(exact_cache).path
    fp = open_dataset(fmnist_small.root).split("train").fingerprint
    assert open_cache(root=root, split_fingerprint=fp).num_samples == 400
    with pytest.raises(KdcacheError, match="no cache for this dataset split"):
        open_cache(root=root, split_fingerprint="0" * 64)
    with pytest.raises(KdcacheError, match="give root= too"):
        open_cache(exact_cache, cache_id="x")


def _epoch(loader):
    return [b for b in loader]


def test_replay_loader_batches_carry_the_targets_of_their_views(fmnist_small, exact_cache):
    cache = open_cache(exact_cache)
    loader = ReplayLoader(data=fmnist_small.root, cache=exact_cache, batch_size=64, workers=2, order_seed=3)
    size = fmnist_small.view_size
    assert len(loader) == 400 // 64 and loader.num_classes == 10
    epochs = []
    for epoch in range(3):   # epochs cycle the cache's complete seeds 0, 1, 2
        batches = _epoch(loader)   # kept whole: each batch owns its tensors
        assert len(batches) == len(loader) and loader.epoch == epoch + 1
        seen = torch.cat([b.indices for b in batches])
        assert len(set(seen.tolist())) == len(seen) == 6 * 64
        for b in batches:
            assert b.seed == epoch and b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, size, size)
            assert b.partner is None and b.lam is None
            want = cache.targets(b.seed, b.indices)
            assert torch.equal(b.targets.indices, want.indices) and torch.equal(b.targets.logp, want.logp)
            assert torch.equal(b.targets.log_tail, want.log_tail)
            assert torch.equal(b.labels, torch.from_numpy(fmnist_small.split("train").labels[b.indices.numpy()]))
        epochs.append(batches)
    assert not torch.equal(epochs[0][0].images, epochs[1][0].images)
    loader.set_epoch(1)   # a resumed epoch replays the same views in the same order
    for a, b in zip(epochs[1], _epoch(loader)):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


def test_replay_loader_mixing_partners_and_normalised_images(fmnist_small, a2_cache):
    cache = open_cache(a2_cache)
    layout = ParamLayout.of(cache.recipe)
    o = layout.mix_offset
    mean, std = torch.tensor((0.5, 0.4, 0.3)).view(1, 3, 1, 1), torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1)
    loader = ReplayLoader(data=open_dataset(fmnist_small.root), cache=cache, batch_size=64, workers=2,
                          mean=mean.flatten().tolist(), std=std.flatten().tolist())
    mixed = 0
    for b in loader:
        assert b.images.dtype == torch.float32 and b.images.is_contiguous(memory_format=torch.channels_last)
        pixels = b.images * std * 255 + mean * 255   # back to the uint8 grey levels, up to float32 rounding
        assert torch.allclose(pixels, pixels.round(), atol=1e-3) and pixels.min() > -0.01 and pixels.max() < 255.01
        params = cache.view_params(0, b.indices)
        partner_index = b.indices[b.partner].numpy()
        is_mixed = params[:, o + 2] < 1
        assert np.array_equal(partner_index[is_mixed], (b.indices.numpy() + params[:, o + 1].astype(np.int64))[is_mixed])
        assert np.array_equal(partner_index[~is_mixed], b.indices.numpy()[~is_mixed])
        assert np.array_equal(b.lam.numpy(), params[:, o + 2])
        assert torch.equal(b.targets.logp, cache.targets(0, b.indices).logp)
        mixed += int(is_mixed.sum())
    assert mixed > 100


def test_replay_loader_online_teacher_scores_the_cached_views(fmnist_small, random_teacher, exact_cache):
    """Without a cache the loader draws the recipe's views (global seed 0, pass t: seed t): the views the lossless
    cache holds, so the online teacher's log-probabilities are the cached ones (float32 sums in other batches:
    rounding differences of order 1e-6), and without a teacher the batches have no targets."""
    model, info, _ = random_teacher
    cache = open_cache(exact_cache)
    online = ReplayLoader(data=fmnist_small.root, teacher=model, teacher_mean=info["mean"], teacher_std=info["std"],
                          batch_size=100, workers=2, order_seed=1, recipe=cache.recipe)
    plain = ReplayLoader(data=fmnist_small.root, batch_size=100, workers=2, order_seed=1, recipe=cache.recipe)
    for b, p in zip(online, plain):
        assert b.seed == p.seed == 0 and torch.equal(b.indices, p.indices) and torch.equal(b.images, p.images)
        assert p.targets is None and b.targets.shape == (100, 10)
        stored = torch.log_softmax(cache.targets(0, b.indices).dense_logits(), 1)
        assert torch.allclose(torch.log_softmax(b.targets, 1), stored, atol=1e-4)
    with pytest.raises(KdcacheError, match="a cache or an online teacher, not both"):
        ReplayLoader(data=fmnist_small.root, cache=exact_cache, teacher=model, batch_size=100)


DDP_REPLAY = r"""
import json, sys
import torch
import torch.distributed as dist
import kdcache

dist.init_process_group("gloo")
data, caches, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
rank = dist.get_rank()
record = {"rank": rank, "world_size": dist.get_world_size()}
for name, (cache, epoch) in caches.items():
    loader = kdcache.ReplayLoader(data=data, cache=cache, batch_size=40, workers=1, order_seed=3)  # distributed=None
    loader.set_epoch(epoch)
    record[name] = {"len": len(loader), "batches": [
        {"indices": b.indices, "labels": b.labels, "seed": b.seed, "partner": b.partner,
         "targets": (b.targets.indices, b.targets.logp, b.targets.log_tail)} for b in loader]}
torch.save(record, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_replay_loader_shards_an_epoch_over_two_ranks(fmnist_small, exact_cache, a2_cache, tmp_path):
    """Two processes with a gloo process group, each a ReplayLoader with the default distributed=None: the process
    group is detected and each rank replays its own half of the epoch (400 samples, 200 per rank, 5 batches of 40:
    with drop_last nothing is dropped, so the two halves are the 400 samples one process sees), each batch with the
    cached targets of the epoch's seed; with the A2 cache (mixup/cutmix pairs) every partner is in its batch."""
    script = tmp_path / "ddp_replay.py"
    script.write_text(DDP_REPLAY)
    caches = {"exact": (str(exact_cache), 1), "a2": (str(a2_cache), 0)}   # epoch 1 of the exact cache: seed 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           str(fmnist_small.root), json.dumps(caches), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    labels = torch.from_numpy(fmnist_small.split("train").labels)
    for name, (path, epoch) in caches.items():
        cache = open_cache(path)
        seen = []
        for r in ranks:
            share = r[name]
            assert share["len"] == len(share["batches"]) == 200 // 40
            indices = torch.cat([b["indices"] for b in share["batches"]])
            assert len(indices) == 200 and len(set(indices.tolist())) == 200, name
            seen.append(set(indices.tolist()))
            for b in share["batches"]:
                assert b["seed"] == epoch and len(b["indices"]) == 40 and (b["partner"] is None) == (name == "exact")
                assert torch.equal(b["labels"], labels[b["indices"]])
                want = cache.targets(epoch, b["indices"])
                got = b["targets"]
                assert torch.equal(got[0], want.indices) and torch.equal(got[1], want.logp)
                assert torch.equal(got[2], want.log_tail)
                if name == "a2":   # the partner of each view (itself when unmixed) is in this rank's batch
                    o = ParamLayout.of(cache.recipe).mix_offset
                    params = cache.view_params(epoch, b["indices"])
                    mixed = params[:, o + 2] < 1
                    partner = b["indices"][b["partner"]].numpy()
                    want_partner = b["indices"].numpy() + params[:, o + 1].astype(np.int64)
                    assert np.array_equal(partner[mixed], want_partner[mixed])
                    assert np.array_equal(partner[~mixed], b["indices"].numpy()[~mixed])
        assert not seen[0] & seen[1], f"{name}: the ranks share samples"
        assert seen[0] | seen[1] == set(range(400)), name


def test_public_losses_are_student_loss(fmnist_small, a2_cache):
    from timm.data.mixup import mixup_target
    torch.manual_seed(0)
    cache = open_cache(a2_cache)
    rows = torch.arange(40, 104)
    targets, labels = cache.targets(0, rows), torch.randint(0, 10, (64,))
    student = torch.randn(64, 10) * 3
    for T in (1.0, 4.0):
        kd = StudentLoss(LossConfig(kd_loss="kd", temperature=T))(student, labels, targets.dense_logits())
        assert torch.equal(kd_loss(student, targets, T), kd["kd_loss"]) and torch.equal(kd["loss"], kd["kd_loss"])
        assert torch.equal(kd_loss(student, targets.dense_logits(), T), kd["kd_loss"])
        d = StudentLoss(LossConfig(kd_loss="dkd", temperature=T, dkd_alpha=0.5, dkd_beta=2.0))(student, labels, targets)
        assert torch.equal(dkd_loss(student, targets, labels, 0.5, 2.0, T), d["kd_loss"])
    # the mixed hard-label target: timm's mixup_target per pair, and the one train-student computes
    params = cache.view_params(0)
    layout = ParamLayout.of(cache.recipe)
    o = layout.mix_offset
    labels_all = torch.from_numpy(fmnist_small.split("train").labels)
    mix = MixTargets(params, layout, torch.device("cpu"))
    batch = torch.arange(64, 128)          # whole mixing blocks: every partner is in the batch
    partner, lam = mix.in_batch(batch)
    target = hard_label_target(labels_all[batch], 10, 0.1, partner, lam)
    assert torch.equal(target, mix.hard_target(labels_all, batch, 10, 0.1))
    by_label = hard_label_target(labels_all[batch], 10, 0.1, lam=lam, partner_labels=labels_all[batch][partner])
    assert torch.equal(by_label, target)
    with pytest.raises(KdcacheError, match="give lam with partner"):
        hard_label_target(labels_all[batch], 10, partner=partner)
    i = int(np.flatnonzero(params[64:128, o] != 0)[0]) + 64
    j = i + int(params[i, o + 1])
    want = mixup_target(labels_all[[i, j]], 10, lam=float(params[i, o + 2]), smoothing=0.1)[0]
    assert torch.allclose(target[i - 64], want, atol=1e-6) and torch.allclose(target.sum(1), torch.ones(64))
    plain = hard_label_target(labels_all[:4], 10, 0.1)
    assert torch.allclose(plain.max(1).values, torch.full((4,), 0.91)) and torch.allclose(plain.sum(1), torch.ones(4))
    ce = StudentLoss(LossConfig(kd_loss="kd", hard_loss="ce", hard_weight=0.5))(student, labels, targets, target)
    from timm.loss import SoftTargetCrossEntropy
    assert torch.equal(ce["loss"], kd_loss(student, targets) + 0.5 * SoftTargetCrossEntropy()(student, target))


def _run_example(*args) -> str:
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [str(EXAMPLE), *map(str, args)]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


PUBLIC_MODULES = {"kdcache"}


def test_example_lists_its_options_and_uses_public_names_only():
    import ast
    with pytest.raises(SystemExit) as exit_:
        _run_example("--help")
    assert exit_.value.code == 0
    tree = ast.parse(EXAMPLE.read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported = {name for name in imported if name.split(".")[0] == "kdcache"}
    assert imported and imported <= PUBLIC_MODULES


def test_example_loop_takes_train_students_steps(fmnist_small, a2_cache, tmp_path):
    """Cached KD + the mixed hard-label CE on A2 views, SGD on a cosine schedule, float32 on the CPU: the example
    runs the same operations in the same order as train-student (same init, views, order, targets, loss
    expression, optimizer and schedule), so each step's loss is the same float32 number, bit for bit."""
    settings = ["--data", fmnist_small.root, "--cache", a2_cache, "--model", "test_resnet", "--epochs", 1,
                "--batch-size", 64, "--lr", 0.05, "--seed", 2, "--workers", 2]
    kdcache("train-student", *settings, "--out", tmp_path / "run", "--hard-loss", "ce", "--smoothing", 0.1,
            "--log-interval", 1, "--amp", "off", "--device", "cpu", "--no-progress")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    theirs = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    lines = _run_example(*settings, "--hard-weight", 1.0, "--smoothing", 0.1, "--device", "cpu").splitlines()
    ours = [(r["step"], r["loss"]) for r in map(json.loads, lines)]
    assert [s for s, _ in theirs] == [s for s, _ in ours] == list(range(1, 7))
    assert ours == theirs
    assert len({loss for _, loss in ours}) == 6   # the steps change the student
