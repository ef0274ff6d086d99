"""Map terms read their authors' layers by default: AT and NST every stage after the
stem, summed (RepDistiller's ``feat[1:-1]``), FitNets stage 2 (``--hint_layer 2``), WKD-F the last
stage; spatial distances the last post-activation map. Values are checked against the formulas
written out here, applied to the stage outputs read with plain forward hooks."""
import pytest
import torch
import torch.nn.functional as F

from kd2m.errors import ConfigError
from kd2m.models import build_model
from kd2m.training.binding import bind_terms
from kd2m.training.methods import Method, term_from_entry

PAIRS = {  # student ← teacher: the stage modules AT/NST read (feat[1:-1]) and FitNets' hint (feat[2])
    ("resnet8x4", "resnet32x4"): (["layer1", "layer2", "layer3"], "layer2"),
    ("wrn_16_2", "wrn_40_2"): (["block1", "block2", "block3"], "block2"),
    ("vgg8", "vgg13"): (["relu1", "relu2", "relu3", "relu4"], "relu2"),
}


def _at(x):  # RepDistiller distiller_zoo/AT.py: F.normalize(f.pow(p).mean(1).view(n, -1)), p = 2
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def _nst(fs, ft):  # RepDistiller distiller_zoo/NST.py: normalised maps, squared polynomial-kernel MMD
    fs, ft = F.normalize(fs.flatten(2), dim=2), F.normalize(ft.flatten(2), dim=2)

    def k(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)
    return k(ft, ft).mean() + k(fs, fs).mean() - 2 * k(fs, ft).mean()


def _outputs(net, modules, x):
    got, hooks = {}, []
    for m in modules:
        hooks.append(net.get_submodule(m).register_forward_hook(lambda mod, i, o, m=m: got.__setitem__(m, o)))
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return got


def _bound(name, student, teacher, x, **entry):
    (b,) = bind_terms(Method(name, (term_from_entry({"term": name, **entry}, name),)), student, teacher, x[:2],
                      100, 10)
    return b


def _value(b, student, teacher, x):
    """The bound term's value on ``x``, its layers read as the engine reads them."""
    from kd2m.training.binding import Taps, wanted_layers
    s_taps, t_taps = Taps(student, wanted_layers([b], "student")), Taps(teacher, wanted_layers([b], "teacher"))
    try:
        with torch.no_grad():
            student(x)
            teacher(x)
            return b(s_taps.features(), t_taps.features(), None, None, None, None)
    finally:
        s_taps.remove()
        t_taps.remove()


@pytest.mark.parametrize("pair", list(PAIRS), ids=lambda p: f"{p[0]}<-{p[1]}")
def test_at_nst_and_fitnet_default_to_the_authors_stages(pair):
    torch.manual_seed(0)
    s_name, t_name = pair
    student, teacher = build_model(s_name, 100).eval(), build_model(t_name, 100).eval()
    x = torch.randn(4, 3, 32, 32)
    stages_, hint = PAIRS[pair]
    s_out, t_out = _outputs(student, stages_, x), _outputs(teacher, stages_, x)
    for name, formula in (("at", lambda a, b: (_at(a) - _at(b)).pow(2).mean()), ("nst", _nst)):
        b = _bound(name, student, teacher, x)
        assert b.pairs == [(m, m) for m in stages_], name
        want = sum(formula(s_out[m], t_out[m]) for m in stages_)
        assert torch.allclose(_value(b, student, teacher, x), want, rtol=1e-5, atol=1e-7), name
    fit = _bound("fitnet", student, teacher, x)
    assert fit.pairs == [(hint, hint)]
    s_h, t_h = _outputs(student, [hint], x)[hint], _outputs(teacher, [hint], x)[hint]
    with torch.no_grad():  # mdistiller FitNet.py: F.mse_loss(ConvReg(f_s[hint]), f_t[hint])
        want = (fit.module.regressor(s_h) - t_h).pow(2).mean()
    assert torch.allclose(_value(fit, student, teacher, x), want, rtol=1e-5)
    assert _bound("wkd_f", student, teacher, x).pairs[0][0] == ("relu4" if s_name == "vgg8" else stages_[-1])


def test_a_named_layer_or_list_still_overrides_the_default():
    student, teacher = build_model("resnet8x4", 100).eval(), build_model("resnet32x4", 100).eval()
    x = torch.randn(2, 3, 32, 32)
    assert _bound("at", student, teacher, x, student_layer="layer3", teacher_layer="layer3").pairs == \
        [("layer3", "layer3")]
    assert _bound("nst", student, teacher, x, student_layer=["layer2", "layer3"],
                  teacher_layer=["layer2", "layer3"]).pairs == [("layer2", "layer2"), ("layer3", "layer3")]
    with pytest.raises(ValueError, match="lists of one length"):
        term_from_entry({"term": "at", "student_layer": ["layer1", "layer2"], "teacher_layer": ["layer1"]}, "x")


def test_stage_counts_that_differ_are_refused_naming_both():
    """AT pairs the stages in order: a teacher with more stages than the student is refused."""
    student, teacher = build_model("resnet8x4", 100).eval(), build_model("vgg13", 100).eval()
    with pytest.raises(ConfigError, match=r"3 student layer\(s\) \(layer1, layer2, layer3\) and 4 teacher"):
        _bound("at", student, teacher, torch.randn(2, 3, 32, 32))


def test_spatial_distances_default_to_the_last_post_activation_map():
    """The last stage where it is post-ReLU (resnet: layer3; vgg: relu4, never the pre-ReLU block4);
    a WRN's last block is a pre-activation sum, so its final ReLU's map is read."""
    x = torch.randn(2, 3, 32, 32)
    for name, want in (("resnet8x4", "layer3"), ("vgg8", "relu4"), ("wrn_16_2", "relu")):
        net = build_model(name, 100).eval()
        b = _bound("gauss_w2", net, net, x, unit="spatial")
        assert b.pairs == [(want, want)], name
    vgg = build_model("vgg8", 100).eval()
    assert (_outputs(vgg, ["relu4"], x)["relu4"] >= 0).all()
