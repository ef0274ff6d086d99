"""The training step never waits on the device: no value is read back to the host per step.

A host read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()`` …) makes the
host wait until the device has finished everything queued before it; one per step serialises
the loop on an accelerator. These tests count every such read made by :meth:`Trainer._epoch`
(the data loader's own fetching excluded) over an epoch of the digits: CE alone and the
terms that need no host-side solver make none per step — the epoch's one read of its totals,
amortised over its 12 steps, is under 0.5 per step; exact OT reads its cost once per call.
They would count the ``torch.isfinite(loss)`` check and the ``float(loss)`` sums the loop used
to make at every step.
"""
import contextlib

import pytest
import torch

from kd2m.data import build_dataset
from kd2m.harness.config import RunConfig
from kd2m.harness.trainer import Trainer
from kd2m.training.build import build_student, build_teacher, freeze

#: Tensor methods that read values back to the host
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu")


class ReadCounter:
    """Counts host reads while ``active``; a context of :meth:`paused` excludes a stretch."""

    def __init__(self, monkeypatch):
        self.count, self.active, self.where = 0, False, []
        for name in READS:
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, _name=name, **kwargs):
                if self.active:
                    self.count += 1
                    import traceback
                    self.where.append((_name, traceback.extract_stack(limit=4)[0]))
                return _real(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)

    @contextlib.contextmanager
    def paused(self):
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before


class _FetchUncounted:
    """A loader whose fetching (collation, the sampler) is not counted: it is not the step's."""

    def __init__(self, loader, counter):
        self.loader, self.counter = loader, counter
        self.sampler = loader.sampler

    def __iter__(self):
        it = iter(self.loader)
        while True:
            with self.counter.paused():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    def __len__(self):
        return len(self.loader)


def _reads_per_step(tmp_path, monkeypatch, **fields):
    cfg = RunConfig(epochs=1, progress=False, diagnostics=False, **fields).resolved()
    bundle = build_dataset("digits")
    teacher = freeze(build_teacher(cfg, bundle, 0))
    tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / "r",
                 torch.device("cpu"), teacher=teacher)
    tr._setup()
    counter = ReadCounter(monkeypatch)
    tr.train_loader = _FetchUncounted(tr.train_loader, counter)
    steps = len(tr.train_loader)
    counter.active = True
    try:
        tr._epoch(tr.model, 0)
    finally:
        counter.active = False
        tr.remove_hooks()
    return counter.count / steps, counter.where


@pytest.mark.parametrize("fields", [dict(metrics=[], baselines=["ce"]),
                                    dict(metrics=[], baselines=["kd"]), dict(metrics=[], baselines=["dkd"]),
                                    dict(metrics=["gauss_w2"], baselines=[]),
                                    dict(metrics=["mmd_rbf"], baselines=[]),
                                    dict(metrics=["sliced_w2"], baselines=[]),
                                    dict(metrics=["gauss_w2"], baselines=[], teacher_cache=0)],
                         ids=["ce", "kd", "dkd", "gauss_w2", "mmd_rbf", "sliced_w2", "gauss_w2-online"])
def test_a_training_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch, fields):
    per_step, where = _reads_per_step(tmp_path, monkeypatch, **fields)
    assert per_step < 0.5, f"{per_step:.2f} host reads per step, e.g. {where[:6]}"


def test_the_counter_sees_a_read_per_step(tmp_path, monkeypatch):
    """The counter is not blind: a term that reads its value back once per step is counted."""
    from kd2m import metrics
    real = metrics.Metric.__call__

    def reading(self, *args, **kwargs):
        value = real(self, *args, **kwargs)
        float(value.detach())
        return value
    monkeypatch.setattr(metrics.Metric, "__call__", reading)
    per_step, _ = _reads_per_step(tmp_path, monkeypatch, metrics=["gauss_w2"], baselines=[])
    assert per_step >= 1.0


@pytest.mark.parametrize("name,reads", [("w2", 1), ("cw2", 2)])
def test_exact_ot_reads_its_cost_back_once_per_call(tmp_path, monkeypatch, name, reads):
    """Exact OT solves on the host by design (no exact GPU solver): its cost goes to the host once
    per call — CW2 reads its labels' class sizes and all its classes' costs together (it read
    one cost per class, 10 reads per step on the digits, before)."""
    per_step, where = _reads_per_step(tmp_path, monkeypatch, metrics=[name], baselines=[])
    assert per_step < reads + 0.5, f"{per_step:.2f} host reads per step, e.g. {where[:6]}"
