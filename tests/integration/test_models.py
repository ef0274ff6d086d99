"""kd2m.models: the fc/feature_dim contract, sizes, inputs of any shape, safe weight loading,
and a quick check that the digits teacher learns and beats the student."""
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from kd2m.data import build_dataset
from kd2m.models import available_models, build_model, load_pretrained

ALL = ["cifar_resnet18", "cifar_resnet34", "digits_cnn", "digits_mlp", "resnet18", "resnet34"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: Registered elsewhere, tested in test_zoo.py (RepDistiller's CIFAR zoo) and test_mnist1d.py.
ZOO = ["MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet110", "resnet20", "resnet32", "resnet32x4", "resnet56",
       "resnet8", "resnet8x4", "vgg13", "vgg8", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
MNIST1D = ["mnist1d_cnn", "mnist1d_mlp"]


def test_available_and_unknown():
    assert available_models() == sorted(ALL + ZOO + MNIST1D)
    with pytest.raises(ValueError, match="available: MobileNetV2, ShuffleV1, ShuffleV2, cifar_resnet18, cifar_resnet34, digits_cnn"):
        build_model("vgg16", 10)
    with pytest.raises(ValueError, match="num_classes must be ≥ 1"):
        build_model("digits_mlp", 0)


@pytest.mark.parametrize("name", ALL)
def test_contract_fc_last_and_features(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    assert list(model.modules())[-1] is model.fc and list(model.named_children())[-1][0] == "fc"
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == model.feature_dim
    assert model.fc.out_features == 7 and isinstance(model.feature_dim, int)
    seen = []
    handle = model.fc.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert tuple(logits.shape) == (2, 7) and seen == [(2, model.feature_dim)]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("in_channels, image_size", [(1, 8), (2, 13)])
def test_any_channels_and_size(name, in_channels, image_size):
    model = build_model(name, num_classes=4, in_channels=in_channels, image_size=image_size)
    logits = model(torch.randn(2, in_channels, image_size, image_size))  # train mode: BN sees a batch of 2
    assert tuple(logits.shape) == (2, 4)
    logits.sum().backward()


def test_parameter_counts():
    counts = {name: n_params(build_model(name, 10)) for name in ("cifar_resnet18", "cifar_resnet34", "resnet18")}
    assert counts["cifar_resnet18"] == pytest.approx(11.17e6, rel=0.01)
    assert counts["cifar_resnet34"] == pytest.approx(21.28e6, rel=0.01)
    assert counts["resnet18"] == pytest.approx(11.18e6, rel=0.01)
    teacher, student = build_model("digits_cnn", 10, 1, 8), build_model("digits_mlp", 10, 1, 8)
    assert teacher.feature_dim == student.feature_dim == 64, "distribution matching needs no projector"
    assert n_params(student) < n_params(teacher) / 5


def test_resnet_stems():
    assert build_model("resnet18", 10, in_channels=1).conv1.kernel_size == (7, 7)
    cifar = build_model("cifar_resnet18", 10, in_channels=1)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and cifar.conv1.in_channels == 1
    assert isinstance(cifar.maxpool, nn.Identity)


# ---------------------------------------------------------------- load_pretrained
def assert_same_weights(a: nn.Module, b: nn.Module, skip: str = "\0"):
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if not key.startswith(skip):
            assert torch.equal(x, y), key


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd, "epoch": 3},
                                  lambda sd: {"state_dict": sd},
                                  lambda sd: {f"module.{k}": v for k, v in sd.items()}])
def test_load_pretrained_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    source = build_model("digits_cnn", 10, 1, 8)
    source.train()(torch.randn(8, 1, 8, 8))  # move the BN running stats away from their init
    torch.save(wrap(source.state_dict()), tmp_path / "w.pt")
    torch.manual_seed(1)
    target = build_model("digits_cnn", 10, 1, 8)
    assert load_pretrained(target, tmp_path / "w.pt") is target
    assert_same_weights(source, target)


def test_load_pretrained_new_head(tmp_path):
    source = build_model("cifar_resnet18", 100)
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    target = build_model("cifar_resnet18", 10)
    fresh_head = target.fc.weight.clone()
    load_pretrained(target, tmp_path / "backbone.pt", ignore=("fc.",))
    assert_same_weights(source, target, skip="fc.")
    assert torch.equal(target.fc.weight, fresh_head)


def test_load_pretrained_wrong_architecture(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(build_model("digits_mlp", 10, 1, 8).state_dict(), path)
    with pytest.raises(ValueError, match="weights do not fit DigitsCNN") as info:
        load_pretrained(build_model("digits_cnn", 10, 1, 8), path)
    message = str(info.value)
    assert str(path) in message and "missing: features.0.weight" in message and "(+11 more)" in message
    assert "shape mismatch (file vs model): features.1.weight (16, 64) vs (16,)" in message
    with pytest.raises(ValueError, match=r"shape mismatch \(file vs model\): fc.bias \(10,\) vs \(3,\)"):
        load_pretrained(build_model("digits_mlp", 3, 1, 8), path)


def test_load_pretrained_refuses_bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable PyTorch weights file") as info:
        load_pretrained(build_model("digits_mlp", 10, 1, 8), corrupt)
    assert str(corrupt) in str(info.value)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('code ran')",)

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(ValueError, match="evil.pt"):
        load_pretrained(build_model("digits_mlp", 10, 1, 8), evil)
    assert not marker.exists(), "loading weights must never execute code from the file"

    torch.save({"lr": 0.1}, tmp_path / "notweights.pt")
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_pretrained(build_model("digits_mlp", 10, 1, 8), tmp_path / "notweights.pt")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_pretrained(build_model("digits_mlp", 10, 1, 8), tmp_path / "nothere.pt")


# ---------------------------------------------------------------- the digits pair learns
def train_and_test(name: str, epochs: int, seed: int = 0) -> float:
    """Plain SGD + cosine (the engine's digits settings), then test accuracy."""
    torch.manual_seed(seed)
    data = build_dataset("digits")
    model = build_model(name, data.num_classes, data.in_channels, data.image_size)
    loader = DataLoader(data.train, batch_size=128, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader), eta_min=1e-4)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return (model(data.test.images).argmax(1) == data.test.labels).float().mean().item()


def test_digits_teacher_learns_and_beats_student():
    teacher, student = train_and_test("digits_cnn", epochs=6), train_and_test("digits_mlp", epochs=6)
    assert teacher > 0.9
    assert student > 0.8
    assert teacher > student


def test_imagenet_style_head_is_replaced_only_when_its_shape_differs(tmp_path):
    """A 1000-class checkpoint loads its backbone under a fresh 10-class head (the paper's
    ImageNet setting); a same-task checkpoint loads whole, head included."""
    import torch

    from kd2m.models import build_model, load_pretrained
    src = build_model("digits_mlp", 1000, 1, 8)
    path = tmp_path / "imagenet_like.pt"
    torch.save(src.state_dict(), path)
    dst = build_model("digits_mlp", 10, 1, 8)
    head_before = dst.fc.weight.clone()
    load_pretrained(dst, path, new_head="fc.")
    body = [k for k in src.state_dict() if not k.startswith("fc.")]
    assert all(torch.equal(src.state_dict()[k], dst.state_dict()[k]) for k in body)
    assert torch.equal(dst.fc.weight, head_before)
    same = build_model("digits_mlp", 10, 1, 8)
    torch.save(same.state_dict(), tmp_path / "same.pt")
    fresh = build_model("digits_mlp", 10, 1, 8)
    load_pretrained(fresh, tmp_path / "same.pt", new_head="fc.")
    assert torch.equal(fresh.fc.weight, same.fc.weight)
