"""Models by name: ``build_model(name, num_classes, in_channels=3, image_size=32)``.

    >>> import torch
    >>> from kd2m.models import build_model
    >>> net = build_model("digits_cnn", num_classes=10, in_channels=1, image_size=8)
    >>> tuple(net(torch.zeros(2, 1, 8, 8)).shape), net.feature_dim, type(net.fc).__name__
    ((2, 10), 64, 'Linear')

Every model's last module is ``fc`` (``nn.Linear``), fed the ``feature_dim``-d penultimate
features the paper matches. Modules: ``registry``, ``resnet`` (resnet18/34, cifar_resnet18/34),
``small`` (digits_cnn, digits_mlp), ``pretrained`` (``load_pretrained``), ``external``
(``"timm:NAME"`` / ``"torchvision:NAME"``: any model of those libraries, random init).
"""
from .registry import available_models, build_model, describe_models, register_model  # noqa: F401
from .pretrained import load_pretrained  # noqa: F401
from . import resnet, small  # noqa: F401,E402  (registers the models)

__all__ = ["build_model", "available_models", "describe_models", "register_model", "load_pretrained"]
