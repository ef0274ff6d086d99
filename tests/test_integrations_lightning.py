"""kd2m.integrations.lightning: a tiny classifier trained one epoch on CPU by Lightning with
KD2MMixin: the loss is the Distiller's (CE + λ·terms, logged per term), the projector trains
(in the optimiser, even one built over the student's layers only) and is checkpointed with the
module, the teacher stays frozen, in eval mode and out of the checkpoint."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from kd2m import metrics  # noqa: E402
from kd2m.integrations.lightning import KD2MMixin  # noqa: E402


def _mlp(width, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 3))


class Student(KD2MMixin, pl.LightningModule):
    def __init__(self, teacher, example, only_net=False):
        super().__init__()
        self.net = _mlp(6)
        self.only_net = only_net
        self.configure_kd2m(teacher, ["kd", {"term": "w2", "weight": 0.5}], example=example, ce_weight=0.1)

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters() if self.only_net else self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _fit(model, tmp_path, **kw):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), **kw)
    trainer.fit(model, _loader())
    return trainer


@pytest.mark.parametrize("only_net", [False, True])
def test_one_epoch_trains_student_and_projector_with_a_frozen_teacher(tmp_path, only_net):
    teacher = _mlp(8, dropout=0.5, seed=1).train()
    teaching = []
    teacher.register_forward_pre_hook(lambda module, args: teaching.append(module.training))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = next(iter(_loader()))
    model = Student(teacher, x, only_net)
    proj = model.distiller.term_modules[1].loss.projector.weight
    proj_before, net_before = proj.detach().clone(), model.net[0].weight.detach().clone()
    n_probe = len(teaching)

    # the loss is the Distiller's: 0.1·CE + 0.9·KD + 0.5·W2(proj(f_S), f_T), the formula written out
    out = model.distill_step(x, y, log=False)
    with torch.no_grad():
        f_s, f_t = model.net[:3](x), teacher.eval()[:3](x)
        zs, zt = model.net(x) / 4, teacher(x) / 4
        kd = 16 * (F.softmax(zt, 1) * (F.log_softmax(zt, 1) - F.log_softmax(zs, 1))).sum(1).mean()
        expected = 0.1 * F.cross_entropy(model.net(x), y) + 0.9 * kd + 0.5 * metrics.get("w2")(f_s @ proj.T, f_t)
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    teacher.train()  # a user's .train() on the teacher: fit puts it back in eval mode
    del teaching[n_probe:]

    trainer = _fit(model, tmp_path)
    assert teaching[n_probe:] == [False] * 4                 # 4 steps, the teacher in eval mode in each
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not torch.equal(model.net[0].weight.detach(), net_before)
    assert not torch.equal(proj.detach(), proj_before)      # the projector trained, even when not given
    assert {"train_loss_epoch", "kd2m/ce_epoch", "kd2m/kd_epoch", "kd2m/w2_epoch"} <= set(trainer.callback_metrics)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(str(path))
    state = torch.load(path, weights_only=False)["state_dict"]
    assert torch.equal(state["distiller.term_modules.1.loss.projector.weight"], proj.detach())
    assert not any(k.startswith("teacher") or ".teacher." in k for k in state)


def test_training_without_configure_kd2m_says_what_to_call(tmp_path):
    class Bare(KD2MMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(6)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(RuntimeError, match=r"call self.configure_kd2m\(teacher, terms, example=…\)"):
        _fit(Bare(), tmp_path)
