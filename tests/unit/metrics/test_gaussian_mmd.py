"""Gaussian (gauss_w2, gauss_cw2, gauss_kl, gauss_ckl) and MMD (mmd_linear, mmd_rbf, cmmd_rbf) metrics.

Values are checked against independent numpy/scipy/POT oracles written from the formulas;
gradients with torch.autograd.gradcheck; robustness on degenerate batches.
"""
import math

import numpy as np
import ot
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kd2m import metrics
from kd2m.metrics import gaussian, linalg, mmd

GAUSS = ["gauss_w2", "gauss_cw2", "gauss_kl", "gauss_ckl"]
MMD = ["mmd_linear", "mmd_rbf", "cmmd_rbf"]
ALL = GAUSS + MMD
LABELLED = {"gauss_cw2", "gauss_ckl", "cmmd_rbf"}


def _pair(ns, nt, d, seed=0, shift=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(ns, d, generator=g, dtype=dtype) * (0.5 + torch.rand(d, generator=g, dtype=dtype))
    t = torch.randn(nt, d, generator=g, dtype=dtype) @ (torch.eye(d, dtype=dtype)
                                                        + 0.3 * torch.randn(d, d, generator=g, dtype=dtype)) + shift
    return s, t


def _call(name, s, t, y=None, **opts):
    return metrics.get(name, **opts)(s, t, y if name in LABELLED else None)


# ----------------------------------------------------------------------------------------- oracles
def np_ridge(s, t, rho):
    """r = ρ · max(τ, 1e-20), τ = mean per-channel (1/n) variance of the pooled batch."""
    return rho * max(np.concatenate([s, t]).var(0).mean(), 1e-20)


def np_fit(x, r):
    return x.mean(0), np.cov(x.T, bias=True).reshape(x.shape[1], x.shape[1]) + r * np.eye(x.shape[1])


def np_bures_w2(ms, Cs, mt, Ct):
    rs = scipy.linalg.sqrtm(Cs).real
    cross = scipy.linalg.sqrtm(rs @ Ct @ rs).real
    return float(((ms - mt) ** 2).sum() + np.trace(Cs + Ct - 2 * cross))


def np_kl(ms, Cs, mt, Ct):
    d = len(ms)
    inv = np.linalg.inv(Ct)
    dm = mt - ms
    return float(0.5 * (np.trace(inv @ Cs) + dm @ inv @ dm - d
                        + np.linalg.slogdet(Ct)[1] - np.linalg.slogdet(Cs)[1]))


def np_gauss(kind, s, t, rho, diagonal=False):
    r = np_ridge(s, t, rho)
    (ms, Cs), (mt, Ct) = np_fit(s, r), np_fit(t, r)
    if diagonal:
        vs, vt = np.diag(Cs), np.diag(Ct)
        if kind == "w2":
            return float(((ms - mt) ** 2).sum() + ((np.sqrt(vs) - np.sqrt(vt)) ** 2).sum())
        return float(0.5 * (vs / vt + (mt - ms) ** 2 / vt - 1 + np.log(vt) - np.log(vs)).sum())
    return np_bures_w2(ms, Cs, mt, Ct) if kind == "w2" else np_kl(ms, Cs, mt, Ct)


def np_class_gauss(kind, s, t, y, rho, diagonal=False):
    r = np_ridge(s, t, rho)  # from the whole batch
    vals = []
    for c in np.unique(y):
        (ms, Cs), (mt, Ct) = np_fit(s[y == c], r), np_fit(t[y == c], r)
        if diagonal:
            vs, vt = np.diag(Cs), np.diag(Ct)
            if kind == "w2":
                vals.append(((ms - mt) ** 2).sum() + ((np.sqrt(vs) - np.sqrt(vt)) ** 2).sum())
            else:
                vals.append(0.5 * (vs / vt + (mt - ms) ** 2 / vt - 1 + np.log(vt) - np.log(vs)).sum())
        else:
            vals.append(np_bures_w2(ms, Cs, mt, Ct) if kind == "w2" else np_kl(ms, Cs, mt, Ct))
    return float(np.mean(vals))


def np_median_sigma(s, t):
    z = np.concatenate([s, t])
    dist = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    dist = np.sort(dist)
    return dist[(len(dist) - 1) // 2]  # lower median, as torch.median


@pytest.mark.parametrize("m", [2, 3, 4, 7, 10, 33])
def test_median_bandwidth_is_the_lower_median_pairwise_distance(m):
    z = torch.randn(m, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    if m >= 4:
        z[m // 2] = z[0]  # a tie, so distinct values and the doubled off-diagonal list are not the same thing
    sq = torch.cdist(z, z) ** 2
    got = float(mmd.median_bandwidth(sq))
    assert got == pytest.approx(np_median_sigma(z[:1].numpy(), z[1:].numpy()), rel=1e-12)


def test_median_bandwidth_falls_back_to_the_mean_when_most_pairs_coincide():
    z = torch.zeros(6, 3, dtype=torch.float64)
    z[0] = torch.tensor([3.0, 4.0, 0.0])  # 5 of 15 pairs at distance 5, 10 at 0: median 0
    sq = torch.cdist(z, z) ** 2
    # the documented fallback: the mean pairwise *distance* (5 pairs at 5, 10 at 0), not √(mean d²)
    assert float(mmd.median_bandwidth(sq)) == pytest.approx(5 * 5 / 15, rel=1e-12)
    assert float(mmd.median_bandwidth(torch.zeros(4, 4))) == 1.0


def _mostly_coinciding(seed: int, dtype):
    """Student and teacher share 15 copies of one point (56 % of the 780 pooled pairs coincide),
    plus 5 distinct points each; offset and scale so the copies do not cancel exactly."""
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3 + 1
    return torch.cat([x[:1].repeat(15, 1), x[1:6]]), torch.cat([x[:1].repeat(15, 1), x[6:11]])


def _mean_pairwise_distance(z: np.ndarray) -> float:
    dist = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    return float(np.mean(dist))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(6))
def test_mmd_rbf_mean_fallback_survives_round_off_of_coinciding_pairs(seed, dtype):
    """The expansion ‖x‖² + ‖y‖² − 2xᵀy leaves ~1e-16 for coinciding points: the median was
    "positive", σ ≈ 2e-8 and the biased MMD² negative. Oracle: σ = mean pairwise distance from
    explicit differences (exactly 0 for copies), MMD² by the double loop."""
    s, t = _mostly_coinciding(seed, dtype)
    z = torch.cat([s, t]).double().numpy()
    sigma = _mean_pairwise_distance(z)
    K = mmd._pooled_kernel(s, t, None, (1.0,))
    assert float(-2.0 * math.log(float(K[0, 15])) * sigma**2) == pytest.approx(
        float(((z[0] - z[15]) ** 2).sum()), rel=1e-4)           # the kernel used σ = the mean distance
    got = float(mmd.mmd_rbf(s, t))
    want = np_mmd(s.double().numpy(), t.double().numpy(), sigma)
    assert got >= 0.0
    assert got == pytest.approx(want, rel=1e-9 if dtype == torch.float64 else 1e-4)
    got_c = float(mmd.cmmd_rbf(s, t, torch.zeros(20, dtype=torch.long)))
    assert got_c == pytest.approx(want, rel=1e-9 if dtype == torch.float64 else 1e-4)


def _coinciding_case(seed: int):
    """k copies of one point on both sides plus r distinct points each, random width, scale, offset."""
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(1, 64, (1,), generator=g))
    k = int(torch.randint(8, 30, (1,), generator=g))
    r = int(torch.randint(0, 6, (1,), generator=g))
    dt = torch.float64 if seed % 2 else torch.float32
    x = (torch.randn(2 * r + 1, d, generator=g, dtype=dt) * 10 ** float(torch.randint(-3, 4, (1,), generator=g))
         + float(torch.randn(1, generator=g)) * 10)
    return torch.cat([x[:1].repeat(k, 1), x[1:r + 1]]), torch.cat([x[:1].repeat(k, 1), x[r + 1:]])


@pytest.mark.parametrize("seed", [3, 37, 43, 135, 157])   # biased MMD² was -0.18, -0.015, -0.051, -0.078, -0.12
def test_biased_mmd_is_never_negative_and_matches_the_oracle(seed):
    """Biased MMD² is a squared RKHS norm; before the fix these batches gave negative values."""
    s, t = _coinciding_case(seed)
    z = torch.cat([s, t]).numpy()
    want = np_mmd(s.numpy(), t.numpy(), _mean_pairwise_distance(z))
    for got in (float(mmd.mmd_rbf(s, t)), float(mmd.cmmd_rbf(s, t, torch.zeros(len(s), dtype=torch.long)))):
        assert got >= 0.0
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def np_mmd(s, t, sigma, mults=(1.0,), unbiased=False):
    def k(a, b):
        return np.mean([math.exp(-np.sum((a - b) ** 2) / (2 * (sigma * m) ** 2)) for m in mults])

    ns, nt = len(s), len(t)
    kss = sum(k(s[i], s[j]) for i in range(ns) for j in range(ns) if not (unbiased and i == j))
    ktt = sum(k(t[i], t[j]) for i in range(nt) for j in range(nt) if not (unbiased and i == j))
    kst = sum(k(s[i], t[j]) for i in range(ns) for j in range(nt))
    if unbiased:
        return kss / (ns * (ns - 1)) + ktt / (nt * (nt - 1)) - 2 * kst / (ns * nt)
    return kss / ns**2 + ktt / nt**2 - 2 * kst / (ns * nt)


# ------------------------------------------------------------------------------------ gauss_w2 values
@pytest.mark.parametrize("rho", [0.0, 1e-3])
def test_gauss_w2_matches_sqrtm_and_pot(rho):
    s, t = _pair(400, 300, 6)
    got = float(gaussian.gauss_w2(s, t, ridge=rho))
    sn, tn = s.numpy(), t.numpy()
    assert got == pytest.approx(np_gauss("w2", sn, tn, rho), rel=1e-9)
    r = np_ridge(sn, tn, rho)
    (ms, Cs), (mt, Ct) = np_fit(sn, r), np_fit(tn, r)
    pot = float(ot.gaussian.bures_wasserstein_distance(ms, mt, Cs, Ct)) ** 2
    assert got == pytest.approx(pot, rel=1e-8)


@pytest.mark.parametrize("ns,nt,d", [(5, 7, 30), (1, 4, 12), (9, 9, 16)])
def test_gauss_w2_low_rank_route_is_exact(ns, nt, d, monkeypatch):
    """n_s + n_t < d: the reduced (n_s+n_t)-dim computation equals the d-dim one and the oracle."""
    s, t = _pair(ns, nt, d, seed=1)
    low = float(gaussian.gauss_w2(s, t, ridge=1e-2))
    monkeypatch.setattr(linalg, "LOWRANK_FRACTION", 0.0)
    full = float(gaussian.gauss_w2(s, t, ridge=1e-2))
    assert low == pytest.approx(full, rel=1e-9)
    assert low == pytest.approx(np_gauss("w2", s.numpy(), t.numpy(), 1e-2), rel=1e-8)


@pytest.mark.parametrize("kind,ns,nt,d,seed", [("w2", 50, 40, 7, 2), ("kl", 30, 20, 6, 6)])
def test_gauss_diagonal_closed_form(kind, ns, nt, d, seed):
    """Diagonal covariances: gauss_w2 and gauss_kl against their elementwise closed forms."""
    s, t = _pair(ns, nt, d, seed=seed)
    fn = {"w2": gaussian.gauss_w2, "kl": gaussian.gauss_kl}[kind]
    for rho in (0.0, 1e-2):
        got = float(fn(s, t, diagonal=True, ridge=rho))
        assert got == pytest.approx(np_gauss(kind, s.numpy(), t.numpy(), rho, diagonal=True), rel=1e-12)


def test_gauss_w2_point_masses_give_squared_mean_distance():
    d = 10
    s = torch.full((6, d), 0.3, dtype=torch.float64) + torch.arange(d)
    t = torch.full((9, d), -1.0, dtype=torch.float64)
    expected = float(((s[0] - t[0]) ** 2).sum())
    for diagonal in (False, True):
        assert float(gaussian.gauss_w2(s, t, diagonal=diagonal)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("ns,d", [(60, 5), (4, 20)])
def test_gauss_identity_and_symmetry(ns, d):
    s, t = _pair(ns, ns + 3, d, seed=3)
    for name in ("gauss_w2", "gauss_kl"):
        for diagonal in (False, True):
            assert float(_call(name, s, s.clone(), diagonal=diagonal)) == pytest.approx(0.0, abs=1e-9)
    for diagonal in (False, True):
        a = float(gaussian.gauss_w2(s, t, diagonal=diagonal))
        b = float(gaussian.gauss_w2(t, s, diagonal=diagonal))
        assert a > 0 and a == pytest.approx(b, rel=1e-10)


def test_gauss_w2_ridge_zero_on_singular_covariance_is_a_clear_error():
    s, t = _pair(3, 3, 8)
    with pytest.raises(ValueError, match="singular.*ridge"):
        gaussian.gauss_w2(s, t, ridge=0.0)
    with pytest.raises(ValueError, match="ridge"):
        gaussian.gauss_w2(s, t, ridge=-1.0)


# ------------------------------------------------------------------------------------ gauss_kl values
@pytest.mark.parametrize("ns,nt,d,rho", [(300, 200, 5, 0.0), (300, 200, 5, 1e-3), (4, 6, 25, 1e-2)])
def test_gauss_kl_matches_closed_form(ns, nt, d, rho):
    s, t = _pair(ns, nt, d, seed=4)
    got = float(gaussian.gauss_kl(s, t, ridge=rho))
    assert got == pytest.approx(np_gauss("kl", s.numpy(), t.numpy(), rho), rel=1e-8)


def test_gauss_kl_low_rank_route_is_exact(monkeypatch):
    s, t = _pair(4, 6, 25, seed=5)
    low = float(gaussian.gauss_kl(s, t, ridge=1e-2))
    monkeypatch.setattr(linalg, "LOWRANK_FRACTION", 0.0)
    assert low == pytest.approx(float(gaussian.gauss_kl(s, t, ridge=1e-2)), rel=1e-9)


def test_gauss_kl_nonnegative_and_asymmetric():
    s, t = _pair(40, 40, 4, seed=7)
    for diagonal in (False, True):
        st_, ts_ = float(gaussian.gauss_kl(s, t, diagonal=diagonal)), float(gaussian.gauss_kl(t, s, diagonal=diagonal))
        assert st_ > 0 and ts_ > 0
        assert abs(st_ - ts_) > 1e-3 * max(st_, ts_)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), ns=st.integers(1, 12), nt=st.integers(1, 12), d=st.integers(1, 6))
def test_gauss_properties_random(seed, ns, nt, d):
    s, t = _pair(ns, nt, d, seed=seed)
    w = float(gaussian.gauss_w2(s, t))
    assert w >= 0 and w == pytest.approx(float(gaussian.gauss_w2(t, s)), rel=1e-7, abs=1e-10)
    assert w == pytest.approx(np_gauss("w2", s.numpy(), t.numpy(), linalg.DEFAULT_RIDGE), rel=1e-6, abs=1e-9)
    assert float(gaussian.gauss_kl(s, t)) >= 0


# ------------------------------------------------------------------------ class-conditional Gaussians
@pytest.mark.parametrize("kind", ["w2", "kl"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_class_gaussians_match_per_class_oracle(kind, diagonal):
    s, t = _pair(23, 23, 4, seed=8)
    y = torch.tensor([0] * 10 + [3] * 8 + [5] * 4 + [7])  # includes a 1-sample class
    fn = gaussian.gauss_cw2 if kind == "w2" else gaussian.gauss_ckl
    got = float(fn(s, t, y, diagonal=diagonal, ridge=1e-2))
    expected = np_class_gauss(kind, s.numpy(), t.numpy(), y.numpy(), 1e-2, diagonal)
    assert got == pytest.approx(expected, rel=1e-8)


def test_class_gaussians_both_routes_agree(monkeypatch):
    """Small classes in many dims take the batched low-rank route; forcing the d×d route agrees."""
    s, t = _pair(12, 12, 20, seed=9)
    y = torch.arange(12) % 3
    for kind, fn in (("w2", gaussian.gauss_cw2), ("kl", gaussian.gauss_ckl)):
        expected = np_class_gauss(kind, s.numpy(), t.numpy(), y.numpy(), 1e-3)
        assert float(fn(s, t, y, ridge=1e-3)) == pytest.approx(expected, rel=1e-8)
        with monkeypatch.context() as mp:
            mp.setattr(linalg, "LOWRANK_FRACTION", 0.0)
            assert float(fn(s, t, y, ridge=1e-3)) == pytest.approx(expected, rel=1e-8)


# ----------------------------------------------------------------------------------------- MMD values
def test_mmd_linear_is_squared_mean_distance_and_linear_kernel_mmd():
    s, t = _pair(7, 5, 4, seed=10)
    sn, tn = s.numpy(), t.numpy()
    got = float(mmd.mmd_linear(s, t))
    assert got == pytest.approx(float(((sn.mean(0) - tn.mean(0)) ** 2).sum()), rel=1e-12)
    # biased MMD² with k(x, y) = xᵀy, by double loop
    lin = (sum(a @ b for a in sn for b in sn) / 49 + sum(a @ b for a in tn for b in tn) / 25
           - 2 * sum(a @ b for a in sn for b in tn) / 35)
    assert got == pytest.approx(lin, rel=1e-10)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("bandwidth", [None, 0.7])
@pytest.mark.parametrize("mults", [(1.0,), (0.25, 0.5, 1.0, 2.0, 4.0)])
def test_mmd_rbf_matches_double_loop(unbiased, bandwidth, mults):
    s, t = _pair(9, 6, 3, seed=11)
    sn, tn = s.numpy(), t.numpy()
    sigma = np_median_sigma(sn, tn) if bandwidth is None else bandwidth
    got = float(mmd.mmd_rbf(s, t, bandwidth=bandwidth, multipliers=mults, unbiased=unbiased))
    assert got == pytest.approx(np_mmd(sn, tn, sigma, mults, unbiased), rel=1e-9, abs=1e-12)


def test_mmd_rbf_basic_properties():
    s, t = _pair(12, 12, 3, seed=12)
    assert float(mmd.mmd_rbf(s, s.clone())) == pytest.approx(0.0, abs=1e-12)
    assert float(mmd.mmd_rbf(s, t)) > 0
    assert float(mmd.mmd_rbf(s, t)) == pytest.approx(float(mmd.mmd_rbf(t, s)), rel=1e-12)
    # the median bandwidth is detached: its gradient equals the fixed-bandwidth gradient at that σ
    sigma = float(np_median_sigma(s.numpy(), t.numpy()))
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    mmd.mmd_rbf(a, t).backward()
    mmd.mmd_rbf(b, t, bandwidth=sigma).backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14)


def test_mmd_rbf_option_errors():
    s, t = _pair(1, 5, 3)
    with pytest.raises(ValueError, match="at least 2"):
        mmd.mmd_rbf(s, t, unbiased=True)
    s, t = _pair(4, 5, 3)
    for bad in ({"bandwidth": 0.0}, {"bandwidth": -1.0}, {"multipliers": ()}, {"multipliers": (1.0, -2.0)}):
        with pytest.raises(ValueError):
            mmd.mmd_rbf(s, t, **bad)
    with pytest.raises(ValueError, match="no option"):
        metrics.get("mmd_rbf", sigma=1.0)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("bandwidth", [None, 1.3])
def test_cmmd_rbf_matches_per_class_oracle(unbiased, bandwidth):
    s, t = _pair(14, 14, 3, seed=13)
    y = torch.tensor([2] * 6 + [0] * 5 + [9] * 2 + [4])  # class 4 has one sample: biased fallback
    sn, tn, yn = s.numpy(), t.numpy(), y.numpy()
    sigma = np_median_sigma(sn, tn) if bandwidth is None else bandwidth  # whole batch, once
    expected = np.mean([np_mmd(sn[yn == c], tn[yn == c], sigma, unbiased=unbiased and (yn == c).sum() > 1)
                        for c in np.unique(yn)])
    got = float(mmd.cmmd_rbf(s, t, y, bandwidth=bandwidth, unbiased=unbiased))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_class_metrics_need_labels():
    s, t = _pair(6, 6, 3)
    for name in ("gauss_cw2", "gauss_ckl", "cmmd_rbf"):
        with pytest.raises(ValueError, match="needs labels"):
            metrics.get(name)(s, t)


# ------------------------------------------------------------------------------------------ gradients
def _standardise(a, b):
    """Rescale so the pooled mean channel variance τ is exactly 1, as a differentiable map.

    The metrics detach τ (the ridge is a scale, not something to optimise), so on raw inputs
    finite differences would see r move while autograd does not. Composed with this map τ is
    constant, and gradcheck verifies the metric's gradient exactly.
    """
    tau = torch.cat([a, b]).var(0, unbiased=False).mean()
    return a / tau.sqrt(), b / tau.sqrt()


# n > d and n < d (the latter takes the low-rank route). fast_mode checks the Jacobian along random
# directions (a full Jacobian per case would take seconds each on 2 cores).
GRAD_CASES = [(8, 7, 3), (3, 4, 9)]


@pytest.mark.parametrize("n,nt,d", GRAD_CASES)
@pytest.mark.parametrize("name", GAUSS)
@pytest.mark.parametrize("diagonal", [False, True])
def test_gradcheck_gaussian(name, diagonal, n, nt, d):
    s, t = _pair(n, n if name in LABELLED else nt, d, seed=14)
    s.requires_grad_(), t.requires_grad_()
    y = torch.arange(n) % 2 if name in LABELLED else None
    m = metrics.get(name, diagonal=diagonal, ridge=1e-2)
    assert torch.autograd.gradcheck(lambda a, b: m(*_standardise(a, b), y), (s, t), fast_mode=True)


def test_gradcheck_gaussian_full_route_at_n_below_d(monkeypatch):
    monkeypatch.setattr(linalg, "LOWRANK_FRACTION", 0.0)
    s, t = _pair(3, 4, 6, seed=15)
    s.requires_grad_(), t.requires_grad_()
    for fn in (gaussian.gauss_w2, gaussian.gauss_kl):
        assert torch.autograd.gradcheck(lambda a, b: fn(*_standardise(a, b), ridge=1e-2), (s, t), fast_mode=True)  # noqa: B023


@pytest.mark.parametrize("shape_s,shape_t", [((2, 4, 3), (2, 5, 3)), ((2, 2, 8), (2, 3, 8))])
def test_bures_term_full_jacobian(shape_s, shape_t):
    """The hand-written backward of the Bures term, full Jacobian, batched, both routes, fixed r."""
    g = torch.Generator().manual_seed(19)
    Zs = torch.randn(*shape_s, generator=g, dtype=torch.float64, requires_grad=True)
    Zt = torch.randn(*shape_t, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(0.05, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: linalg.bures_trace(a, b, r), (Zs, Zt))


@pytest.mark.parametrize("n,nt,d", GRAD_CASES)
@pytest.mark.parametrize("name,opts", [("mmd_linear", {}),
                                       ("mmd_rbf", {"bandwidth": 1.5}),
                                       ("mmd_rbf", {"bandwidth": 1.5, "multipliers": (0.5, 1, 2), "unbiased": True}),
                                       ("cmmd_rbf", {"bandwidth": 1.5}),
                                       ("cmmd_rbf", {"bandwidth": 1.5, "unbiased": True})])
def test_gradcheck_mmd(name, opts, n, nt, d):
    s, t = _pair(n, n if name in LABELLED else nt, d, seed=16)
    s.requires_grad_(), t.requires_grad_()
    y = torch.arange(n) % 2 if name in LABELLED else None
    m = metrics.get(name, **opts)
    assert torch.autograd.gradcheck(lambda a, b: m(a, b, y), (s, t), fast_mode=True)


# ------------------------------------------------------------------------------ degenerate batches
def _degenerate_cases():
    g = torch.Generator().manual_seed(17)
    base = torch.randn(10, 6, generator=g, dtype=torch.float64)
    other = torch.randn(10, 6, generator=g, dtype=torch.float64) + 1
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 2])  # class 2 has one sample
    dead_s, dead_t = base.clone(), other.clone()
    dead_s[:, 2] = 3.0  # a constant (dead) channel, on both sides
    dead_t[:, 2] = 0.0
    wide_s = torch.randn(4, 40, generator=g, dtype=torch.float64)
    wide_t = torch.randn(4, 40, generator=g, dtype=torch.float64)
    return {
        "one_sample_class": (base, other, y),
        "dead_channel": (dead_s, dead_t, y),
        "n_below_d": (wide_s, wide_t, torch.tensor([0, 0, 1, 1])),
        "n_is_1": (base[:1], other[:1], torch.tensor([0])),
        "identical_points": (base[:1].repeat(5, 1), base[:1].repeat(5, 1), torch.zeros(5, dtype=torch.long)),
        "scale_1e-6": (base * 1e-6, other * 1e-6, y),
        "scale_1e6": (base * 1e6, other * 1e6, y),
    }


DEGENERATE = _degenerate_cases()


@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_value_and_gradient_on_degenerate_batches(name, case, dtype):
    s, t, y = DEGENERATE[case]
    s = s.to(dtype).clone().requires_grad_()  # clone: never mark the shared fixtures as leaves
    t = t.to(dtype).clone().requires_grad_()
    val = _call(name, s, t, y)
    assert val.dtype == dtype and val.dim() == 0
    assert torch.isfinite(val)
    val.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


def test_scale_awareness_of_the_ridge():
    """Scaling features by a scales every Gaussian/linear metric by a² and leaves KL unchanged."""
    s, t, y = DEGENERATE["dead_channel"]
    for name in ("gauss_w2", "gauss_cw2", "mmd_linear"):
        assert float(_call(name, 1e3 * s, 1e3 * t, y)) == pytest.approx(1e6 * float(_call(name, s, t, y)), rel=1e-8)
    for name in ("gauss_kl", "gauss_ckl", "mmd_rbf", "cmmd_rbf"):
        assert float(_call(name, 1e3 * s, 1e3 * t, y)) == pytest.approx(float(_call(name, s, t, y)), rel=1e-7)


@pytest.mark.parametrize("diagonal", [False, True])
def test_kl_dead_channel_matches_the_ridged_oracle(diagonal):
    """The reference code took log of an unfloored std here; with the ridge it is finite, and it
    is the closed form at the ridged covariances (the dead channel contributes ~ (3-0)²/(2r))."""
    s, t, y = DEGENERATE["dead_channel"]
    rho = linalg.DEFAULT_RIDGE
    v = float(gaussian.gauss_kl(s, t, diagonal=diagonal))
    assert v == pytest.approx(np_gauss("kl", s.numpy(), t.numpy(), rho, diagonal), rel=1e-8)
    v = float(gaussian.gauss_ckl(s, t, y, diagonal=diagonal))
    assert v == pytest.approx(np_class_gauss("kl", s.numpy(), t.numpy(), y.numpy(), rho, diagonal), rel=1e-8)


@pytest.mark.parametrize("name", GAUSS)
@pytest.mark.parametrize("case", ["dead_channel", "one_sample_class"])
def test_ridge_zero_singular_is_the_same_clear_error_full_and_diagonal(name, case):
    """ridge=0 on a singular covariance: the diagonal route returned NaN/inf where the full one
    raised; both now raise the same ValueError."""
    s, t, y = DEGENERATE[case]
    if case == "one_sample_class" and name not in LABELLED:
        s, t = s[:1].repeat(3, 1) + 0 * s[:3], t[:3]   # a one-point student: every variance 0
    messages = []
    for diagonal in (False, True):
        with pytest.raises(ValueError, match="singular.*ridge > 0") as err:
            _call(name, s, t, y, diagonal=diagonal, ridge=0.0)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("name", GAUSS)
@pytest.mark.parametrize("diagonal", [False, True])
def test_ridge_scale_tau_is_detached_in_the_gradient(name, diagonal):
    """The gradient is that of the metric at a fixed ridge r = ρ·τ (τ detached, module doc).

    On raw (non-standardised) data, compare autograd with central finite differences of the
    metric with r frozen at its value on the unperturbed data: equal only if τ is detached
    (with ρ = 0.3, τ's own derivative would add a term of the same order)."""
    s, t = _pair(7, 7, 3, seed=21)
    s = s * 2.5 + 1.0
    y = torch.arange(7) % 2 if name in LABELLED else None
    rho = 0.3
    r_fixed = linalg.ridge_scale(s, t, rho)
    import unittest.mock as mock
    frozen = lambda student, teacher, ridge: r_fixed  # noqa: E731
    with mock.patch.object(gaussian, "ridge_scale", frozen):
        def f(a):
            return float(_call(name, a, t, y, diagonal=diagonal, ridge=rho))
        h = 1e-6
        fd = torch.zeros_like(s)
        for idx in np.ndindex(*s.shape):
            e = torch.zeros_like(s)
            e[idx] = h
            fd[idx] = (f(s + e) - f(s - e)) / (2 * h)
    a = s.clone().requires_grad_()
    _call(name, a, t, y, diagonal=diagonal, ridge=rho).backward()
    assert torch.allclose(a.grad, fd, rtol=1e-6, atol=1e-8 * float(fd.abs().max()))


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("name", ALL)
def test_float32_result_close_to_float64(name):
    s, t = _pair(40, 40, 8, seed=18)
    y = torch.arange(40) % 3
    ref = _call(name, s, t, y)
    s32, t32 = s.float().requires_grad_(), t.float()
    got = _call(name, s32, t32, y)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(ref), rel=2e-5, abs=1e-6)
    got.backward()
    s64 = s.clone().requires_grad_()
    _call(name, s64, t, y).backward()
    assert s32.grad.dtype == torch.float32
    assert torch.allclose(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-5 * s64.grad.abs().max())


def test_registry_exposes_options():
    for name in GAUSS:
        assert set(metrics.spec(name).options) == {"diagonal", "ridge"}
    assert set(metrics.spec("mmd_rbf").options) == {"bandwidth", "multipliers", "unbiased"}
    assert metrics.spec("mmd_linear").options == ()
    assert metrics.spec("gauss_cw2").needs_labels and not metrics.spec("gauss_w2").needs_labels
