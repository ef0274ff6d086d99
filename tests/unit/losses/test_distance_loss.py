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


# --- layouts: tokens, channels-first sequences, tuple/dict outputs ---

def _tiny_vit(**kw):
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=32,
                             num_classes=5, **kw)


def test_feature_tap_on_vit_block_pools_tokens_not_channels():
    # regression: a transformer block's (n, L, d) output was averaged over d, giving (n, 17)
    net = _tiny_vit().eval()
    x = torch.randn(3, 3, 16, 16)
    tokens = {}
    net.encoder.layers.encoder_layer_1.register_forward_hook(lambda m, i, o: tokens.setdefault("t", o))
    with FeatureTap(net, ["encoder.layers.encoder_layer_1"]) as tap:
        net(x)
        feats = tap.feature
    assert tokens["t"].shape == (3, 17, 64)
    assert feats.shape == (3, 64)
    assert torch.allclose(feats, tokens["t"].mean(1))
    with FeatureTap(net, "encoder.layers.encoder_layer_1", pool="cls") as tap:
        net(x)
        assert torch.allclose(tap.feature, tokens["t"][:, 0])
    with FeatureTap(net, "encoder.layers.encoder_layer_1", pool="none") as tap:
        net(x)
        assert torch.equal(tap.feature, tokens["t"])
    assert tap.layouts == {"encoder.layers.encoder_layer_1": "tokens"}


def test_feature_tap_penultimate_of_vit_is_class_token_before_head():
    net = _tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    with FeatureTap(net) as tap:
        logits = net(x)
        assert tap.feature.shape == (2, 64)
        assert torch.allclose(net.heads.head(tap.feature), logits, atol=1e-6)


class Seq1d(nn.Module):
    """An MNIST-1D style CNN: Conv1d blocks, channels-first (n, c, L) outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv1d(8, 6, 3, padding=1), nn.ReLU())
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.bn(self.block(torch.relu(self.conv1(x)))).mean(-1))


def test_feature_tap_channels_first_sequences_pool_over_length():
    net = Seq1d().eval()
    x = torch.randn(4, 1, 20)
    with FeatureTap(net, ["conv1", "block", "bn"]) as tap:
        net(x)
    assert tap.layouts == {"conv1": "channels_first", "block": "channels_first", "bn": "channels_first"}
    assert torch.allclose(tap.features["conv1"], net.conv1(x).mean(-1))
    assert tap.features["block"].shape == (4, 6) and tap.features["bn"].shape == (4, 6)
    with FeatureTap(net, "conv1", pool="none") as tap:
        net(x)
    assert torch.equal(tap.feature, net.conv1(x).transpose(1, 2))  # positions as tokens (n, L, c)
    # the override: read the same output as tokens
    with FeatureTap(net, "conv1", layout="tokens") as tap:
        net(x)
    assert torch.allclose(tap.feature, net.conv1(x).mean(1))


class HFStyle(nn.Module):
    """Blocks returning a (hidden_states, attentions) tuple and a dict with last_hidden_state."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = self.tuple_block(x)[0]
        out = self.dict_block(h)
        return self.fc(out["last_hidden_state"].mean(1))


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x):
        return self.lin(x), torch.ones(x.shape[0], 2, 5, 5)


class _DictBlock(nn.Module):
    def forward(self, h):
        return {"attentions": torch.ones(1), "last_hidden_state": 2 * h}


def test_feature_tap_reads_tuple_and_dict_outputs():
    net = HFStyle()
    net.tuple_block, net.dict_block = _TupleBlock(), _DictBlock()
    x = torch.randn(3, 5, 4)
    with FeatureTap(net, ["tuple_block", "dict_block"]) as tap:
        net(x)
    h = net.tuple_block.lin(x)
    assert torch.allclose(tap.features["tuple_block"], h.mean(1))
    assert torch.allclose(tap.features["dict_block"], 2 * h.mean(1))


def test_feature_tap_rejects_unknown_pool_and_layout():
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        FeatureTap(Tiny(), "conv", pool="max")
    with pytest.raises(ValueError, match="unknown layout 'nlc'"):
        FeatureTap(Tiny(), "conv", layout="nlc")


@pytest.mark.parametrize("name, size, expected, shape", [
    ("cifar_resnet18", 32, "layer4", (512, 4, 4)),
    ("resnet18", 32, "layer3", (256, 2, 2)),   # ImageNet stem: layer4 is 1×1 at 32×32
    ("resnet18", 64, "layer4", (512, 2, 2)),
    ("digits_cnn", 8, "features.10", (32, 4, 4)),  # the (identity) pool right before the flatten
])
def test_last_map_layer(name, size, expected, shape):
    from kd2m.features import last_map_layer
    from kd2m.models import build_model
    cin = 1 if name.startswith("digits") else 3
    net = build_model(name, num_classes=4, in_channels=cin, image_size=size).train()
    x = torch.randn(2, cin, size, size)
    assert last_map_layer(net, x) == expected
    assert net.training  # mode restored
    with FeatureTap(net, expected, pool="none") as tap:
        net(x)
    assert tap.feature.shape == (2, *shape)


def test_last_map_layer_refuses_an_mlp():
    from kd2m.features import last_map_layer
    from kd2m.models import build_model
    net = build_model("digits_mlp", num_classes=4, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="DigitsMLP has no 4-D feature map .*name a layer"):
        last_map_layer(net, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("pool", ["avg", "none"])
def test_a_tapped_layer_keeps_its_own_output_when_an_inplace_relu_follows(pool):
    """Regression: the digits CNN's `features.12` (a Linear) is followed by ReLU(inplace=True), which
    rewrote the recorded tensor, so the tap of the Linear returned its post-ReLU values (half of
    them clipped to 0) and the gradient of a loss on it was that of the ReLU'd values."""
    from kd2m.models import build_model
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1, 8).eval()
    x = torch.randn(16, 1, 8, 8)
    linear = net.features[12]
    captured = {}
    handle = linear.register_forward_hook(lambda m, i, o: captured.setdefault("pre_relu", o.detach().clone()))
    with FeatureTap(net, ["features.12", "features.7"], pool=pool) as tap:
        logits = net(x)
    handle.remove()
    assert (captured["pre_relu"] < 0).any()  # the Linear's own output has negative values
    torch.testing.assert_close(tap.features["features.12"], captured["pre_relu"])
    ref = net(x)  # the network's own result is unchanged by the tap
    torch.testing.assert_close(logits, ref)
    conv = tap.features["features.7"]  # a conv map followed by BatchNorm (not in place): as it was
    assert conv.shape[0] == 16
