"""Losses: the cached KD loss equals the online one and timm's; DKD against the reference formulation;
what the top-k rebuild loses for k < C."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.task.distillation import LogitDistillationTask

from conftest import dump_random_teacher, kdcache
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.cache.targets import dense_logits
from kdcache.models import ModelSpec, Normalize, build_model
from kdcache.augment.loader import ReplayLoader
from kdcache.student.losses import LossConfig, StudentLoss, dkd, vanilla_kd


@pytest.fixture(scope="module")
def teacher_and_caches(fmnist_small, random_teacher, exact_cache, tmp_path_factory):
    """The random teacher, its weights, its lossless cache and a k = 5 cache of the same views."""
    model, info, weights = random_teacher
    top5 = dump_random_teacher(fmnist_small.root, tmp_path_factory.mktemp("loss") / "top5", weights, "0:2", "--topk", 5)
    return model, info, weights, exact_cache, top5


def _batch(split, slab, n=96):
    loader = ReplayLoader(split.beton_path, split.num_samples, 32, batch_size=n, workers=2, order="random", seed=5)
    loader.set_views(slab.params)
    images, labels, idx = next(iter(loader))
    for _ in loader:  # finish the epoch (FFCV's epoch thread)
        pass
    return images, labels, idx


def test_cached_kd_loss_equals_online_and_timm(fmnist_small, teacher_and_caches):
    model, info, _, exact, _ = teacher_and_caches
    cache = TeacherCache.open(exact)
    slab = read_slab(cache, 1)
    images, labels, idx = _batch(fmnist_small.split("train"), slab)
    norm = Normalize(info["mean"], info["std"])
    with torch.no_grad():
        online = model(norm(images)).float()
    cached = dense_logits(*(torch.from_numpy(np.asarray(a[idx.numpy()])) for a in (slab.logp, slab.indices, slab.log_tail)), 10)
    torch.manual_seed(0)
    student_logits = torch.randn(len(idx), 10) * 2
    for T in (1.0, 4.0):
        a, b = vanilla_kd(student_logits, cached, T), vanilla_kd(student_logits, online, T)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
        a, b = dkd(student_logits, cached, labels, temperature=T), dkd(student_logits, online, labels, temperature=T)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # timm's LogitDistillationTask on the same views: its KD term equals ours on the cached logits
    student = build_model(ModelSpec(name="resnet10t", random_init=True, seed=11), 10)[0]
    for T in (1.0, 2.0):
        task = LogitDistillationTask(student, model, criterion=torch.nn.CrossEntropyLoss(), temperature=T, verbose=False)
        task.eval()
        with torch.no_grad():
            out = task(norm(images), labels)
            ours = vanilla_kd(out["output"], cached, T)
        assert out["kd_loss"].item() == pytest.approx(ours.item(), rel=1e-5)


def test_student_loss_combines_terms():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    out = StudentLoss(LossConfig(kd_loss="kd", kd_weight=2.0, hard_loss="bce", hard_weight=0.5, temperature=2.0))(s, y, t)
    assert out["loss"].item() == pytest.approx(2.0 * vanilla_kd(s, t, 2.0).item() + 0.5 * out["hard_loss"].item())
    ce = StudentLoss(LossConfig(kd_loss="none", hard_loss="ce"))(s, y)
    assert ce["loss"].item() == pytest.approx(F.cross_entropy(s, y).item()) and "kd_loss" not in ce


def _dkd_reference(logits_student, logits_teacher, target, alpha, beta, temperature):
    """DKD as written in the authors' code (megvii-research/mdistiller, mdistiller/distillers/DKD.py)."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    cat = lambda t: torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)
    pred_student, pred_teacher = cat(pred_student), cat(pred_teacher)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature ** 2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_matches_the_reference_formulation():
    torch.manual_seed(1)
    s, t, y = torch.randn(32, 100) * 3, torch.randn(32, 100) * 3, torch.randint(0, 100, (32,))
    for alpha, beta, T in ((1.0, 8.0, 4.0), (1.0, 2.0, 1.0)):
        assert dkd(s, t, y, alpha, beta, T).item() == pytest.approx(_dkd_reference(s, t, y, alpha, beta, T).item(), rel=1e-5)


def test_topk_rebuild_error_is_reported_and_bounded(fmnist_small, teacher_and_caches, capsys):
    """k = 5 of 10: the stored classes keep their exact probabilities; the rest is an approximation whose
    KL to the full distribution is measured here (and by verify --replay as topk_kl)."""
    model, info, _, exact, top5 = teacher_and_caches
    full, cut = read_slab(TeacherCache.open(exact), 0), read_slab(TeacherCache.open(top5), 0)
    t = lambda a: torch.from_numpy(np.asarray(a))
    p_full = torch.log_softmax(dense_logits(t(full.logp), t(full.indices), t(full.log_tail), 10), 1)
    p_cut = torch.log_softmax(dense_logits(t(cut.logp), t(cut.indices), t(cut.log_tail), 10), 1)
    stored = t(cut.indices).long()
    # uint16 log-probabilities: 2.5e-4 relative each, and the tail mass exact
    assert torch.allclose(p_full.gather(1, stored).exp(), p_cut.gather(1, stored).exp(), rtol=1e-3, atol=0)
    tail_cut = 1 - p_cut.gather(1, stored).exp().sum(1)
    kl = (p_full.exp() * (p_full - p_cut)).sum(1)
    tail = 1 - p_full.gather(1, stored).exp().sum(1)
    assert torch.allclose(tail_cut, tail, rtol=1e-3)
    print(f"top-5 of 10 rebuild: mean KL {kl.mean():.2e}, max {kl.max():.2e}, mean tail mass {tail.mean():.3f}")
    assert (kl > -1e-6).all() and kl.mean() > 0  # an approximation, not exact...
    assert kl.mean() < 0.05                       # ...but close for this teacher
    report = kdcache("verify", top5, "--replay", 16, "--json").stdout
    import json
    replay = json.loads(report)["replay"]
    assert 0 < replay["topk_kl_mean"] < 0.05 and replay["replay_kl_mean"] < replay["topk_kl_mean"]
