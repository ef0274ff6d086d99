"""Models carry their stages (kd2m.models.stages): the module whose output is each feature map that
RepDistiller's ``forward(x, is_feat=True, preact=False)`` returns, checked against the authors'
list written out here, and VGG's ReLU modules that leave its state_dict and logits unchanged."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd2m.features import FeatureTap, last_map_layer
from kd2m.models import Stage, available_models, build_model, stages

# RepDistiller models/*.py forward(is_feat=True, preact=False): feat[0..-2] (the maps; feat[-1] is
# the pooled vector), (C, H, W) on a 32×32 input, and whether each is post-ReLU.
# resnet.py L178-202, wrn.py L103-124, vgg.py L64-100, mobilenetv2.py L132-160,
# ShuffleNetv1.py L95-115, ShuffleNetv2.py L140-161 (HobbitLong/RepDistiller b84f547).
R, P = True, False  # post-ReLU, pre-activation
AUTHORS_FEATS = {
    "resnet8x4": [((32, 32, 32), R), ((64, 32, 32), R), ((128, 16, 16), R), ((256, 8, 8), R)],
    "resnet32x4": [((32, 32, 32), R), ((64, 32, 32), R), ((128, 16, 16), R), ((256, 8, 8), R)],
    "resnet20": [((16, 32, 32), R), ((16, 32, 32), R), ((32, 16, 16), R), ((64, 8, 8), R)],
    "resnet56": [((16, 32, 32), R), ((16, 32, 32), R), ((32, 16, 16), R), ((64, 8, 8), R)],
    "wrn_16_2": [((16, 32, 32), P), ((32, 32, 32), P), ((64, 16, 16), P), ((128, 8, 8), P)],
    "wrn_40_2": [((16, 32, 32), P), ((32, 32, 32), P), ((64, 16, 16), P), ((128, 8, 8), P)],
    "wrn_40_1": [((16, 32, 32), P), ((16, 32, 32), P), ((32, 16, 16), P), ((64, 8, 8), P)],
    "vgg8": [((64, 32, 32), R), ((128, 16, 16), R), ((256, 8, 8), R), ((512, 4, 4), R), ((512, 4, 4), R)],
    "vgg13": [((64, 32, 32), R), ((128, 16, 16), R), ((256, 8, 8), R), ((512, 4, 4), R), ((512, 4, 4), R)],
    "MobileNetV2": [((16, 16, 16), R), ((12, 16, 16), P), ((16, 8, 8), P), ((48, 4, 4), P), ((160, 2, 2), P)],
    "ShuffleV1": [((24, 32, 32), R), ((240, 16, 16), R), ((480, 8, 8), R), ((960, 4, 4), R)],
    "ShuffleV2": [((24, 32, 32), R), ((116, 16, 16), R), ((232, 8, 8), R), ((464, 4, 4), R)],
}
# which module gives each of them here
MODULES = {
    "resnet8x4": ["relu", "layer1", "layer2", "layer3"],
    "wrn_16_2": ["conv1", "block1", "block2", "block3"],
    "vgg8": ["relu0", "relu1", "relu2", "relu3", "relu4"],
    "MobileNetV2": ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"],
    "ShuffleV1": ["relu", "layer1", "layer2", "layer3"],
    "resnet18": ["relu", "layer1", "layer2", "layer3", "layer4"],
    "digits_cnn": ["features.2", "features.5", "features.9"],
    "mnist1d_cnn": ["features.1", "features.3", "features.5"],
    "digits_mlp": [], "mnist1d_mlp": [],
}


def _input(name, n=4):
    if name.startswith("digits"):
        return torch.randn(n, 1, 8, 8)
    if name.startswith("mnist1d"):
        return torch.randn(n, 1, 40)
    return torch.randn(n, 3, 32, 32)


def _stage_outputs(net, x):
    layers = [s.module for s in stages(net)]
    order = []
    hooks = [net.get_submodule(m).register_forward_hook(lambda mod, i, o, m=m: order.append(m)) for m in layers]
    with FeatureTap(net, layers, pool="none") as tap:
        net(x)
    for h in hooks:
        h.remove()
    return tap.features, order


@pytest.mark.parametrize("pair", [("resnet8x4", "resnet32x4"), ("wrn_16_2", "wrn_40_2"), ("vgg8", "vgg13")])
def test_the_pairs_stages_are_the_authors_feature_list(pair):
    torch.manual_seed(0)
    for name in pair:
        net = build_model(name, 100).train()
        feats, _ = _stage_outputs(net, _input(name))
        got = [tuple(feats[s.module].shape[1:]) for s in stages(net)]
        assert got == [shape for shape, _ in AUTHORS_FEATS[name]], name


@pytest.mark.parametrize("name", sorted(AUTHORS_FEATS))
def test_every_zoo_model_gives_the_authors_maps_with_their_activation(name):
    torch.manual_seed(0)
    net = build_model(name, 100).train()
    feats, _ = _stage_outputs(net, _input(name))
    st = stages(net)
    assert [(tuple(feats[s.module].shape[1:]), s.post_activation) for s in st] == AUTHORS_FEATS[name]
    for s in st:  # post-ReLU maps are non-negative; the authors' pre-activation ones are not
        f = feats[s.module]
        assert (f.min() >= 0) if s.post_activation else (f.min() < 0), (name, s.module)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_stage_module_names(name):
    assert [s.module for s in stages(build_model(name, 10, 1 if name.startswith(("digits", "mnist1d")) else 3,
                                                 8 if name.startswith("digits") else 40 if name.startswith("mnist1d")
                                                 else 32))] == MODULES[name]


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_states_hookable_stages_in_forward_order(name):
    torch.manual_seed(1)
    x = _input(name)
    net = build_model(name, 10, in_channels=x.shape[1], image_size=x.shape[-1]).train()
    st = stages(net)
    assert all(isinstance(s, Stage) for s in st)
    if name.endswith("_mlp"):
        assert st == []
        return
    feats, order = _stage_outputs(net, x)
    assert order == [s.module for s in st]  # each hook fires once, in the listed order
    for s in st:
        f = feats[s.module]
        assert f.shape[1] == s.channels, (name, s.module)
        # reduction = input size / output size, up to the borders of unpadded strided convs (MNIST-1D's 40 → 19)
        assert abs(f.shape[-1] - x.shape[-1] / s.reduction) <= 1, (name, s.module, f.shape)
        if s.post_activation:
            assert f.min() >= 0, (name, s.module)
    reductions = [s.reduction for s in st]
    assert reductions == sorted(reductions)


def test_torchvision_and_timm_models_report_their_stages():
    tv = stages(build_model("resnet18", 10))
    assert [(s.module, s.channels, s.reduction) for s in tv] == [
        ("relu", 64, 2), ("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16), ("layer4", 512, 32)]
    cifar = stages(build_model("cifar_resnet18", 10))
    assert [s.reduction for s in cifar] == [1, 1, 2, 4, 8]
    r50 = stages(build_model("torchvision:resnet50", 10))
    assert [s.channels for s in r50] == [64, 256, 512, 1024, 2048]
    timm_net = build_model("timm:resnet10t", 10)
    assert [(s.module, s.channels, s.reduction, s.post_activation) for s in stages(timm_net)] == [
        (d["module"], d["num_chs"], d["reduction"], None) for d in timm_net.feature_info]
    assert stages(nn.Sequential(nn.Linear(3, 4))) == []  # nothing known: name a layer


# ------------------------------------------------ VGG: ReLU modules, same state_dict, same logits

class AuthorsVGG(nn.Module):
    """The authors' VGG layout (RepDistiller models/vgg.py, batch_norm=True): each block conv-BN-ReLU
    with the block's last ReLU removed, F.relu in the forward, pool3 only for 64×64 inputs."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        cin, blocks = 3, []
        for widths in cfg:
            layers = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            blocks.append(nn.Sequential(*layers[:-1]))
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        h = x.shape[2]
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if h == 64:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


# vgg8 = cfg "S": one conv per block; its full state_dict in the authors' layout
VGG8_KEYS = {f"block{i}.{k}": shape for i, (cin, c) in enumerate([(3, 64), (64, 128), (128, 256), (256, 512),
                                                                   (512, 512)])
             for k, shape in [("0.weight", (c, cin, 3, 3)), ("0.bias", (c,)), ("1.weight", (c,)), ("1.bias", (c,)),
                              ("1.running_mean", (c,)), ("1.running_var", (c,)), ("1.num_batches_tracked", ())]}
VGG8_KEYS |= {"classifier.weight": (100, 512), "classifier.bias": (100,)}


@pytest.mark.parametrize("name,cfg", [("vgg8", [[64], [128], [256], [512], [512]]),
                                      ("vgg13", [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]])])
def test_vgg_relu_modules_keep_the_authors_state_dict_and_logits(name, cfg):
    torch.manual_seed(2)
    old = AuthorsVGG(cfg, 100)
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode logits depend on them
        for m in old.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    state = old.state_dict()
    if name == "vgg8":
        assert {k: tuple(v.shape) for k, v in state.items()} == VGG8_KEYS
    new = build_model(name, 100)
    assert list(new.state_dict()) == list(state)  # same keys, same order
    new.load_state_dict(state, strict=True)
    old.eval(), new.eval()
    for size in (32, 64):
        x = torch.randn(3, 3, size, size)
        assert torch.equal(new(x), old(x))


def test_vgg_default_and_last_stage_maps_are_post_relu():
    net = build_model("vgg8", 100).train()
    x = torch.randn(4, 3, 32, 32)
    assert last_map_layer(net, x) == "relu4" == stages(net)[-1].module
    with FeatureTap(net, ["relu4", "block4"], pool="none") as tap:
        net(x)
    assert tap.features["relu4"].min() >= 0
    assert tap.features["block4"].min() < 0  # the block itself still ends in BN: the authors' preact map
    assert torch.equal(tap.features["relu4"], tap.features["block4"].relu())
