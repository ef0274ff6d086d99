"""kd2m: knowledge distillation through distribution matching.

Two entry points: ``kd2m.metrics.get(name, **options)`` (a distance between feature batches)
and ``kd2m.KD2MLoss`` (the nn.Module for your training loop); ``kd2m.features.FeatureTap``
gets features from any named layer.
"""
__version__ = "0.1.0"

from . import metrics  # noqa: E402,F401
from .features import FeatureTap  # noqa: E402,F401
from .loss import KD2MLoss, hinton_kd  # noqa: E402,F401

__all__ = ["metrics", "KD2MLoss", "FeatureTap", "hinton_kd", "__version__"]
