"""kd2m.runtime: the device a run asks for against what the machine has, and seeding every RNG."""
import pytest
import torch


def _fake_accelerators(monkeypatch, cuda=0, mps=False, xpu=0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: xpu > 0)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: xpu)


@pytest.mark.parametrize("name, machine, expected", [
    ("auto", {}, "cpu"), (None, {}, "cpu"), ("auto", {"cuda": 1}, "cuda"), ("cpu", {"cuda": 2}, "cpu"),
    ("cuda", {"cuda": 1}, "cuda"), ("cuda:1", {"cuda": 2}, "cuda:1"), ("mps", {"mps": True}, "mps"),
    ("xpu:0", {"xpu": 1}, "xpu:0"),
])
def test_resolve_device_accepts_what_the_machine_has(monkeypatch, name, machine, expected):
    from kd2m.runtime import resolve_device
    _fake_accelerators(monkeypatch, **machine)
    assert resolve_device(name) == torch.device(expected)


@pytest.mark.parametrize("name, machine, needles", [
    ("cuda", {}, ["CUDA is not available", "--device cpu"]),
    ("cuda:2", {"cuda": 2}, ["2 CUDA device(s)", "cuda:0 to cuda:1"]),
    ("mps", {}, ["MPS", "not available"]),
    ("xpu", {}, ["XPU is not available"]),
    ("xpu:1", {"xpu": 1}, ["1 XPU device(s)"]),
    ("meta", {"cuda": 1}, ["'meta'", "valid: auto, cpu, cuda, cuda:N, mps"]),
    ("quantum", {}, ["'quantum'", "valid: auto, cpu, cuda, cuda:N, mps"]),
    ("cuda:x", {"cuda": 1}, ["'cuda:x'", "valid:"]),
])
def test_resolve_device_refuses_what_the_machine_lacks(monkeypatch, name, machine, needles):
    from kd2m.runtime import resolve_device
    _fake_accelerators(monkeypatch, **machine)
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    for needle in needles:
        assert needle in str(info.value)


def test_seed_everything_repeats_every_rng():
    import random

    import numpy as np

    from kd2m.runtime import seed_everything

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        seed_everything(2**32 + 5)          # numpy takes seed mod 2^32
        first = draw()
        seed_everything(2**32 + 5)
        assert draw() == first
        seed_everything(5)
        again = draw()
        assert again[1] == first[1] and again[0] != first[0]   # (torch's CPU generator, too, keeps 32 bits)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
