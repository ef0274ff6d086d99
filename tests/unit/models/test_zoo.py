"""The CIFAR model zoo of RepDistiller / mdistiller (kd2m.models.cifar_resnet, wrn, vgg, mobilenet,
shufflenet): parameter counts from layer formulas written out here from the authors' architecture
definitions (mdistiller/models/cifar/*.py), their state_dict key names and shapes, the feature
contract, other input channels/sizes, and the ``{"model": state_dict}`` checkpoint round trip."""
import pytest
import torch
from torch import nn

from kd2m.features import FeatureTap, last_linear_name
from kd2m.models import build_model, load_pretrained

from helpers import REPO_ROOT

ZOO = ["resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
       "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
K = 100  # CIFAR-100


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------ parameter counts by layer formulas
def conv(cin, cout, k, groups=1, bias=False):
    return k * k * (cin // groups) * cout + (cout if bias else 0)


def bn(c):
    return 2 * c  # weight + bias (running stats are buffers)


def linear(cin, cout):
    return cin * cout + cout


def resnet_count(depth, widths):
    """ResNet(depth, num_filters, 'basicblock'): n = (depth-2)/6 BasicBlocks per stage."""
    n = (depth - 2) // 6
    total = conv(3, widths[0], 3) + bn(widths[0])
    cin = widths[0]
    for stage, c in enumerate(widths[1:]):
        for i in range(n):
            total += conv(cin, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
            if i == 0 and (stage > 0 or cin != c):  # downsample: 1x1 conv + BN
                total += conv(cin, c, 1) + bn(c)
            cin = c
    return total + linear(widths[3], K)


def wrn_count(depth, k):
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = conv(3, 16, 3)
    cin = 16
    for c in widths[1:]:
        for _ in range(n):
            total += bn(cin) + conv(cin, c, 3) + bn(c) + conv(c, c, 3) + (conv(cin, c, 1) if cin != c else 0)
            cin = c
    return total + bn(widths[3]) + linear(widths[3], K)


def vgg_bn_count(cfg):
    total, cin = 0, 3
    for block in cfg:
        for c in block:
            total += conv(cin, c, 3, bias=True) + bn(c)
            cin = c
    return total + linear(512, K)


def mobile_half_count():
    """mobilenetv2_T_w(T=6, W=0.5): channels int(c*0.5), the pw expansion conv exists even at t=1."""
    total, cin = conv(3, 16, 3) + bn(16), 16
    for t, c, n, _stride in [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1)]:
        c = c // 2
        for _ in range(n):
            h = cin * t
            total += conv(cin, h, 1) + bn(h) + conv(h, h, 3, groups=h) + bn(h) + conv(h, c, 1) + bn(c)
            cin = c
    return total + conv(160, 1280, 1) + bn(1280) + linear(1280, K)


def shuffle_v1_count():
    total, cin, g = conv(3, 24, 1) + bn(24), 24, 3
    for width, blocks in [(240, 4), (480, 8), (960, 4)]:
        for i in range(blocks):
            out = width - cin if i == 0 else width
            mid = out // 4
            total += conv(cin, mid, 1, groups=1 if cin == 24 else g) + bn(mid)
            total += conv(mid, mid, 3, groups=mid) + bn(mid) + conv(mid, out, 1, groups=g) + bn(out)
            cin = width
    return total + linear(960, K)


def shuffle_v2_count():
    total, cin = conv(3, 24, 1) + bn(24), 24
    for width, blocks in [(116, 3), (232, 7), (464, 3)]:
        mid = width // 2  # DownBlock, then `blocks` BasicBlocks on half the channels
        total += conv(cin, cin, 3, groups=cin) + bn(cin) + conv(cin, mid, 1) + bn(mid)
        total += conv(cin, mid, 1) + bn(mid) + conv(mid, mid, 3, groups=mid) + bn(mid) + conv(mid, mid, 1) + bn(mid)
        total += blocks * (2 * (conv(mid, mid, 1) + bn(mid)) + conv(mid, mid, 3, groups=mid) + bn(mid))
        cin = width
    return total + conv(464, 1024, 1) + bn(1024) + linear(1024, K)


THIN, WIDE = [16, 16, 32, 64], [32, 64, 128, 256]
EXPECTED_PARAMS = {
    "resnet8": resnet_count(8, THIN), "resnet20": resnet_count(20, THIN), "resnet32": resnet_count(32, THIN),
    "resnet56": resnet_count(56, THIN), "resnet110": resnet_count(110, THIN),
    "resnet8x4": resnet_count(8, WIDE), "resnet32x4": resnet_count(32, WIDE),
    "wrn_16_2": wrn_count(16, 2), "wrn_40_1": wrn_count(40, 1), "wrn_40_2": wrn_count(40, 2),
    "vgg8": vgg_bn_count([[64], [128], [256], [512], [512]]),
    "vgg13": vgg_bn_count([[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]),
    "MobileNetV2": mobile_half_count(), "ShuffleV1": shuffle_v1_count(), "ShuffleV2": shuffle_v2_count(),
}


def test_formulas_reproduce_the_issue_numbers():
    assert EXPECTED_PARAMS["resnet8x4"] == 1_233_540 and EXPECTED_PARAMS["resnet32x4"] == 7_433_860


@pytest.mark.parametrize("name", ZOO)
def test_parameter_count(name):
    assert n_params(build_model(name, K)) == EXPECTED_PARAMS[name]


# ------------------------------------------------ key names and shapes of the authors' modules
KEYS = {
    "resnet8": {"conv1.weight": (16, 3, 3, 3), "layer1.0.conv1.weight": (16, 16, 3, 3),
                "layer2.0.downsample.0.weight": (32, 16, 1, 1), "layer3.0.downsample.1.running_var": (64,),
                "fc.weight": (K, 64)},
    "resnet56": {"layer1.8.bn2.num_batches_tracked": (), "layer3.8.conv2.weight": (64, 64, 3, 3), "fc.bias": (K,)},
    "resnet110": {"layer2.17.conv1.weight": (32, 32, 3, 3), "fc.weight": (K, 64)},
    "resnet8x4": {"layer1.0.downsample.0.weight": (64, 32, 1, 1), "layer3.0.conv2.weight": (256, 256, 3, 3),
                  "fc.weight": (K, 256)},
    "resnet20": {"layer3.2.bn1.weight": (64,)}, "resnet32": {"layer3.4.bn2.running_mean": (64,)},
    "resnet32x4": {"layer3.4.conv2.weight": (256, 256, 3, 3), "fc.weight": (K, 256)},
    "wrn_40_2": {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
                 "block1.layer.0.bn1.weight": (16,), "block3.layer.5.conv2.weight": (128, 128, 3, 3),
                 "bn1.running_mean": (128,), "fc.weight": (K, 128)},
    "wrn_40_1": {"block2.layer.0.convShortcut.weight": (32, 16, 1, 1), "block3.layer.5.bn2.weight": (64,)},
    "wrn_16_2": {"block3.layer.1.conv1.weight": (128, 128, 3, 3), "fc.bias": (K,)},
    "vgg8": {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.1.running_var": (64,),
             "block4.1.weight": (512,), "classifier.weight": (K, 512)},
    "vgg13": {"block0.3.weight": (64, 64, 3, 3), "block0.4.running_mean": (64,), "block4.4.weight": (512,),
              "classifier.bias": (K,)},
    "MobileNetV2": {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                    "blocks.1.0.conv.3.weight": (48, 1, 3, 3), "blocks.6.0.conv.7.running_var": (160,),
                    "conv2.0.weight": (1280, 160, 1, 1), "conv2.1.weight": (1280,),
                    "classifier.0.weight": (K, 1280)},
    "ShuffleV1": {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
                  "layer1.0.conv3.weight": (216, 18, 1, 1), "layer1.1.conv1.weight": (60, 80, 1, 1),
                  "layer3.3.bn3.running_mean": (960,), "linear.weight": (K, 960)},
    "ShuffleV2": {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.0.conv5.weight": (58, 58, 1, 1),
                  "layer1.3.conv3.weight": (58, 58, 1, 1), "layer2.7.bn2.weight": (116,),
                  "conv2.weight": (1024, 464, 1, 1), "bn2.running_var": (1024,), "linear.weight": (K, 1024)},
}
HEAD = {"vgg8": "classifier", "vgg13": "classifier", "MobileNetV2": "classifier.0", "ShuffleV1": "linear",
        "ShuffleV2": "linear"}


@pytest.mark.parametrize("name", ZOO)
def test_key_names_and_shapes(name):
    state = build_model(name, K).state_dict()
    for key, shape in KEYS[name].items():
        assert key in state, f"{name}: no {key!r}"
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("module.") for k in state)


# ------------------------------------------------ the feature contract, forward shapes
@pytest.mark.parametrize("name", ZOO)
def test_forward_and_feature_dim(name):
    torch.manual_seed(0)
    model = build_model(name, K).eval()
    head = last_linear_name(model)
    assert head == HEAD.get(name, "fc")
    linear_layer = dict(model.named_modules())[head]
    assert isinstance(model.feature_dim, int) and linear_layer.in_features == model.feature_dim
    assert 64 <= model.feature_dim <= 1280
    with FeatureTap(model) as tap, torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
        features = tap.feature
    assert tuple(logits.shape) == (2, K) and tuple(features.shape) == (2, model.feature_dim)
    assert torch.allclose(linear_layer(features), logits, atol=1e-5)


@pytest.mark.parametrize("name", ZOO)
def test_other_channels_and_sizes(name):
    model = build_model(name, 7, in_channels=1, image_size=16)
    assert tuple(model(torch.randn(2, 1, 16, 16)).shape) == (2, 7)  # train mode: BN sees a batch of 2
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    assert set(model.state_dict()) == set(build_model(name, 7).state_dict()), "key names do not depend on the input"


def test_adaptive_pool_equals_the_authors_fixed_pool_at_32():
    """At 32×32 the authors' AvgPool2d(8) (ResNet) sees an 8×8 map: our adaptive pool is the same."""
    torch.manual_seed(0)
    model = build_model("resnet8", K).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        h = model.layer3(model.layer2(model.layer1(h)))
        assert h.shape[-2:] == (8, 8)
        expected = model.fc(nn.AvgPool2d(8)(h).flatten(1))
        assert torch.allclose(model(x), expected, atol=1e-6)


# ------------------------------------------------ checkpoints in the authors' {"model": sd} form
@pytest.mark.parametrize("name", ZOO)
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    source = build_model(name, K)
    source.train()(torch.randn(4, 3, 32, 32))  # move BN running stats away from their init
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": source.state_dict(), "epoch": 240}, path)  # the released teachers' layout
    torch.manual_seed(1)
    target = build_model(name, K)
    assert load_pretrained(target, path) is target
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name", ["MobileNetV2", "ShuffleV1", "vgg8", "resnet8"])
def test_new_head_true_finds_the_classifier(tmp_path, name):
    """new_head=True: a 1000-class checkpoint loads its backbone under the model's fresh classifier,
    whatever the classifier is called; a same-task checkpoint loads whole."""
    torch.manual_seed(0)
    source = build_model(name, 1000)
    torch.save({"model": source.state_dict()}, tmp_path / "wide.pth")
    target = build_model(name, 10)
    head = last_linear_name(target) + "."
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(head)}
    load_pretrained(target, tmp_path / "wide.pth", new_head=True)
    wide = source.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value, fresh[key] if key.startswith(head) else wide[key]), key
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(build_model(name, 10), tmp_path / "wide.pth")
    same = build_model(name, 10)
    torch.save({"model": same.state_dict()}, tmp_path / "same.pth")
    whole = load_pretrained(build_model(name, 10), tmp_path / "same.pth", new_head=True)
    same_state = same.state_dict()
    assert all(torch.equal(v, same_state[k]) for k, v in whole.state_dict().items())


# ------------------------------------------------ configs/crd and configs/imagenet
CONFIGS = REPO_ROOT / "configs"
CRD_PAIRS = [("resnet32x4", "resnet8x4"), ("resnet56", "resnet20"), ("resnet110", "resnet32"),
             ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV2"),
             ("resnet32x4", "ShuffleV1"), ("vgg13", "MobileNetV2"), ("wrn_40_2", "ShuffleV1")]


def test_crd_configs_follow_the_protocol():
    from kd2m.harness.config import load_yaml
    files = sorted((CONFIGS / "crd").glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(f"{t}_{s}" for t, s in CRD_PAIRS)
    for teacher, student in CRD_PAIRS:
        c = load_yaml(CONFIGS / "crd" / f"{teacher}_{student}.yaml").resolved()
        assert (c.dataset, c.teacher, c.student) == ("cifar100", teacher, student)
        assert (c.epochs, c.teacher_epochs, c.batch_size, c.momentum, c.weight_decay) == (240, 240, 64, 0.9, 5e-4)
        assert (c.lr_schedule, c.lr_milestones, c.lr_gamma) == ("multistep", [150, 180, 210], 0.1)
        assert c.lr == (0.01 if student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)


def test_imagenet_config_is_the_torchvision_recipe():
    from kd2m.harness.config import load_yaml
    c = load_yaml(CONFIGS / "imagenet" / "resnet34_resnet18.yaml")
    c.pretrained_teacher = "resnet34.pth"  # the config expects the released teacher on the command line
    c = c.resolved()
    assert (c.dataset, c.teacher, c.student, c.epochs, c.batch_size, c.lr) == ("imagefolder", "resnet34", "resnet18",
                                                                                 90, 256, 0.1)
    assert (c.lr_schedule, c.lr_milestones, c.lr_gamma, c.weight_decay) == ("multistep", [30, 60], 0.1, 1e-4)


# ------------------------------------------------ kd2m.harness.published
def test_published_numbers_cover_the_crd_pairs():
    from kd2m.harness.published import CIFAR100, METHODS, missing
    assert sorted(CIFAR100) == sorted(CRD_PAIRS)
    for pair, numbers in CIFAR100.items():
        assert {"teacher", "student", "kd", "crd", "dkd"} <= set(numbers) <= set(METHODS), pair
        assert all(0 < n.accuracy < 100 and n.source for n in numbers.values())
        assert numbers["teacher"].accuracy > numbers["student"].accuracy, pair
        assert set(missing()[pair]) == set(METHODS) - set(numbers)
    # spot checks against the READMEs (RepDistiller table 1, mdistiller DKD table, DIST_KD table)
    assert CIFAR100[("resnet32x4", "resnet8x4")]["crd"].accuracy == 75.51
    assert CIFAR100[("wrn_40_2", "ShuffleV1")]["dkd"].accuracy == 76.70
    dist = CIFAR100[("resnet56", "resnet20")]["dist"]
    assert (dist.accuracy, dist.std) == (71.75, 0.30)
