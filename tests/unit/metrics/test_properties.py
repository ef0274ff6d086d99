"""Property-based tests (hypothesis) of every registered metric.

Inputs are drawn as (n, d, scale, seed, degenerate-mode) and then generated with a seeded torch
generator, so hypothesis shrinks to a small reproducible case. Scales span 1e-6 .. 1e6 (float32),
shapes n ∈ [1, 20], d ∈ [1, 8]; degenerate modes add a dead channel, duplicated rows or a batch
of one repeated point. Properties:

* no NaN/inf, in the value or in the gradient w.r.t. the student's features (and logits);
* non-negativity (up to round-off relative to the features' scale), except the unbiased MMD
  U-statistic, which can legitimately be negative;
* D(x, x) = 0 (up to round-off); the unbiased MMD is excluded (it is an estimator, not 0 there);
* W2 (and the other order-free metrics) do not depend on the order of the samples, with the
  student and the teacher permuted independently.
"""
import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd2m import metrics

ALL = metrics.available()
#: 25 examples per property keep the file at ~10-20 s; KD2M_HYPOTHESIS_EXAMPLES=500 for a deeper search
SETTINGS = settings(max_examples=int(os.environ.get("KD2M_HYPOTHESIS_EXAMPLES", 25)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)
SCALES = st.sampled_from([1e-6, 1.0, 1e6])
MODES = st.sampled_from(["plain", "plain", "dead_channel", "duplicates", "one_point"])
#: metrics whose value is in (feature units)²; gw2 is in (units²)²; the rest (KL, MMD) are scale-free
SQUARED = {"w2", "cw2", "jw2", "gauss_w2", "gauss_cw2", "sinkhorn", "sliced_w2", "mmd_linear"}
QUARTIC = {"gw2"}
#: options under test besides the defaults
VARIANTS = {"mmd_rbf": [{"unbiased": True}], "cmmd_rbf": [{"unbiased": True}],
            "gauss_w2": [{"diagonal": True}], "gauss_kl": [{"diagonal": True}],
            "jw2": [{"label_cost": "kl"}, {"label_cost": "sqeuclidean"}], "sliced_w2": [{"seed": 3}],
            "gw2": [{"normalize": True}]}
CASES = [pytest.param(m, o, id=m + "".join(f"-{k}={v}" for k, v in o.items()))
         for m in ALL for o in [{}] + VARIANTS.get(m, [])]


def _is_unbiased_mmd(name, opts):
    return name in ("mmd_rbf", "cmmd_rbf") and opts.get("unbiased", False)


def make_cloud(g, n, d, scale, mode, shift=0.0):
    x = torch.randn(n, d, generator=g) * (0.5 + torch.rand(d, generator=g)) + shift
    if mode == "dead_channel":
        x[:, 0] = float(torch.randn(1, generator=g))
    elif mode == "duplicates" and n > 1:
        x[n // 2:] = x[: n - n // 2].clone()
    elif mode == "one_point":
        x[:] = x[0].clone()
    return (x * scale).float()


def make_batch(n, d, scale, seed, mode, n_t=None, classes=3):
    g = torch.Generator().manual_seed(seed)
    s = make_cloud(g, n, d, scale, mode)
    t = make_cloud(g, n if n_t is None else n_t, d, scale, mode, shift=1.0)
    y = torch.randint(0, classes, (n,), generator=g)
    sl = torch.randn(n, classes, generator=g) * 3
    tl = torch.randn(t.shape[0], classes, generator=g) * 3
    return s, t, y, sl, tl


def unit(name, s, t, opts=None):
    """The round-off scale of metric ``name`` on these features."""
    m2 = float(s.double().pow(2).sum(1).mean() + t.double().pow(2).sum(1).mean())
    if (opts or {}).get("normalize"):  # gw2 on mean-normalised distances: scale-free
        return 1.0
    if name in SQUARED:
        return m2
    if name in QUARTIC:
        return m2 * m2
    return 1.0


def evaluate(name, opts, s, t, y, sl, tl):
    """Value and gradients (features, logits) of one forward + backward."""
    s = s.clone().requires_grad_(True)
    sl = sl.clone().requires_grad_(True) if sl is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sinkhorn convergence note is not a failure
        value = metrics.get(name, **opts)(s, t, y, sl, tl)
    value.backward()
    return value.detach(), s.grad, sl.grad if sl is not None else None


shapes = dict(n=st.integers(1, 20), d=st.integers(1, 8), scale=SCALES, seed=st.integers(0, 2**31 - 1), mode=MODES)


@pytest.mark.parametrize("name, opts", CASES)
@SETTINGS
@given(**shapes)
def test_finite_value_and_gradient(name, opts, n, d, scale, seed, mode):
    if name == "mmd_rbf" and opts.get("unbiased"):
        n = max(n, 2)  # the U-statistic needs two samples per side (n = 1 is a documented ValueError)
    s, t, y, sl, tl = make_batch(n, d, scale, seed, mode)
    value, gs, gl = evaluate(name, opts, s, t, y, sl, tl)
    assert value.dim() == 0 and torch.isfinite(value), float(value)
    assert gs is not None and torch.isfinite(gs).all()
    assert gl is None or torch.isfinite(gl).all()


@pytest.mark.parametrize("name, opts", [c for c in CASES if not _is_unbiased_mmd(*c.values)])
@SETTINGS
@given(**shapes)
def test_non_negative(name, opts, n, d, scale, seed, mode):
    s, t, y, sl, tl = make_batch(n, d, scale, seed, mode)
    value, _, _ = evaluate(name, opts, s, t, y, sl, tl)
    assert float(value) >= -1e-6 * unit(name, s, t, opts) - 1e-12, float(value)


@pytest.mark.parametrize("name, opts", [c for c in CASES if not _is_unbiased_mmd(*c.values)])
@SETTINGS
@given(**shapes)
def test_zero_on_identical_batches(name, opts, n, d, scale, seed, mode):
    # gw2 included: its second Frank-Wolfe start (i <-> i) reaches 0 even with repeated points
    s, _, y, sl, _ = make_batch(n, d, scale, seed, mode)
    value, _, _ = evaluate(name, opts, s, s.clone(), y, sl, sl.clone())
    assert abs(float(value)) <= 1e-5 * unit(name, s, s, opts) + 1e-9, float(value)


def test_gw2_is_zero_on_identical_batches_with_repeated_points():
    """The product coupling is a stationary point here; the second start (i <-> i) finds 0."""
    x = torch.tensor([[1.4726], [-0.2804], [1.4726], [-0.2804]])
    assert float(metrics.get("gw2")(x, x.clone())) <= 1e-6


ORDER_FREE = ["w2", "sinkhorn", "mmd_linear", "mmd_rbf", "gauss_w2", "gauss_kl"]


@pytest.mark.parametrize("name", ORDER_FREE)
@SETTINGS
@given(n=st.integers(1, 20), n_t=st.integers(1, 20), d=st.integers(1, 8), scale=SCALES,
       seed=st.integers(0, 2**31 - 1), mode=MODES)
def test_invariant_to_permuting_student_and_teacher_independently(name, n, n_t, d, scale, seed, mode):
    s, t, _, _, _ = make_batch(n, d, scale, seed, mode, n_t=n_t)
    g = torch.Generator().manual_seed(seed + 1)
    ps, pt = torch.randperm(n, generator=g), torch.randperm(n_t, generator=g)
    a, _, _ = evaluate(name, {}, s, t, None, None, None)
    b, _, _ = evaluate(name, {}, s[ps], t[pt], None, None, None)
    tol = 1e-4 * abs(float(a)) + 1e-6 * unit(name, s, t) + 1e-9
    assert math.isclose(float(a), float(b), abs_tol=tol), (float(a), float(b))


def test_sliced_w2_with_fixed_directions_is_order_free():
    s, t, _, _, _ = make_batch(11, 4, 1.0, 0, "plain", n_t=7)
    f = metrics.get("sliced_w2", seed=5)
    assert torch.allclose(f(s, t), f(s.flip(0), t[torch.randperm(7)]), rtol=1e-5)


@pytest.mark.parametrize("name", ["w2", "gw2", "sinkhorn", "sliced_w2", "mmd_linear", "mmd_rbf", "gauss_w2",
                                  "gauss_kl"])
@SETTINGS
@given(n=st.integers(1, 20), n_t=st.integers(1, 20), d=st.integers(1, 8), scale=SCALES,
       seed=st.integers(0, 2**31 - 1), mode=MODES)
def test_unequal_batch_sizes_are_finite(name, n, n_t, d, scale, seed, mode):
    s, t, _, _, _ = make_batch(n, d, scale, seed, mode, n_t=n_t)
    value, gs, _ = evaluate(name, {}, s, t, None, None, None)
    assert torch.isfinite(value) and torch.isfinite(gs).all()
    assert float(value) >= -1e-6 * unit(name, s, t) - 1e-12


TRANSLATION_FREE = ["w2", "cw2", "sinkhorn", "mmd_rbf", "cmmd_rbf", "gauss_w2", "gauss_kl", "sliced_w2"]


@pytest.mark.parametrize("name", TRANSLATION_FREE + ["gw2"])
@SETTINGS
@given(**shapes)
def test_invariant_to_a_large_common_offset(name, n, d, scale, seed, mode):
    """Float32 features far from the origin (ReLU features are): distances must not cancel away.

    gw2 compares each cloud's own geometry, so there the teacher alone is moved.
    """
    s, t, y, sl, tl = make_batch(n, d, scale, seed, mode)
    offset = 30.0 * scale * torch.linspace(1.0, 2.0, d)
    opts = {"seed": 0} if name == "sliced_w2" else {}
    a, _, _ = evaluate(name, opts, s, t, y, sl, tl)
    b, _, _ = evaluate(name, opts, s if name == "gw2" else s + offset, t + offset, y, sl, tl)
    tol = 1e-2 * abs(float(a)) + 1e-4 * unit(name, s, t) + 1e-9
    assert math.isclose(float(a), float(b), abs_tol=tol), (float(a), float(b))


@SETTINGS
@given(n=st.integers(2, 20), d=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_normalized_gw2_ignores_a_translation(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = (0.01 * torch.randn(n, d, generator=g) + 100.0).float()
    assert float(metrics.get("gw2", normalize=True)(x, x + 1.0)) <= 1e-3
