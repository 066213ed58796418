"""Sampled targets with a median control variate ("median-control-variate-v1", --targets sampled-cv;
docs/cache-format.md "Targets"): exactly unbiased at T = Td (the expectation over the sampler's uniform taken
exactly, piece by piece), exact on a flat tail, within a stated error bound for every draw, consistent at
T != Td; the KD loss takes the signed target linearly. Small tensors only."""

import math

import pytest
import torch

from kdcache.cache.targets import MixedTargets, SparseTargets, draw_tail, round_like_stored
from kdcache.errors import KdcacheError
from kdcache.student.losses import dkd_loss, kd_loss, signed_kd, vanilla_kd

# The float32 parts of a target: log S, log beta, log A are stored as float32 (relative error of exp(x) up to
# |x| 2^-24, |x| <= 40 here: 2.4e-6) and the target is cast to float32 at the end (6e-8); every term is at
# most 3 S / Z <= 3 in size (beta <= S, A <= 3 S), so each class is off by at most 3 * 2.5e-6 = 7.5e-6.
F32_ATOL = 1e-5


def distribution(classes: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """(1, classes) float64 log-probabilities, logits N(0, spread^2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(spread * torch.randn(1, classes, generator=g, dtype=torch.float64), dim=1)


def cv_rows(logp: torch.Tensor, exact: int, draws: int, td: float, uniforms: torch.Tensor) -> SparseTargets:
    """One sampled-cv row per uniform, as the dump makes it (kdcache.teacher.runner: uint16-rounded logp)."""
    logp = logp.expand(len(uniforms), -1)
    top_lp, top_ix = logp.topk(exact, dim=1)
    classes, draw_lp, stats = draw_tail(logp, top_ix, draws, td, uniforms, control_variate=True)
    return SparseTargets(torch.cat([top_ix, classes], 1), torch.cat([round_like_stored(top_lp, "uint16"), draw_lp],
                         1).float(), stats.float(), logp.shape[1], exact=exact, sample_temperature=td,
                         control_variate=True)


def documented_proposal(logp: torch.Tensor, exact: int, td: float):
    """(q over all classes, beta, A, S) of docs/cache-format.md from the rounded row: r = p^(1/Td) on the tail,
    beta its median, q_j = |r_j - beta| / A."""
    lp = round_like_stored(logp[0], "uint16")
    top = lp.topk(exact).indices
    tail = torch.ones_like(lp, dtype=torch.bool)
    tail[top] = False
    r = torch.exp(lp / td)
    beta = r[tail].median()                     # the lower median, as torch (any draw-free baseline is unbiased)
    spread = torch.where(tail, (r - beta).abs(), torch.zeros_like(r))
    return spread / spread.sum(), beta, spread.sum(), r[tail].sum()


def pieces(q: torch.Tensor, draws: int):
    """Midpoints and lengths of the intervals of u on which systematic sampling of `draws` positions
    (d + u) / m on q's cumulative distribution draws the same classes: the expectation over u, exactly."""
    cuts = {0.0, 1.0}
    for c in torch.cumsum(q, 0).tolist():
        for d in range(draws):
            u = draws * c - d
            if 0.0 < u < 1.0:
                cuts.add(u)
    cuts = torch.tensor(sorted(cuts), dtype=torch.float64)
    return (cuts[1:] + cuts[:-1]) / 2, cuts[1:] - cuts[:-1]


def exact_mean(logp, exact, draws, td, temperature, what=lambda t, T: t.probs(T).double()):
    q, *_ = documented_proposal(logp, exact, td)
    mid, length = pieces(q, draws)
    values = what(cv_rows(logp, exact, draws, td, mid), temperature)
    return (values * length.reshape(-1, *([1] * (values.dim() - 1)))).sum(0), values, length


def truth(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution the cache stores (uint16-rounded logp) softened at `temperature`."""
    return torch.softmax(round_like_stored(logp[0], "uint16") / temperature, dim=0)


@pytest.mark.parametrize("td", [1.0, 4.0])
@pytest.mark.parametrize("exact,draws", [(1, 1), (3, 4)])
def test_the_target_is_unbiased_at_its_temperature(td, exact, draws):
    """E_u[probs(Td)] = p_Td class by class, the expectation over the sampler's uniform taken exactly."""
    logp = distribution(12, seed=5)
    mean, values, _ = exact_mean(logp, exact, draws, td, td)
    assert float(values.std(0).max()) > 1e-3, "the draws should move the target"
    if draws == 1:   # one draw below the baseline outweighs it: the signed path is exercised
        assert (values < 0).any()
    torch.testing.assert_close(mean, truth(logp, td), rtol=0, atol=F32_ATOL)


def test_the_importance_rule_read_as_a_control_variate_would_be_biased():
    """The check above can fail: the same rows with the baseline taken as 0 (the importance rule's weights
    A / m per draw on |r - 0|... here: the stored beta dropped) are biased far beyond F32_ATOL."""
    logp = distribution(12, seed=5)

    def no_baseline(t, T):
        stats = t.log_tail.clone()
        stats[:, 1] = stats[:, 1] - 30.0                # beta -> beta e^-30: the rows' draws no longer match it
        return SparseTargets(t.indices, t.logp, stats, t.num_classes, t.exact, t.sample_temperature, True).probs(T)
    mean, _, _ = exact_mean(logp, 1, 1, 4.0, 4.0, what=lambda t, T: no_baseline(t, T).double())
    assert (mean - truth(logp, 4.0)).abs().max() > 100 * F32_ATOL


def test_every_draw_is_within_the_spread_of_the_truth():
    """Per draw, the tail's error is the counts' error times A: sum_j |t_j - p_j| <= 2 A / Z (systematic counts
    are within 1 of m q_j, and sum_j |count_j / m - q_j| <= 2). On a tail within a factor 2 of flat, A is a
    fraction of S, so every single draw is closer to the truth than importance sampling's is on average."""
    lp = torch.log_softmax(torch.tensor([[4.0, 0.1, 0.3, 0.5, 0.2, 0.7, 0.4, 0.0, 0.6, 0.35]], dtype=torch.float64), 1)
    td, exact, draws = 4.0, 1, 1
    q, beta, a, s = documented_proposal(lp, exact, td)
    z = torch.exp(round_like_stored(lp[0], "uint16") / td).sum()
    _, values, length = exact_mean(lp, exact, draws, td, td)
    l1 = (values - truth(lp, td)).abs().sum(1)
    assert float(l1.max()) <= float(2 * a / z) + F32_ATOL
    assert float(a / s) < 0.3
    # importance sampling of the same row (one draw carries S): its mean L1 error, exactly
    top = lp.topk(exact, 1).indices
    q_is = torch.softmax((round_like_stored(lp, "uint16") / td).scatter(1, top, -math.inf), 1)[0]
    mid, length_is = pieces(q_is, draws)
    classes, draw_lp, log_s = draw_tail(lp.expand(len(mid), -1), top.expand(len(mid), -1), draws, td, mid)
    t_is = SparseTargets(torch.cat([top.expand(len(mid), -1), classes], 1),
                         torch.cat([lp.topk(exact, 1).values.expand(len(mid), -1), draw_lp], 1).float(),
                         log_s.float(), 10, exact=exact, sample_temperature=td)
    is_l1 = ((t_is.probs(td).double() - torch.softmax(lp[0] / td, 0)).abs().sum(1) * length_is).sum()
    assert float(l1.max()) < float(is_l1) / 2


def test_a_flat_tail_is_exact_without_spread():
    """All tail classes equal: A = 0 (stored log A = -inf), no correction, the target is the truth at any u."""
    lp = torch.log_softmax(torch.tensor([[3.0, 1.0] + [0.0] * 8], dtype=torch.float64), 1)
    t = cv_rows(lp, 2, 3, 2.0, torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64))
    assert torch.isneginf(t.log_tail[:, 2]).all()
    for temperature in (2.0, 1.0):
        torch.testing.assert_close(t.probs(temperature).double(), truth(lp, temperature).expand(3, -1),
                                   rtol=0, atol=F32_ATOL)


def test_at_another_temperature_the_target_is_consistent():
    """Read at T != Td the corrections are importance-weighted and the normaliser estimated: the error
    shrinks as m grows; with systematic counts within 1 of m q_j, each tail class is within w_j / m of its
    p_j^(1/T) (w_j = |p_j^(1/T) - b| A / |r_j - beta|), which bounds the total-variation distance computed."""
    logp = distribution(40, seed=8)
    exact, td, temperature = 2, 1.0, 2.0
    q, beta, a, s = documented_proposal(logp, exact, td)
    lp = round_like_stored(logp[0], "uint16")
    b = beta ** (td / temperature)
    tail = q > 0
    w = ((torch.exp(lp / temperature) - b).abs() * a / (torch.exp(lp / td) - beta).abs())[tail]
    z = torch.exp(lp / temperature).sum()
    want = truth(logp, temperature)
    for draws in (64, 4096):
        t = cv_rows(logp, exact, draws, td, torch.tensor([0.37], dtype=torch.float64)).probs(temperature)[0].double()
        bound = 2 * float(w.sum()) / draws / float(z)   # the numerator's error, then the normaliser's (at most as much)
        tv = float((t - want).abs().sum()) / 2
        assert tv <= bound + F32_ATOL
    assert bound < 1e-2


def test_kd_loss_takes_signed_targets_linearly():
    """kd_loss on a sampled-cv target is signed_kd: for a target that is a distribution it is vanilla KD (value
    and gradient), and over the exact expectation of draws its gradient is the full distribution's."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 12, generator=g, dtype=torch.float64).float()
    p = torch.softmax(torch.randn(1, 12, generator=g), 1)
    for temperature in (1.0, 4.0):
        a = s.clone().requires_grad_()
        b = s.clone().requires_grad_()
        la = signed_kd(a, torch.softmax(p.log() / temperature, 1), temperature)
        lb = vanilla_kd(b, p.log(), temperature)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    logp = distribution(12, seed=5)
    td, student = 4.0, s.expand(1, -1)

    def grad(t, T):
        x = student.expand(len(t), -1).clone().requires_grad_()
        (kd_loss(x, t, T) * len(t)).backward()       # batch mean -> per-row gradients
        return x.grad.double()
    mean_grad, _, _ = exact_mean(logp, 2, 3, td, td, what=grad)
    x = student.double().clone().requires_grad_()
    full = torch.softmax(logp / td, 1)
    (-(full * torch.log_softmax(x / td, 1)).sum() * td ** 2).backward()
    # gradient T (sum(t) s_T - t): the expected target within F32_ATOL per class, times T (and sum(t) within C of it)
    torch.testing.assert_close(mean_grad, x.grad[0], rtol=0, atol=td * 13 * F32_ATOL)


def test_signed_targets_mix_linearly_and_have_no_log():
    logp = distribution(12, seed=5)
    cv = cv_rows(logp, 2, 3, 2.0, torch.tensor([0.2, 0.7], dtype=torch.float64))
    top = logp.expand(2, -1).topk(4, 1)
    topk = SparseTargets(top.indices, top.values.float(),
                         torch.logsumexp(logp.expand(2, -1).scatter(1, top.indices, -math.inf), 1).float(), 12)
    mixed = MixedTargets([cv, topk], weights=[0.25, 0.75])
    assert mixed.signed and not topk.signed
    torch.testing.assert_close(mixed.probs(2.0), 0.25 * cv.probs(2.0) + 0.75 * topk.probs(2.0))
    chosen = MixedTargets([cv, topk], choice=torch.tensor([1, 0]))
    torch.testing.assert_close(chosen.probs(2.0), torch.stack([topk.probs(2.0)[0], cv.probs(2.0)[1]]))
    for target in (cv, mixed):
        with pytest.raises(KdcacheError, match="signed"):
            target.log_probs(2.0)
        with pytest.raises(KdcacheError, match="dkd"):
            dkd_loss(torch.zeros(2, 12), target, torch.zeros(2, dtype=torch.int64))
    assert torch.isfinite(kd_loss(torch.zeros(2, 12), mixed, 2.0))
    # --mix-labels: each row lambda-mixes its two views' targets, signed ones by their probabilities
    from kdcache.student.ensemble import LambdaMix
    lam = torch.tensor([0.3, 0.9])
    mix = LambdaMix(cv, topk, lam)
    assert mix.signed
    torch.testing.assert_close(mix.probs(2.0), lam[:, None] * cv.probs(2.0) + (1 - lam[:, None]) * topk.probs(2.0))
    with pytest.raises(KdcacheError, match="signed"):
        mix.log_probs(2.0)
