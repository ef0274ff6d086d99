"""Where a spatial distance reads by default on a model whose last stage's activation is unknown
(timm's ``feature_info`` says nothing about it): the last stage, as on a post-activation stage;
only a stage known to be pre-activation (``post_activation=False``: a WRN's residual sum) sends
it to the last map before pooling.

Fails on a one-line bug the rest of the suite let through: an unknown activation (None) treated
as pre-activation, which moves the default of every timm model to its head (e.g. an EfficientNet's
``bn2`` after the 1×1 ``conv_head``, a map the stages do not list)."""
import pytest
import torch
from torch import nn

from kd2m.models import build_model
from kd2m.models.stage_info import Stage
from kd2m.training.binding import bind_terms
from kd2m.training.methods import Method, term_from_entry


def _spatial_pairs(model, x, name="gauss_w2"):
    (b,) = bind_terms(Method(name, (term_from_entry({"term": name, "unit": "spatial"}, name),)), model, model,
                      x[:2], 10, 10)
    return b.pairs


class Headed(nn.Module):
    """Two stages, then a 1×1 head conv + ReLU before pooling (EfficientNet's layout): the last map
    before pooling is ``head``, not the last stage."""

    def __init__(self, feature_info=None, stage_info=None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())
        self.fc = nn.Linear(16, 10)
        if feature_info is not None:
            self.feature_info = feature_info
        if stage_info is not None:
            self.stage_info = stage_info

    def forward(self, x):
        return self.fc(self.head(self.stage2(self.stage1(self.stem(x)))).mean((2, 3)))


def test_a_timm_style_stage_of_unknown_activation_is_the_spatial_default():
    x = torch.randn(2, 3, 16, 16)
    info = [{"module": "stage1", "num_chs": 8, "reduction": 2}, {"module": "stage2", "num_chs": 8, "reduction": 4}]
    assert _spatial_pairs(Headed(feature_info=info).eval(), x) == [("stage2", "stage2")]
    unknown = [Stage("stage1", 8, 2, None), Stage("stage2", 8, 4, None)]
    assert _spatial_pairs(Headed(stage_info=unknown).eval(), x) == [("stage2", "stage2")]
    pre = [Stage("stage1", 8, 2, False), Stage("stage2", 8, 4, False)]      # known pre-activation
    assert _spatial_pairs(Headed(stage_info=pre).eval(), x) == [("head", "head")]


def test_a_timm_efficientnets_spatial_default_is_its_last_stage_not_its_head():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    net = build_model("timm:tinynet_e", 10, 3, 64).eval()
    x = torch.randn(2, 3, 64, 64)
    assert net.feature_info[-1]["module"] == "blocks.6"
    assert _spatial_pairs(net, x) == [("blocks.6", "blocks.6")]
