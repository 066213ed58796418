"""Sparse targets (kdcache.cache.targets): the sampled rule "importance-tail-v1" is unbiased at T = Td, its
normaliser is exact there, the sampler's draws are systematic; top-k targets are unchanged ("uniform-tail-v2");
MixedTargets combines members. Small tensors only: the whole file runs in a few seconds."""

import math

import pytest
import torch

from kdcache.cache.targets import MixedTargets, SparseTargets, draw_tail
from kdcache.student.losses import kd_loss, vanilla_kd

# float32 targets: softmax over the slots, scatter, log, exp; each probability carries a relative error of
# a few ulp times |log p| (<= 25 here): <= 25 * 2**-23 = 3e-6 relative. Comparisons of float32 targets with
# float64 truth use 1e-5 relative (3x margin).
F32_RTOL = 1e-5


def distribution(classes: int, seed: int, rows: int = 1, spread: float = 1.5) -> torch.Tensor:
    """(rows, classes) float64 log-probabilities, spread but not extreme (logits N(0, spread^2))."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(spread * torch.randn(rows, classes, generator=g, dtype=torch.float64), dim=1)


def sampled(logp: torch.Tensor, exact: int, draws: int, td: float, uniforms: torch.Tensor) -> SparseTargets:
    """A sampled row per uniform, as the dump makes it (float32 logp: no uint16 rounding, whose bias the
    benchmark measures separately)."""
    top_lp, top_ix = logp.topk(exact, dim=1)
    classes, draw_lp, log_s = draw_tail(logp, top_ix, draws, td, uniforms)
    return SparseTargets(torch.cat([top_ix, classes], 1), torch.cat([top_lp, draw_lp], 1).float(), log_s.float(),
                         logp.shape[1], exact=exact, sample_temperature=td)


def tail_q(logp: torch.Tensor, top_ix: torch.Tensor, td: float) -> torch.Tensor:
    """The sampler's proposal over the tail: q_j = p_j^(1/Td) / S, 0 on the top classes."""
    return torch.softmax((logp / td).scatter(1, top_ix, -math.inf), dim=1)


@pytest.mark.parametrize("td", [1.0, 2.0])
def test_sampled_target_is_unbiased_at_its_temperature(td):
    """E[probs(Td)] = p_Td class by class: the mean over R independent systematic draws is within 5 standard
    errors (from the draws) of p_Td for every one of 50 classes. 5 sigma: a correct estimator fails a class with
    probability 5.7e-7 (normal tail; R = 4000 draws make the mean normal), so 50 classes x 2 temperatures fail
    with probability < 1e-4; a bias of 5 SE (here ~1e-3 absolute on the rarer classes) is caught."""
    logp = distribution(50, seed=3, spread=1.0)
    exact, draws, rounds = 3, 8, 4000
    q = tail_q(logp, logp.topk(exact, dim=1).indices, td)[0]
    # every tail class is drawn often enough for its sample standard error to mean something (>= 50 hits)
    assert float(q[q > 0].min()) * draws * rounds >= 50
    g = torch.Generator().manual_seed(11)
    targets = sampled(logp.expand(rounds, -1), exact, draws, td, torch.rand(rounds, generator=g, dtype=torch.float64))
    probs = targets.probs(td).double()
    mean, se = probs.mean(0), probs.std(0) / math.sqrt(rounds)
    want = torch.softmax(logp[0] / td, dim=0)
    # top classes have no spread (se = 0): float32 rounding bounds them instead
    bad = (mean - want).abs() > 5 * se + F32_RTOL * want
    assert not bad.any(), f"classes {bad.nonzero().flatten().tolist()}: mean {mean[bad]} vs {want[bad]} (se {se[bad]})"


@pytest.mark.parametrize("td", [1.0, 2.0])
def test_normaliser_is_exact_at_its_temperature(td):
    """At T = Td the slots' denominator is sum_top p^(1/Td) + S = sum_all p^(1/Td), the true one: in every draw
    the top classes get exactly p_Td and the drawn classes together exactly the tail's p_Td mass (at other T the
    denominator is estimated and both move from draw to draw). The target sums to 1 (float32 rounding)."""
    logp = distribution(50, seed=5, rows=64)
    exact = 4
    g = torch.Generator().manual_seed(2)
    targets = sampled(logp, exact, 6, td, torch.rand(64, generator=g, dtype=torch.float64))
    probs = targets.probs(td).double()
    want = torch.softmax(logp / td, dim=1)
    top_ix = targets.indices[:, :exact]
    torch.testing.assert_close(probs.gather(1, top_ix), want.gather(1, top_ix), rtol=F32_RTOL, atol=0)
    tail_mass = 1 - want.gather(1, top_ix).sum(1)
    torch.testing.assert_close(probs.sum(1) - probs.gather(1, top_ix).sum(1), tail_mass, rtol=F32_RTOL, atol=1e-7)
    torch.testing.assert_close(probs.sum(1), torch.ones(64, dtype=torch.float64), rtol=0, atol=50 * 2.0 ** -23)


@pytest.mark.parametrize("exact,td", [(4, 1.0), (4, 2.0), (0, 1.0), (1, 4.0)])
def test_draws_are_systematic(exact, td):
    """draw_tail: never a top class, ascending, each class drawn floor(m q_j) or ceil(m q_j) times (systematic
    sampling: positions (d + u) / m), its log-probability and log S returned exactly."""
    logp = distribution(30, seed=7, rows=200)
    draws = 7
    top_ix = logp.topk(exact, dim=1).indices
    g = torch.Generator().manual_seed(4)
    classes, draw_lp, log_s = draw_tail(logp, top_ix, draws, td, torch.rand(200, generator=g, dtype=torch.float64))
    assert classes.shape == (200, draws)
    assert not (classes[:, :, None] == top_ix[:, None, :]).any()
    assert (classes.diff(dim=1) >= 0).all()
    counts = torch.zeros(200, 30, dtype=torch.float64)
    counts.scatter_add_(1, classes, torch.ones(200, draws, dtype=torch.float64))
    expected = draws * tail_q(logp, top_ix, td)
    # float64 cumulative sums: m q_j within 1e-9 of an integer may round either way
    assert ((counts >= torch.floor(expected - 1e-9)) & (counts <= torch.ceil(expected + 1e-9))).all()
    # draw_tail renormalises the logits itself (float64): the same log-probabilities to ~1e-16
    torch.testing.assert_close(draw_lp, logp.gather(1, classes), rtol=0, atol=1e-12)
    tempered = (logp / td).scatter(1, top_ix, -math.inf)
    torch.testing.assert_close(log_s, torch.logsumexp(tempered, dim=1), rtol=0, atol=1e-12)


def uniform_tail_rebuild(logp, indices, log_tail, num_classes):
    """The "uniform-tail-v2" rule written out: the stored classes keep their logp, every other class gets
    log_tail - log(C - k)."""
    k = logp.shape[1]
    out = torch.full((logp.shape[0], num_classes), 0.0, dtype=torch.float32)
    out += (log_tail.float() - math.log(num_classes - k))[:, None]
    return out.scatter(1, indices, logp.float())


def test_topk_targets_unchanged():
    """Top-k targets (exact None) are what they were before format 4: the dense rebuild at every T, their
    probabilities softmax(dense / T), and kd_loss on them the same bits as vanilla KD on the dense logits."""
    logp = distribution(20, seed=9, rows=16)
    top_lp, top_ix = logp.topk(5, dim=1)
    log_tail = torch.logsumexp(logp.scatter(1, top_ix, -math.inf), dim=1)
    targets = SparseTargets(top_ix, top_lp.float(), log_tail.float(), 20)
    dense = uniform_tail_rebuild(top_lp, top_ix, log_tail, 20)
    assert torch.equal(targets.dense_logits(), dense)
    student = torch.randn(16, 20, generator=torch.Generator().manual_seed(1))
    for t in (1.0, 2.0, 4.0):
        assert torch.equal(targets.logits_at(t), dense)
        assert torch.equal(targets.probs(t), torch.softmax(dense / t, dim=1))
        assert torch.equal(kd_loss(student, targets, t), vanilla_kd(student, dense, t))


def test_mixed_targets_weighted_mean_and_choice():
    logp_a, logp_b = distribution(12, seed=1, rows=8), distribution(12, seed=2, rows=8)
    top_lp, top_ix = logp_a.topk(3, dim=1)
    member_a = SparseTargets(top_ix, top_lp.float(),
                             torch.logsumexp(logp_a.scatter(1, top_ix, -math.inf), dim=1).float(), 12)
    member_b = sampled(logp_b, 2, 4, 2.0, torch.full((8,), 0.3, dtype=torch.float64))
    for t in (1.0, 2.0):
        pa, pb = member_a.probs(t), member_b.probs(t)
        mixed = MixedTargets([member_a, member_b], weights=[0.25, 0.75])
        torch.testing.assert_close(mixed.probs(t), 0.25 * pa + 0.75 * pb, rtol=F32_RTOL, atol=1e-7)
        # what the losses take: softmax(logits_at(T) / T) is the mixed target
        torch.testing.assert_close(torch.softmax(mixed.logits_at(t) / t, dim=1), 0.25 * pa + 0.75 * pb,
                                   rtol=F32_RTOL, atol=1e-7)
        choice = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
        picked = MixedTargets([member_a, member_b], choice=choice).log_probs(t)
        for row, c in enumerate(choice.tolist()):
            assert torch.equal(picked[row], (member_a, member_b)[c].log_probs(t)[row])
    with pytest.raises(ValueError):
        MixedTargets([member_a, member_b])
    with pytest.raises(ValueError):
        MixedTargets([member_a, member_b], weights=[0.5, 0.5], choice=torch.zeros(8, dtype=torch.int64))


def test_train_student_warns_when_sampled_targets_are_used_at_another_temperature():
    import warnings
    from types import SimpleNamespace

    from kdcache.errors import KdcacheError
    from kdcache.student.build import _check_sampled_targets
    from kdcache.student.losses import LossConfig

    def teacher(targets, td):
        return {"t": SimpleNamespace(spec=SimpleNamespace(targets=targets, sampled=targets != "topk",
                                                          sample_temperature=td))}
    sampled, cv, topk = teacher("sampled", 4.0), teacher("sampled-cv", 4.0), teacher("topk", 1.0)
    for kind in (sampled, cv):
        with pytest.warns(UserWarning, match="unbiased at T = 4 .* --temperature 2"):
            _check_sampled_targets(kind, LossConfig(temperature=2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_sampled_targets(sampled, LossConfig(temperature=4.0))
        _check_sampled_targets(cv, LossConfig(temperature=4.0))
        _check_sampled_targets(topk, LossConfig(temperature=2.0))
        _check_sampled_targets(sampled, LossConfig(kd_loss="none", hard_loss="ce", temperature=2.0))
        _check_sampled_targets(sampled, LossConfig(kd_loss="dkd", temperature=4.0))
    # DKD renormalises its targets: the signed sampled-cv ones are refused, naming the teacher and the way out
    with pytest.raises(KdcacheError, match="--kd-loss dkd: teacher t's sampled-cv targets are signed.*--kd-loss kd"):
        _check_sampled_targets(cv, LossConfig(kd_loss="dkd", temperature=4.0))
