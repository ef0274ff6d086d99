"""KD2MLoss, Hinton KD and FeatureTap: values, gradients, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kd2m
from kd2m import KD2MLoss, hinton_kd, metrics
from kd2m.features import FeatureTap, to_matrix


def _batch(n=24, d=6, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randn(n, d, generator=g, dtype=dtype) + 0.5
    y = torch.arange(n) % c
    return s, t, y


@pytest.mark.parametrize("name", ["w2", "cw2", "gauss_w2", "gauss_kl", "mmd_rbf"])
def test_loss_is_weighted_metric(name):
    s, t, y = _batch()
    loss = KD2MLoss(name, weight=0.3)
    expected = 0.3 * metrics.get(name)(s, t, y)
    assert torch.allclose(loss(s, t, y), expected)
    loss(s, t, y).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_teacher_side_is_detached():
    s, t, y = _batch()
    t = t.clone().requires_grad_(True)
    KD2MLoss("w2")(s, t, y).backward()
    assert t.grad is None


def test_projector_for_mismatched_dims_is_learnable():
    s = torch.randn(32, 5, requires_grad=True)
    t = torch.randn(32, 8)
    y = torch.arange(32) % 4
    loss = KD2MLoss("cw2", weight=1.0, student_dim=5, teacher_dim=8)
    assert isinstance(loss.projector, nn.Linear) and loss.projector.weight.shape == (8, 5)
    opt = torch.optim.SGD(list(loss.parameters()), lr=0.05)
    first = float(loss(s, t, y).detach())
    for _ in range(30):
        opt.zero_grad()
        loss(s, t, y).backward()
        opt.step()
    assert float(loss(s, t, y).detach()) < first  # the projector itself learns to match


def test_mismatched_dims_without_projector_is_a_clear_error():
    with pytest.raises(ValueError, match="student d=5, teacher d=8"):
        KD2MLoss("w2")(torch.randn(4, 5), torch.randn(4, 8))


def test_gw2_needs_no_projector():
    loss = KD2MLoss("gw2", student_dim=5, teacher_dim=8)
    assert loss.projector is None
    assert torch.isfinite(loss(torch.randn(10, 5), torch.randn(10, 8)))


def test_unknown_metric_lists_names():
    with pytest.raises(ValueError, match="available: .*cw2.*w2"):
        KD2MLoss("wasserstein")


def test_hinton_kd_is_kl_teacher_to_student_times_t2():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    T = 3.0
    ps, pt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)
    expected = (pt * (pt.log() - ps.log())).sum(1).mean() * T * T
    assert torch.allclose(hinton_kd(zs, zt, T), expected, atol=1e-6)
    assert float(hinton_kd(zt, zt, T)) == pytest.approx(0.0, abs=1e-7)


def test_loss_under_autocast_runs_metric_in_float32():
    s, t, y = _batch(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = KD2MLoss("gauss_w2")(s.bfloat16(), t.bfloat16(), y)
    assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize("name", ["w2", "mmd_rbf"])
def test_loss_under_autocast_has_the_float32_value(name):
    """Under bf16 autocast the metric still runs in float32: a bf16 GEMM in the OT cost or the
    kernel's distances changes the value (w2 354.173 -> 354.205 was not noticed)."""
    # penultimate-like features: ReLU'd class clusters, the student near its teacher (many
    # near-tied assignments, which a bf16 cost resolves differently: +4 % on w2 here)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(128) % 10
    t = torch.relu(5 * torch.randn(10, 64, generator=g)[y] + 0.3 * torch.randn(128, 64, generator=g))
    s = torch.relu(t + 0.3 * torch.randn(128, 64, generator=g))
    ref = KD2MLoss(name)(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = KD2MLoss(name)(s, t)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), rel=1e-6)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.body(torch.relu(self.conv(x))))


def test_feature_tap_penultimate_is_classifier_input():
    net = Tiny()
    x = torch.randn(2, 1, 5, 5)
    with FeatureTap(net) as tap:
        logits = net(x)
        feats = tap.feature
    assert feats.shape == (2, 6)
    assert torch.allclose(net.fc(feats), logits)
    feats.sum().backward()  # keeps the graph: a loss on tapped features trains the model
    assert net.conv.weight.grad is not None


def test_feature_tap_named_layers_and_pooling():
    net = Tiny()
    x = torch.randn(3, 1, 5, 5)
    tap = FeatureTap(net, ["conv", "body"])
    net(x)
    assert tap.features["conv"].shape == (3, 4)  # (n, c, h, w) -> global average pool
    assert torch.allclose(tap.features["conv"], net.conv(x).mean((2, 3)))
    assert tap.features["body"].shape == (3, 6)
    tap.remove()
    tap.features.clear()
    net(x)
    assert tap.features == {}  # hooks gone
    flat = FeatureTap(net, "conv", pool="flatten")
    net(x)
    assert flat.feature.shape == (3, 4 * 25)


def test_feature_tap_unknown_layer_names_the_layers():
    with pytest.raises(ValueError, match="no layer 'layer9'.*top-level layers: conv, body, fc"):
        FeatureTap(Tiny(), "layer9")


def test_to_matrix_rejects_vectors():
    with pytest.raises(ValueError, match="cannot use an activation of shape"):
        to_matrix(torch.randn(4))


def test_public_api():
    assert kd2m.KD2MLoss is KD2MLoss and kd2m.FeatureTap is FeatureTap
    assert len(kd2m.metrics.available()) >= 13
