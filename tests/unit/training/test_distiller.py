"""kd2m.Distiller, the front door for your own loop: its loss against the formulas written out
and against the engine's step as bound without it, the teacher frozen and in eval mode, the
projectors owned by the distiller, and λ that would silently be wrong refused."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kd2m
from kd2m import metrics, tasks
from kd2m.training.binding import Taps, bind_terms, wanted_layers
from kd2m.training.methods import Method
from kd2m.training.step import Step
from kd2m.training.teacher import OnlineTeacher


def _net(d_in, width, classes, dropout=0.0):
    torch.manual_seed(width)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, classes)).double()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def test_import_kd2m_reaches_every_door():
    assert kd2m.losses.get("dkd") is not None  # `import kd2m` alone, no `from kd2m import losses`
    assert kd2m.Distiller.__name__ == "Distiller"
    assert "w2" in kd2m.metrics.available()


def test_loss_is_ce_plus_weighted_terms_written_out(batch):
    """CE + 0.5·W2(proj(f_S), f_T) + 0.9·T²·KL(p_T‖p_S) at T = 4, with the distiller's projector."""
    x, y = batch
    student, teacher = _net(5, 6, 3), _net(5, 8, 3)
    d = kd2m.Distiller(student, teacher, ["kd", {"term": "w2", "weight": 0.5}], example=x[:2], ce_weight=0.1)
    out = d(x, y)
    f_s = student[:3](x)  # penultimate: the last Linear's input
    f_t = teacher[:3](x)
    (proj,) = [m for m in d.modules() if isinstance(m, nn.Linear)]
    w2 = metrics.get("w2")(proj(f_s), f_t)
    zs, zt = student(x) / 4, teacher(x) / 4
    kd = 16 * (F.softmax(zt, 1) * (F.log_softmax(zt, 1) - F.log_softmax(zs, 1))).sum(1).mean()
    expected = 0.1 * F.cross_entropy(student(x), y) + 0.9 * kd + 0.5 * w2
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.terms["kd"], kd, rtol=1e-10, atol=1e-12)
    assert out.weights == {"kd": 0.9, "w2": 0.5}


def test_equals_the_engine_step_bound_without_it(batch):
    """Value and gradients (float64) of the front door and of the engine's pieces put together by hand."""
    x, y = batch
    terms = ["cw2", {"term": "dkd", "weight": 1.0, "warmup": 0}, {"term": "gauss_w2", "weight": 0.3}]
    student, teacher = _net(5, 6, 3), _net(5, 8, 3)
    twin = copy.deepcopy(student)
    torch.manual_seed(7)
    d = kd2m.Distiller(student, teacher, terms, example=x[:2])
    torch.manual_seed(7)  # the same projector draws
    method = Method("distiller", kd2m.training.distiller.parse_terms(terms))
    bound = bind_terms(method, twin, teacher, x[:2], 3, 2)
    for b in bound:
        b.module.double()
    step = Step(twin, bound, tasks.get("classification"),
                teacher_out=OnlineTeacher(teacher, wanted_layers(bound, "teacher")),
                s_taps=Taps(twin, wanted_layers(bound, "student")), device=x.device)
    out = d(x, y)
    ref_out = step.forward(x, y, torch.arange(len(x)))
    ref, _ = step.loss(ref_out, [b.config.weight for b in bound])
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=0)
    params = [*student.parameters(), *d.parameters()]
    ref_params = [*twin.parameters(), *(p for b in bound for p in b.module.parameters())]
    for g, r in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref, ref_params)):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_teacher_frozen_and_in_eval_whatever_train_does(batch):
    x, y = batch
    student, teacher = _net(5, 6, 3), _net(5, 8, 3, dropout=0.5)
    teacher.train()
    d = kd2m.Distiller(student, teacher, ["kd"], example=x[:2])
    d.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # a user's model.train() over a tree holding the teacher
    first, second = d(x, y).terms["kd"], d(x, y).terms["kd"]
    assert not teacher.training
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout off: the same teacher every call


def test_projectors_belong_to_the_distiller_not_the_student(batch):
    x, y = batch
    student, teacher = _net(5, 6, 3), _net(5, 8, 3)
    before = set(student.state_dict())
    d = kd2m.Distiller(student, teacher, ["w2"], example=x[:2])
    assert set(student.state_dict()) == before  # a saved student reloads with nothing unexpected
    owned = dict(d.named_parameters())
    assert owned and all(k.startswith("term_modules.") for k in owned)
    assert not {id(p) for p in owned.values()} & {id(p) for p in student.parameters()}
    assert not {id(p) for p in owned.values()} & {id(p) for p in teacher.parameters()}
    assert set(d.state_dict()) == set(owned)


def test_warmup_without_epoch_and_auto_without_calibration_are_refused(batch):
    x, y = batch
    student, teacher = _net(5, 6, 3), _net(5, 8, 3)
    d = kd2m.Distiller(student, teacher, ["dkd"], example=x[:2])
    with pytest.raises(ValueError, match=r"set_epoch\(epoch, epochs\)"):
        d(x, y)
    d.set_epoch(1, 240)  # DKD's warm-up: its authors' 20 epochs of their 240
    assert d(x, y).weights["dkd"] == pytest.approx(1.0 * 2 / 20)
    d.set_epoch(1, 40)  # the same share of a 40-epoch run, as kd2m run scales it: round(20·40/240) = 3
    assert d(x, y).weights["dkd"] == pytest.approx(1.0 * 2 / 3)
    a = kd2m.Distiller(student, teacher, [{"term": "w2", "weight": "auto"}], example=x[:2])
    with pytest.raises(ValueError, match=r"calibrate"):
        a(x, y)
    (scale,) = a.calibrate(torch.utils.data.TensorDataset(x, y), batch_size=6)
    assert scale > 0 and a(x, y).weights["w2"] == pytest.approx(scale)


def test_bad_terms_name_the_entry(batch):
    x, _ = batch
    with pytest.raises(ValueError, match=r"Distiller terms\[1\].*unknown"):
        kd2m.Distiller(_net(5, 6, 3), _net(5, 8, 3), ["w2", "no_such_term"], example=x[:2])
    with pytest.raises(ValueError, match=r"need a teacher"):
        kd2m.Distiller(_net(5, 6, 3), None, ["w2"], example=x[:2])
