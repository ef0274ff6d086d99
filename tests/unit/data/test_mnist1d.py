"""MNIST-1D (kd2m.data.mnist1d, kd2m.models.mnist1d): generated from the package's templates with its
published defaults, never downloaded; deterministic; cached; the paper's ConvBase / MLPBase shapes."""
import random
import socket
import urllib.request

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kd2m.data import build_dataset
from kd2m.data import mnist1d as m1d
from kd2m.features import FeatureTap
from kd2m.models import build_model


def refuse(*args, **kwargs):
    raise AssertionError("MNIST-1D must be generated, never downloaded")


@pytest.fixture(scope="module")
def cached_root(tmp_path_factory):
    """The one generation through kd2m for the whole module (it takes seconds), with every network
    path refused and the global RNGs checked; the other tests read its cache."""
    import mnist1d.data
    import requests
    root = tmp_path_factory.mktemp("mnist1d")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mnist1d.data, "get_dataset", refuse)  # the package's only download path
        mp.setattr(requests, "get", refuse)
        mp.setattr(requests.Session, "request", refuse)
        mp.setattr(urllib.request, "urlopen", refuse)
        mp.setattr(socket.socket, "connect", refuse)
        seed_all = lambda: (random.seed(7), np.random.seed(7), torch.manual_seed(7))  # noqa: E731
        seed_all()
        expected = (random.random(), np.random.rand(), torch.rand(1))
        seed_all()
        build_dataset("mnist1d", data_root=root, download=True)
        assert (random.random(), np.random.rand(), torch.rand(1)) == expected, "building the data moved a global RNG"
    return root


def test_pinned_args_are_the_packages_published_defaults():
    from mnist1d.data import get_dataset_args
    published = get_dataset_args(as_dict=True)
    published.pop("url")
    assert m1d.GENERATION_ARGS == published


def test_items_shapes_and_train_standardisation(cached_root):
    bundle = build_dataset("mnist1d", data_root=cached_root)
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (4000, 1000, 10)
    assert (bundle.in_channels, bundle.image_size, bundle.name) == (1, 40, "mnist1d")
    signal, label = bundle.train[0]
    assert signal.dtype == torch.float32 and tuple(signal.shape) == (1, 40)
    assert isinstance(label, int) and 0 <= label < 10
    x, y = next(iter(DataLoader(bundle.test, batch_size=5)))
    assert tuple(x.shape) == (5, 1, 40) and y.dtype == torch.int64
    train = bundle.train.images.double()
    assert abs(train.mean().item()) < 1e-6 and train.std().item() == pytest.approx(1.0, abs=1e-6)
    assert bundle.test.images.mean().abs().item() < 0.1  # same distribution, train statistics
    counts = torch.bincount(torch.cat([bundle.train.labels, bundle.test.labels]), minlength=10)
    assert counts.tolist() == [500] * 10  # make_dataset: num_samples // 10 per class


def test_deterministic_and_equal_to_the_package(cached_root):
    """kd2m's generation (cached by the fixture) equals an independent call of the package's own
    make_dataset with its published defaults: the same arrays every time, standardised as stated."""
    from mnist1d.data import get_dataset_args, make_dataset
    state = random.getstate(), np.random.get_state()
    reference = make_dataset(get_dataset_args())
    random.setstate(state[0])
    np.random.set_state(state[1])
    ours = m1d.load_arrays(cached_root)
    for key in m1d.ARRAYS:
        assert np.array_equal(ours[key], reference[key]), key
    bundle = build_dataset("mnist1d", data_root=cached_root)
    mean, std = reference["x"].mean(), reference["x"].std(ddof=1)
    expected = (reference["x_test"][:3] - mean) / std
    assert np.allclose(bundle.test.images[:3, 0].numpy(), expected, atol=1e-6)
    assert torch.equal(bundle.test.labels[:3], torch.as_tensor(reference["y_test"][:3]))


def test_cache_round_trip_and_corrupt_cache(tmp_path, cached_root, monkeypatch):
    path = m1d.cache_path(tmp_path)
    assert path.name.startswith(f"mnist1d-v{m1d.FORMAT_VERSION}-n5000-split0.8-len40-seed42-")
    assert path.suffix == ".npz"
    path.write_bytes(m1d.cache_path(cached_root).read_bytes())
    monkeypatch.setattr(m1d, "generate", lambda args=None: pytest.fail("a cache hit must not regenerate"))
    cached = build_dataset("mnist1d", data_root=tmp_path)
    fresh = build_dataset("mnist1d", data_root=cached_root)
    assert torch.equal(cached.train.images, fresh.train.images) and torch.equal(cached.test.labels, fresh.test.labels)

    arrays, calls = m1d.load_arrays(cached_root), []
    monkeypatch.setattr(m1d, "generate", lambda args=None: calls.append(1) or arrays)
    path.write_bytes(b"not an npz file")  # a torn or foreign file is regenerated, not trusted
    again = build_dataset("mnist1d", data_root=tmp_path)
    assert calls == [1] and torch.equal(again.train.images, fresh.train.images)
    assert m1d._read_cache(path, m1d.GENERATION_ARGS) is not None, "the regenerated cache was written back"
    np.savez(path, x=arrays["x"][:10], y=arrays["y"][:10], x_test=arrays["x_test"], y_test=arrays["y_test"])
    assert m1d._read_cache(path, m1d.GENERATION_ARGS) is None, "arrays of the wrong size are not trusted"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary files left behind"


def test_other_arguments_get_another_cache_file(tmp_path):
    assert m1d.cache_path(tmp_path, dict(m1d.GENERATION_ARGS, seed=0)) != m1d.cache_path(tmp_path)
    assert m1d.cache_path(tmp_path, dict(m1d.GENERATION_ARGS, shear_scale=0.5)) != m1d.cache_path(tmp_path)


# ------------------------------------------------ the paper's models
def test_models_shapes_and_features():
    cnn, mlp = build_model("mnist1d_cnn", 10, 1, 40), build_model("mnist1d_mlp", 10, 1, 40)
    # ConvBase: lengths 40 -> 19 -> 10 -> 5 (k5 s2 p1, then k3 s2 p1 twice), 25 channels: linear_in = 125
    assert cnn.feature_dim == 25 * 5 == cnn.fc.in_features and mlp.feature_dim == 100 == mlp.fc.in_features
    assert sum(p.numel() for p in cnn.parameters()) == (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)
    assert sum(p.numel() for p in mlp.parameters()) == (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)
    x = torch.randn(3, 1, 40)
    for model in (cnn, mlp):
        with FeatureTap(model) as tap:
            logits = model(x)
        assert tuple(logits.shape) == (3, 10) and tuple(tap.feature.shape) == (3, model.feature_dim)
    assert build_model("mnist1d_cnn", 4, 2, 64)(torch.randn(2, 2, 64)).shape == (2, 4)


def test_mlp_is_the_authors_residual_mlp():
    """MLPBase.forward: h = relu(linear1(x)); h = h + relu(linear2(h)); linear3(h)."""
    torch.manual_seed(0)
    mlp = build_model("mnist1d_mlp", 10, 1, 40)
    x = torch.randn(4, 1, 40)
    h = torch.relu(x.flatten(1) @ mlp.linear1.weight.T + mlp.linear1.bias)
    h = h + torch.relu(h @ mlp.linear2.weight.T + mlp.linear2.bias)
    assert torch.allclose(mlp(x), h @ mlp.fc.weight.T + mlp.fc.bias, atol=1e-6)
