"""Every registered metric at the edges: mismatched dims, bad labels, non-finite features, a batch of one,
a one-sample class, a constant channel, and the pairwise-memory model."""
import pytest
import torch

from kd2m import metrics
from kd2m.losses.distance_loss import KD2MLoss
from kd2m.metrics.memory import pairwise_bytes

ALL = metrics.available()


CLASS_CONDITIONAL = [m for m in ALL if metrics.spec(m).needs_labels]


SAME_DIM = [m for m in ALL if metrics.spec(m).same_dim]


def _finite_value_and_grad(name, s, t, y, **opts):
    s = s.clone().requires_grad_(True)
    sl = torch.randn(s.shape[0], 3, requires_grad=True)
    value = metrics.get(name, **opts)(s, t, y, sl, torch.randn(t.shape[0], 3))
    value.backward()
    assert torch.isfinite(value), (name, opts, float(value))
    assert torch.isfinite(s.grad).all(), (name, opts)
    assert sl.grad is None or torch.isfinite(sl.grad).all()
    return value


def _variants(name):
    out = [{}]
    if name in ("mmd_rbf", "cmmd_rbf"):
        out.append({"unbiased": True})
    if name in ("gauss_w2", "gauss_cw2", "gauss_kl", "gauss_ckl"):
        out.append({"diagonal": True})
    if name == "jw2":
        out += [{"label_cost": "kl"}, {"label_cost": "sqeuclidean"}]
    return out


def test_pairwise_model_covers_every_quadratic_metric():
    quadratic = ["w2", "cw2", "jw2", "gw2", "sinkhorn", "mmd_rbf", "cmmd_rbf"]
    assert all(pairwise_bytes(m, 1024) >= 16 * 1024 * 1024 for m in quadratic)  # ≥ two float64 n×n
    assert all(pairwise_bytes(m, 4096) == 16 * pairwise_bytes(m, 1024) for m in quadratic)
    assert all(pairwise_bytes(m, 4096) == 0 for m in ("sliced_w2", "gauss_w2", "gauss_kl", "mmd_linear"))


@pytest.mark.parametrize("name", SAME_DIM)
def test_feature_dim_mismatch_names_both_dims(name):
    s, t, y = torch.randn(6, 3), torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"student d=3, teacher d=5"):
        metrics.get(name)(s, t, y, torch.randn(6, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"student d=3, teacher d=5.*student_dim"):
        KD2MLoss(name)(s, t, y, torch.randn(6, 4), torch.randn(6, 4))


def test_feature_dim_mismatch_with_projector_or_gw2_works():
    s, t, y = torch.randn(6, 3), torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.isfinite(KD2MLoss("cw2", student_dim=3, teacher_dim=5)(s, t, y))
    assert torch.isfinite(metrics.get("gw2")(s, t))


@pytest.mark.parametrize("name", CLASS_CONDITIONAL + ["jw2"])
def test_labels_of_wrong_length_or_dtype(name):
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="labels has length 5 but student has n=6"):
        metrics.get(name)(s, t, torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(TypeError, match="labels must be an integer tensor, got torch.float32"):
        metrics.get(name)(s, t, torch.tensor([0.0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="labels must be a 1-D tensor"):
        metrics.get(name)(s, t, torch.zeros(6, 1, dtype=torch.long))


@pytest.mark.parametrize("name", CLASS_CONDITIONAL)
def test_class_conditional_metric_without_labels(name):
    with pytest.raises(ValueError, match="needs labels"):
        metrics.get(name)(torch.randn(6, 3), torch.randn(6, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_features_are_refused(name, bad):
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for side in (0, 1):
        feats = [torch.randn(6, 3), torch.randn(6, 3)]
        feats[side][2, 1] = bad
        with pytest.raises(ValueError, match=r"(student|teacher)_feats contains 1 NaN/inf value"):
            metrics.get(name)(feats[0], feats[1], y, torch.randn(6, 4), torch.randn(6, 4))


@pytest.mark.parametrize("name", ALL)
def test_batch_of_one_is_finite_or_a_clear_error(name):
    for opts in _variants(name):
        s, t, y = torch.randn(1, 4), torch.randn(1, 4), torch.tensor([3])
        if name == "mmd_rbf" and opts.get("unbiased"):  # the U-statistic is undefined for n = 1: said so
            with pytest.raises(ValueError, match="unbiased=True needs at least 2 samples per side"):
                metrics.get(name, **opts)(s, t, y)
            continue
        _finite_value_and_grad(name, s, t, y, **opts)


@pytest.mark.parametrize("name", ALL)
def test_a_class_with_one_sample_gives_a_finite_loss(name):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # class 2 has a single sample
    for opts in _variants(name):
        _finite_value_and_grad(name, s, t, y, **opts)


@pytest.mark.parametrize("name", ALL)
def test_constant_feature_channel_is_finite(name):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    s[:, 2] = 0.7   # a dead student channel
    t[:, 2] = 0.0   # and a dead teacher channel (KL divides by its variance)
    t[:, 4] = -3.0
    y = torch.arange(12) % 3
    for opts in _variants(name):
        _finite_value_and_grad(name, s, t, y, **opts)


def test_gaussian_kl_of_identical_batches_with_a_dead_channel_is_zero():
    x = torch.randn(20, 4)
    x[:, 1] = 5.0
    for opts in ({}, {"diagonal": True}):
        assert abs(float(metrics.get("gauss_kl", **opts)(x, x.clone()))) < 1e-6
