"""Models by name: ``build_model(name, num_classes, in_channels=3, image_size=32)``.

    >>> import torch
    >>> from kd2m.models import build_model
    >>> net = build_model("digits_cnn", num_classes=10, in_channels=1, image_size=8)
    >>> tuple(net(torch.zeros(2, 1, 8, 8)).shape), net.feature_dim, type(net.fc).__name__
    ((2, 10), 64, 'Linear')

Every model's last ``nn.Linear`` is its classifier, fed the ``feature_dim``-d penultimate
features the paper matches (``fc`` here; the RepDistiller zoo keeps its authors' names).
``stages(model)`` lists a model's stage outputs (module path, channels, reduction), the feature
maps the field's map terms read (:mod:`kd2m.models.stage_info`).
Modules: ``registry``, ``resnet`` (resnet18/34, cifar_resnet18/34), ``small`` (digits_cnn,
digits_mlp), ``pretrained`` (``load_pretrained``), and the CIFAR model zoo of RepDistiller /
mdistiller with their names and checkpoint layouts: ``cifar_resnet`` (resnet8/20/32/56/110,
resnet8x4, resnet32x4), ``wrn`` (wrn_16_2, wrn_40_1, wrn_40_2), ``vgg`` (vgg8, vgg13),
``mobilenet`` (MobileNetV2), ``shufflenet`` (ShuffleV1, ShuffleV2); ``mnist1d`` (mnist1d_cnn,
mnist1d_mlp: 1-D inputs ``(n, c, L)``); ``external`` (``"timm:NAME"`` /
``"torchvision:NAME"``: any model of those libraries, random init).
"""
# importing the modules registers their models
from . import cifar_resnet, mnist1d, mobilenet, resnet, shufflenet, small, vgg, wrn  # noqa: F401,E402
from .pretrained import load_pretrained  # noqa: F401
from .registry import available_models, build_model, describe_models, register_model  # noqa: F401
from .stage_info import Stage, stages  # noqa: F401

__all__ = ["build_model", "available_models", "describe_models", "register_model", "load_pretrained", "stages",
           "Stage"]
